"""``agentenv run``: the main job. Tasks -> streaming scheduler -> trajectories on disk.

    agentenv run [--config run.yaml] [--set section.key=value ...]

With no services configured it starts what it needs on loopback (the tiny model on vLLM, an env
service with ``env.local_desktops`` desktops) and stops them at the end. SIGINT/SIGTERM: stop
admitting, let trajectories in flight finish, flush, exit; a second signal abandons them (they
rerun on the next start, which skips everything already on disk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from loguru import logger

from agentenv.config import RunConfig, load_config
from agentenv.envs.pool import EnvPool, ServiceSpec
from agentenv.rollout.buffer import TrajectoryBuffer
from agentenv.rollout.llm import as_llm
from agentenv.rollout.loop import Rollout
from agentenv.rollout.scheduler import StreamingScheduler
from agentenv.rollout.sources import TaskSource, load_items
from agentenv.view.live import serve_live
from agentenv.view.runinfo import record_run


def build_scheduler(cfg: RunConfig, llm: Any, pool: EnvPool, *, tiny: bool = False) -> StreamingScheduler:
    """Everything but the services: rollout (agent, sampling, limits), buffer, source, scheduler."""
    s, t = cfg.scheduler, cfg.tasks
    buffer = TrajectoryBuffer(cfg.output.dir, s.rollout_n, max_staleness=s.max_staleness,
                              stale_policy=s.stale_policy, save_screenshots=cfg.output.screenshots)
    source = TaskSource(load_items(t.source), epochs=t.epochs, rank=t.rank, world_size=t.world_size,
                        shuffle=t.shuffle, seed=t.seed, ids=t.ids, limit=t.limit)
    return StreamingScheduler(Rollout.from_config(cfg, llm, tiny=tiny), pool, buffer, source, s)


async def _progress(sched: StreamingScheduler, total: int | None, enabled: bool) -> None:
    """One progress bar: groups done/total, steps/s, desktops busy, model calls in flight, success."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="group", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    interval = 0.5 if sys.stderr.isatty() else 10.0  # a log file gets a line every 10 s, not a flood
    try:
        while True:
            await asyncio.sleep(interval)
            s = sched.summary()
            bar.n = s["groups"]
            bar.set_postfix(steps_s=s["steps_per_s"], busy=sched.pool.busy, llm=sched.stats.llm_in_flight,
                            success=f"{s['success_rate']:.2f}", refresh=False)
            bar.refresh()
    finally:
        bar.close()


def _metrics_server(port: int, sched: StreamingScheduler) -> None:
    from prometheus_client import Gauge, start_http_server

    g = Gauge("agentenv_scheduler", "scheduler state", ["what"])
    g.labels("groups_done").set_function(lambda: sched.buffer.groups_done)
    g.labels("trajectories_done").set_function(lambda: sched.buffer.trajectories_done)
    g.labels("steps").set_function(lambda: sched.stats.steps)
    g.labels("llm_in_flight").set_function(lambda: sched.stats.llm_in_flight)
    g.labels("desktops_busy").set_function(lambda: sched.pool.busy)
    start_http_server(port, addr="127.0.0.1")


async def run_async(cfg: RunConfig, llm: Any, services: list[ServiceSpec], *, tiny: bool = False) -> dict:
    pool = await EnvPool(services, timeout_s=cfg.loop.step_timeout_s).start()
    sched = build_scheduler(cfg, llm, pool, tiny=tiny)
    await record_run(cfg.output.dir, cfg, services, sched.source.items)  # for `agentenv view` and `replay`
    if cfg.metrics_port:
        _metrics_server(cfg.metrics_port, sched)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.warning("signal: no new trajectories; waiting for those in flight (again to abandon them)")
            sched.stop()
        else:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    total = len(sched.source) if sched.source.finite else None
    try:
        progress = asyncio.ensure_future(_progress(sched, total, cfg.progress))
        try:
            async with serve_live(sched, cfg.output.live_port, cfg.output.dir):
                summary = await sched.run()
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
    except asyncio.CancelledError:
        summary = {**sched.summary(), "abandoned": True}
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await pool.aclose()
        if hasattr(sched.llm, "aclose"):
            await sched.llm.aclose()
    path = sched.buffer.compact()
    summary["output"] = str(path) if path else None
    summary["stopped_early"] = sched.stopping
    if cfg.output.dir:
        Path(cfg.output.dir, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(cfg: RunConfig) -> dict:
    from agentenv.services import EnvService, VLLMService

    with contextlib.ExitStack() as stack:
        tiny = cfg.llm.url is None or (cfg.llm.model or "").startswith("tiny-uitars")
        if cfg.llm.url is None:
            svc = stack.enter_context(VLLMService(port=cfg.llm.port))
            llm: Any = as_llm(svc.url, model=svc.model, timeout_s=cfg.llm.timeout_s, max_retries=cfg.llm.max_retries)
        else:
            llm = as_llm(cfg.llm.url, model=cfg.llm.model, timeout_s=cfg.llm.timeout_s,
                         max_retries=cfg.llm.max_retries)
        services = [ServiceSpec(s.url, s.token, s.desktops) for s in cfg.env.services]
        if not services:
            log = Path(cfg.output.dir or ".") / "env-service.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            es = stack.enter_context(EnvService(cfg.env.local_desktops, cfg.env.local_port, cfg.env.width,
                                                cfg.env.height, log=log))
            services = [ServiceSpec(es.url, es.token)]
        return asyncio.run(run_async(cfg, llm, services, tiny=tiny))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agentenv run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (see configs/default.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set scheduler.rollout_n=4 (repeatable)")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.set)
    except ValueError as e:
        print(f"agentenv run: {e}", file=sys.stderr)
        return 2
    summary = run(cfg)
    print(json.dumps(summary))
    if summary.get("error"):
        print(f"agentenv run: stopped early: {summary['error']}", file=sys.stderr)
        return 1
    return 0
