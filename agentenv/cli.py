"""Command line: ``agentenv serve-envs``, ``agentenv run``."""

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve-envs": _serve_envs}
    try:
        from agentenv.run import main as run_main

        commands["run"] = run_main
    except ImportError:
        pass
    if not argv or argv[0] not in commands:
        print(f"usage: agentenv {{{','.join(commands)}}} [options]  (agentenv COMMAND --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
