"""Command line: ``agentenv run``, ``agentenv serve-envs``, ``agentenv verl-dataset``, ``agentenv view``,
``agentenv replay``."""

from __future__ import annotations

import argparse
import sys


def _serve_envs(argv: list[str]) -> int:
    from agentenv.envs.server import ServiceLimits, serve

    ap = argparse.ArgumentParser(prog="agentenv serve-envs", description="Serve N real X desktops over HTTP.")
    ap.add_argument("--num", type=int, default=4, help="desktops to start (default 4)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--token", default=None, help="bearer token (default $ENV_TOKEN; prefer ENV_TOKEN: a command "
                                                  "line is visible to every local user)")
    ap.add_argument("--token-file", default=None, help="write the token to this file (mode 600); with no token "
                                                       "given, one is generated and only written there")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    for name, field in ServiceLimits.model_fields.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default,
                        help=f"refuse requests over this (default {field.default})")
    a = ap.parse_args(argv)
    limits = ServiceLimits(**{k: getattr(a, k) for k in ServiceLimits.model_fields})
    serve(a.num, a.host, a.port, a.token, a.width, a.height, a.token_file, limits)
    return 0


def _verl_dataset(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="agentenv verl-dataset",
                                 description="Write agentenv tasks as a parquet file verl's RLHFDataset reads "
                                             "(one row per task, for the agentenv_gui agent loop).")
    ap.add_argument("--source", default="builtin", help="builtin | task.json | folder/ | tasks.jsonl | tasks.parquet")
    ap.add_argument("--ids", nargs="*", default=None, help="only these task ids")
    ap.add_argument("--out", required=True, help="the parquet file to write")
    a = ap.parse_args(argv)
    from agentenv.integrations.verl import write_dataset
    from agentenv.rollout.sources import BrokenTask, load_items

    items = load_items(a.source)
    broken = [i for i in items if isinstance(i, BrokenTask)]
    for b in broken:
        print(f"agentenv verl-dataset: skipped {b.id}: {b.reason}", file=sys.stderr)
    tasks = [i for i in items if not isinstance(i, BrokenTask) and (not a.ids or i.id in a.ids)]
    if not tasks:
        print("agentenv verl-dataset: no task to write", file=sys.stderr)
        return 2
    path = write_dataset(tasks, a.out)
    print(f"{len(tasks)} tasks -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from agentenv.view.cli import replay_main, view_main

    from agentenv.run import main as run_main  # an ImportError here is a broken install: let it say so

    commands = {"run": run_main, "serve-envs": _serve_envs, "verl-dataset": _verl_dataset, "view": view_main,
                "replay": replay_main}
    if not argv or argv[0] not in commands:
        print(f"usage: agentenv {{{','.join(commands)}}} [options]  (agentenv COMMAND --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
