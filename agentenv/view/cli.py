"""``agentenv view RUN_DIR`` and ``agentenv replay RUN_DIR``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentenv.config import EnvServiceConfig


def view_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="agentenv view", description="Write a self-contained HTML report of a run "
                                 "to RUN_DIR/report/ (open RUN_DIR/report/index.html; no server needed).")
    ap.add_argument("run_dir", help="a run directory (output.dir of `agentenv run`, e.g. runs/latest)")
    ap.add_argument("--workers", type=int, default=None, help="processes making thumbnails (default: all cores)")
    a = ap.parse_args(argv)
    from agentenv.view.report import build_report

    try:
        built = build_report(a.run_dir, workers=a.workers)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"agentenv view: {e}", file=sys.stderr)
        return 2
    print(f"report: {built.path} ({built.pages} pages, {built.bytes / 1e6:.1f} MB, {built.thumbnails} new "
          f"thumbnails, {built.seconds:.1f} s)", file=sys.stderr)
    print(json.dumps({"report": str(built.path), "pages": built.pages, "bytes": built.bytes,
                      "thumbnails": built.thumbnails, "seconds": round(built.seconds, 3)}))
    return 0


def _token(a: argparse.Namespace) -> str | None:
    if a.env_token_file:
        return Path(a.env_token_file).read_text().strip()
    return os.environ.get("ENV_TOKEN")


def replay_main(argv: list[str]) -> int:
    from agentenv.view.compare import THRESHOLD

    ap = argparse.ArgumentParser(
        prog="agentenv replay",
        description="Re-execute recorded trajectories' actions on fresh desktops (same task setup, same screen "
                    "size), compare every step's screenshot and the final reward with the recording, and report "
                    "where they first diverge. Results go to RUN_DIR/replays/; `agentenv view RUN_DIR` shows them.")
    ap.add_argument("run_dir")
    ap.add_argument("--task", help="replay only this task id")
    ap.add_argument("--sample", type=int, help="replay only this sample")
    ap.add_argument("--tasks", help="task source to set up from (builtin, a JSON file or folder...); default: the "
                                    "tasks the run recorded in tasks.jsonl, else the built-in suite")
    ap.add_argument("--record-oracles", action="store_true",
                    help="first record the tasks' oracle action lists (the built-in suite by default, or --tasks; "
                         "only --task if given) into RUN_DIR as a run, then replay them: a determinism table")
    ap.add_argument("--env-url", help="an env service to use (default: start a local one; $ENV_SERVER_URL)",
                    default=os.environ.get("ENV_SERVER_URL"))
    ap.add_argument("--env-token-file", help="file holding that service's bearer token (default $ENV_TOKEN)")
    ap.add_argument("--port", type=int, default=0, help="port of the local env service (default: a free one)")
    ap.add_argument("--desktops", type=int, default=2, help="replays at once, each on its own desktop (default 2)")
    ap.add_argument("--pace", choices=("recorded", "fast"), default="recorded",
                    help="recorded: wait each step's recorded model latency before acting (default); fast: do not")
    ap.add_argument("--threshold", type=float, default=THRESHOLD,
                    help=f"perceptual distance above which a screenshot diverges (default {THRESHOLD}; see "
                         "agentenv/view/compare.py)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait for the screen to match (default 3)")
    a = ap.parse_args(argv)
    from agentenv.view import model
    from agentenv.view.replay import ReplayOptions, env_client, record_oracles, replay_run

    run_dir = Path(a.run_dir)
    opts = ReplayOptions(threshold=a.threshold, pace=a.pace, settle_s=a.settle)

    async def go() -> list:
        log = run_dir / "replay-env-service.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        async with env_client(a.env_url, _token(a), a.port, log=log) as client:
            if a.record_oracles:
                from agentenv.envs.tasks import builtin_tasks
                from agentenv.rollout.sources import load_items

                tasks = [t for t in (load_items(a.tasks) if a.tasks else builtin_tasks()) if hasattr(t, "oracle")]
                if a.task:
                    tasks = [t for t in tasks if t.id == a.task]
                await record_oracles(run_dir, client, tasks, desktops_n=a.desktops, settle_s=a.settle)
            return await replay_run(run_dir, client, task=a.task, sample=a.sample,
                                    tasks_source=None if a.record_oracles else a.tasks,
                                    desktops_n=a.desktops, options=opts)

    try:
        results = asyncio.run(go())
    except (LookupError, FileNotFoundError, RuntimeError) as e:
        print(f"agentenv replay: {e}", file=sys.stderr)
        return 2
    print(model.determinism_table(results), file=sys.stderr)
    verdicts: dict[str, int] = {}
    for r in results:
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    print(f"results in {run_dir / 'replays'}; `agentenv view {run_dir}` shows them next to the originals",
          file=sys.stderr)
    print(json.dumps({"replayed": len(results), "verdicts": verdicts, "rows": [r.row() for r in results]}))
    return 0


def smoke_main(a: argparse.Namespace, settings: EnvServiceConfig) -> int:
    """``agentenv tasks smoke DIR`` (its flags are parsed with the other ``tasks`` commands in agentenv.cli)."""
    import tempfile

    from agentenv.envs.client import AsyncEnvClient
    from agentenv.envs.tasks.check import check_tasks
    from agentenv.rollout.sources import load_items
    from agentenv.services import EnvService
    from agentenv.types import Task
    from agentenv.net import free_port
    from agentenv.view.smoke import render, results_json, smoke_tasks, summary

    root = Path(a.dir).resolve()
    folder = root if root.is_dir() else root.parent
    settings = settings.model_copy(update={"upload_roots": [*settings.upload_roots, str(folder)]})
    runnable = {(r.file, r.id): r.domain for r in check_tasks(a.dir, osworld_like=settings.sandbox,
                                                              network=settings.sandbox_network)
                if r.status == "runs" and (not a.domain or r.domain in a.domain)}
    tasks = [t for t in load_items(a.dir) if isinstance(t, Task)
             and (t.source, t.extra.get("original_id", t.id)) in runnable][: a.limit]
    domains = {t.id: runnable[(t.source, t.extra.get("original_id", t.id))] for t in tasks}
    if not tasks:
        print(f"agentenv tasks smoke: no task under {a.dir} runs here (see `agentenv tasks check {a.dir}`)",
              file=sys.stderr)
        return 2
    print(f"smoke: {len(tasks)} tasks on {a.desktops} {'sandboxed' if settings.sandbox else 'plain'} desktops",
          file=sys.stderr)

    def progress(done: int, total: int, r) -> None:
        state = "setup failed" if not r.setup_ok else f"no-op {r.noop_score}"
        print(f"[{done}/{total}] {r.domain}/{r.id}: {state}, first screenshot after {r.reset_to_screenshot_s} s"
              f"{' BLANK' if r.blank else ''}{' UNSETTLED' if r.unsettled else ''}", file=sys.stderr, flush=True)

    async def go() -> list:
        log = Path(tempfile.mkdtemp(prefix="agentenv-smoke-")) / "env-service.log"
        svc = EnvService(num=0, port=free_port(), settings=settings, log=log)
        await asyncio.to_thread(svc.start)
        client = AsyncEnvClient(svc.url, svc.token)
        try:
            return await smoke_tasks(client, tasks, domains, a.desktops, (settings.width, settings.height),
                                     a.settle_s, progress)
        finally:
            await client.aclose()
            await asyncio.to_thread(svc.stop)

    results = asyncio.run(go())
    print(render(results), file=sys.stderr)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results_json(results), indent=1))
    print(json.dumps(summary(results)))
    return 0
