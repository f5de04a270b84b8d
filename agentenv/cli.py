"""Command line: ``agentenv run``, ``agentenv serve-envs``, ``agentenv verl-dataset``, ``agentenv view``,
``agentenv replay``, ``agentenv tasks check|fetch``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from agentenv.config import EnvServiceConfig


def _settings_flags(ap: argparse.ArgumentParser) -> None:
    """The env service's settings (``EnvServiceConfig``): whole, from a run config or as JSON, then
    one option per setting over them."""
    from agentenv.config import EnvServiceConfig, add_flags

    ap.add_argument("--config", default=None, metavar="RUN_YAML", help="start from this run config's env.serve")
    ap.add_argument("--settings", default=None, metavar="JSON",
                    help="start from these settings (EnvServiceConfig as JSON: what `agentenv run` passes)")
    add_flags(ap, EnvServiceConfig)


def _settings(a: argparse.Namespace) -> "EnvServiceConfig":
    """--settings, or --config's env.serve, or the defaults (with the downloads of AGENTENV_OFFLINE /
    AGENTENV_CACHE_DIR), then the options given."""
    from agentenv.config import DownloadConfig, EnvServiceConfig, from_flags, load_config

    if a.settings:
        base = EnvServiceConfig.model_validate_json(a.settings)
    elif a.config:
        base = load_config(a.config).env.serve
    else:
        base = EnvServiceConfig(downloads=DownloadConfig.from_env())
    return from_flags(a, EnvServiceConfig, base)


def _serve_envs(argv: list[str]) -> int:
    from agentenv.envs.service import serve

    ap = argparse.ArgumentParser(prog="agentenv serve-envs", description="Serve N real X desktops over HTTP.")
    ap.add_argument("--num", type=int, default=4, help="desktops to start (default 4)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--token", default=None, help="bearer token (default $ENV_TOKEN; prefer ENV_TOKEN: a command "
                                                  "line is visible to every local user)")
    ap.add_argument("--token-file", default=None, help="write the token to this file (mode 600); with no token "
                                                       "given, one is generated and only written there")
    ap.add_argument("--osworld-port", type=int, default=None, metavar="BASE",
                    help="listen on ports BASE..BASE+num-1 too: each desktop takes the lowest free one (freed "
                         "when it is closed) and answers there as OSWorld's in-VM server, at OSWorld's paths; "
                         "GET /envs says each desktop's osworld_port; the token goes as a URL password "
                         "(vm_ip='agentenv:TOKEN@host')")
    _settings_flags(ap)
    a = ap.parse_args(argv)
    try:
        settings = _settings(a)
    except (ValueError, ValidationError) as e:
        ap.error(str(e))
    serve(a.num, a.host, a.port, a.token, a.token_file, settings, osworld_port=a.osworld_port)
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


def _tasks(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="agentenv tasks",
                                 description="OSWorld task files: which run here (check), fill the download cache (fetch), "
                                             "set up and score each as a no-op on real desktops (smoke).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="per task file: runs here, or exactly what is missing; a table per domain; "
                                     "the last line is a JSON summary")
    c.add_argument("dir", help="a folder of task JSON files (OSWorld: evaluation_examples/examples) or one file")
    c.add_argument("--quiet", action="store_true", help="only the table and the summary, no line per task")
    c.add_argument("--json-out", default=None, help="also write every task's report to this JSON file")
    # The env service's settings: --no-sandbox checks for plain desktops, where sudo, python,
    # /home/user, GNOME settings, Ctrl+Alt+T... are missing (sandboxed ones look like OSWorld's VM).
    _settings_flags(c)
    f = sub.add_parser("fetch", help="download every file the tasks fetch (download steps, cloud_file) into "
                                     "the cache ($AGENTENV_HOME/cache/downloads); the last line is JSON")
    f.add_argument("dir")
    s = sub.add_parser("smoke", help="every task that check says runs, on real desktops side by side: reset with "
                                     "setup, first screenshot, a no-op evaluation; the last line is JSON")
    s.add_argument("dir")
    s.add_argument("--desktops", type=int, default=2, help="desktops side by side (default 2)")
    s.add_argument("--domain", action="append", help="only this domain (folder name); repeatable")
    s.add_argument("--limit", type=int, default=None, help="at most this many tasks")
    s.add_argument("--settle-s", type=float, default=2.0,
                   help="how long after the first screenshot the screen is grabbed again to see if it was ready")
    s.add_argument("--json-out", default=None, help="also write every task's result to this JSON file")
    _settings_flags(s)  # the desktops' (--width, --height, --no-sandbox, --sandbox-network, ...)
    a = ap.parse_args(argv)
    import json
    from pathlib import Path

    from agentenv.config import DownloadConfig
    from agentenv.envs.tasks.cache import DownloadCache
    from agentenv.envs.tasks.check import check_tasks, fetch_all, render, reports_json, summarize

    if not Path(a.dir).exists():
        print(f"agentenv tasks: {a.dir} does not exist", file=sys.stderr)
        return 2
    if a.cmd == "fetch":
        cfg = DownloadConfig.from_env()
        if cfg.offline:
            print("agentenv tasks fetch: AGENTENV_OFFLINE is set; nothing can be fetched", file=sys.stderr)
            return 2
        out = fetch_all(a.dir, DownloadCache.from_config(cfg))
        for u, err in out["failed"].items():
            print(f"failed: {err}", file=sys.stderr)
        print(json.dumps(out))
        return 1 if out["failed"] else 0
    try:
        settings = _settings(a)
    except (ValueError, ValidationError) as e:
        (s if a.cmd == "smoke" else c).error(str(e))
    if a.cmd == "smoke":
        from agentenv.view.cli import smoke_main

        return smoke_main(a, settings)
    reports = check_tasks(a.dir, DownloadCache.from_config(settings.downloads), osworld_like=settings.sandbox,
                          network=settings.sandbox_network)
    print(render(reports, verbose=not a.quiet))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(reports_json(reports), indent=1))
    s = summarize(reports)
    print(json.dumps(s))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from agentenv.view.cli import replay_main, view_main

    from agentenv.run import main as run_main  # an ImportError here is a broken install: let it say so

    commands = {"run": run_main, "serve-envs": _serve_envs, "verl-dataset": _verl_dataset, "view": view_main,
                "replay": replay_main, "tasks": _tasks}
    if not argv or argv[0] not in commands:
        print(f"usage: agentenv {{{','.join(commands)}}} [options]  (agentenv COMMAND --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
