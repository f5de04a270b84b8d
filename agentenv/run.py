"""``agentenv run``: the main job. Tasks -> streaming scheduler -> trajectories on disk.

    agentenv run [--config run.yaml] [--set section.key=value ...] [--resume [DIR]] [--ray [ADDRESS]]

Each run writes to a new directory, runs/<stamp> (runs/latest points at it); --resume continues
runs/latest, or DIR: what is on disk is skipped, trajectories that ended by an infrastructure
failure run again. Before any work is admitted it checks the task source (before starting any
service), the model server and the desktops, and stops with a message that says what to fix.

With no services configured it starts what it needs on loopback (the tiny model on vLLM, an env
service with ``env.local_desktops`` desktops) and stops them at the end; they are tied to this
process and end with it, however it ends. With ``--ray`` (the ``ray`` section) the desktops are
env services on the Ray cluster's nodes that advertise ``ray.resource`` (and, with
``ray.vllm_actors``, the model servers are Ray actors too), found and watched by
``agentenv.integrations.ray``: a node or server lost mid-run costs reruns or a wait, not
trajectories. With ``tasks.world_size`` > 1 each scheduler uses its share of the env services:
rank 0 starts them all, the others attach (``ray.attach``). SIGINT/SIGTERM: stop admitting, let trajectories in
flight finish, flush, exit; a second signal abandons them (they rerun on --resume). While
starting, a signal stops what was started and exits.
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
from pydantic import ValidationError

from agentenv.compat import side_task
from agentenv.config import RunConfig, load_config
from agentenv.envs.client import EnvError
from agentenv.config import ServiceConfig
from agentenv.envs.pool import EnvPool
from agentenv.preflight import (PreflightError, check_desktops, check_llm, check_output, check_tasks,
                                prepare_run_dir)
from agentenv.rollout.buffer import TrajectoryBuffer
from agentenv.rollout.llm import as_llm
from agentenv.rollout.loop import Rollout
from agentenv.rollout.scheduler import StreamingScheduler
from agentenv.rollout.sources import TaskSource
from agentenv.view.live import serve_live
from agentenv.view.runinfo import record_run


def build_scheduler(cfg: RunConfig, llm: Any, pool: EnvPool, *, tiny: bool = False,
                    items: list[Any] | None = None) -> StreamingScheduler:
    """Everything but the services: rollout (agent, sampling, limits), buffer, source, scheduler."""
    buffer = TrajectoryBuffer.from_config(cfg)
    source = TaskSource.from_config(cfg.tasks, items)
    return StreamingScheduler(Rollout.from_config(cfg, llm, tiny=tiny), pool, buffer, source, cfg.scheduler)


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


async def run_async(cfg: RunConfig, llm: Any, services: list[ServiceConfig], *, tiny: bool = False,
                    items: list[Any] | None = None, fleet: Any = None) -> dict:
    """``fleet``: a started ``RayFleet`` whose services are among ``services`` (and whose vLLM
    actors serve ``llm``, if it has any); it is watched while the scheduler runs (lost services and
    model servers out, returning ones back in)."""
    try:
        pool = await EnvPool(services, timeout_s=cfg.loop.step_timeout_s).start()
    except EnvError as e:
        raise PreflightError(f"the env service does not serve desktops: {e} (check env.services / "
                             "ENV_SERVER_URL and ENV_TOKEN)") from e
    try:
        await check_desktops(pool)
    except BaseException:
        await pool.aclose()
        raise
    sched = build_scheduler(cfg, llm, pool, tiny=tiny, items=items)
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
        async with side_task(_progress(sched, total, cfg.progress), "progress bar"), \
                serve_live(sched, cfg.output.live_port, cfg.output.dir), \
                (fleet.watching(pool, sched.llm) if fleet is not None else contextlib.nullcontext()):
            summary = await sched.run()
    except asyncio.CancelledError:
        summary = {**sched.summary(), "abandoned": True}
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await pool.aclose()
        await sched.llm.aclose()
    try:
        path = sched.buffer.compact()
        summary["output"] = str(path) if path else None
    except OSError as e:  # a full disk: the part files are whole and read back as they are
        logger.error("could not merge the part files: {}", e)
        summary["output"] = str(Path(cfg.output.dir, "parts"))
        summary.setdefault("error", f"could not merge the part files: {e}")
    summary["llm_endpoints"] = sched.llm.stats()  # calls served by each model server in use at the end
    if fleet is not None:
        summary["ray"] = fleet.report()
    summary["stopped_early"] = sched.stopping
    summary["run_dir"] = cfg.output.dir
    with contextlib.suppress(OSError):
        Path(cfg.output.dir, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class Interrupted(Exception):
    """SIGINT/SIGTERM while the run was starting."""


@contextlib.contextmanager
def _signals_interrupt():
    """While starting (no event loop yet): a signal raises Interrupted, so what was started is
    stopped on the way out. The event loop installs its own handlers for the run itself."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(cfg: RunConfig) -> dict:
    """Check, start, run, stop. Raises PreflightError (nothing was admitted) or Interrupted."""
    from agentenv.services import EnvService, VLLMService

    items = check_tasks(cfg.tasks, osworld_like=cfg.env.serve.sandbox)        # before any service: a typo fails in a second
    check_output(cfg.output)
    cfg = _with_task_folder(cfg)
    with _signals_interrupt(), contextlib.ExitStack() as stack:
        fleet, specs, endpoints = None, [], []
        rank, world_size = cfg.tasks.rank, cfg.tasks.world_size
        if cfg.ray.address:
            fleet = _join_ray(cfg, stack)
            if cfg.ray.attach:  # another scheduler (rank 0) started them: our share, and its model servers
                specs = _ray_setup(fleet.attach, rank, world_size, vllm=cfg.llm.url is None)
                endpoints = fleet.llm_endpoints()
            elif cfg.llm.url is None and cfg.ray.vllm_actors:
                endpoints = _ray_setup(fleet.start_vllm)
        tiny = cfg.llm.url is None or (cfg.llm.model or "").startswith("tiny-uitars")
        keys: dict[str, str] = {}
        if cfg.llm.url is None and endpoints:
            url, model = [e.url for e in endpoints], cfg.llm.model or endpoints[0].model
            keys = {e.url: e.api_key for e in endpoints}
            tiny = model.startswith("tiny-uitars")
        elif cfg.llm.url is None:
            svc = stack.enter_context(VLLMService(port=cfg.llm.port))
            url, model = svc.url, svc.model
        else:
            url, model = cfg.llm.url, cfg.llm.model
        llm: Any = as_llm(url, model=model, timeout_s=cfg.llm.timeout_s, max_retries=cfg.llm.max_retries,
                          **({"api_key": keys} if keys else {}))
        asyncio.run(check_llm(llm, model))     # before the desktops: a dead URL fails in seconds
        run_dir = prepare_run_dir(cfg.output)
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(run_dir)})})
        if cfg.output.max_ready_groups is None:  # no trainer takes groups here: hold none in memory
            cfg.output.max_ready_groups = 0
        logger.info("run directory: {}", run_dir)
        services = list(cfg.env.services)
        if fleet is not None:
            if not cfg.ray.attach:
                specs = _ray_setup(fleet.start, rank, world_size)
            services += specs
        elif not services:
            es = stack.enter_context(EnvService(cfg.env.local_desktops, cfg.env.local_port, cfg.env.serve,
                                                log=run_dir / "env-service.log"))
            services = [ServiceConfig(url=es.url, token=es.token)]
        return asyncio.run(run_async(cfg, llm, services, tiny=tiny, items=items, fleet=fleet))


def _with_task_folder(cfg: RunConfig) -> RunConfig:
    """The run's config with the task files' own folder among the upload roots of the env services
    it starts (local or on Ray): their upload_file steps read files beside them."""
    src = Path(cfg.tasks.source)
    if cfg.tasks.source == "builtin" or not src.exists():
        return cfg
    serve = cfg.env.serve
    roots = [*serve.upload_roots, str((src if src.is_dir() else src.parent).resolve())]
    env = cfg.env.model_copy(update={"serve": serve.model_copy(update={"upload_roots": roots})})
    return cfg.model_copy(update={"env": env})


def _join_ray(cfg: RunConfig, stack: contextlib.ExitStack) -> Any:
    """Join the cluster; the fleet of this run's actors, stopped on the way out (then Ray)."""
    import ray

    from agentenv.integrations.ray import RayFleet, init_ray

    try:
        init_ray(cfg.ray, cfg.env.local_desktops)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PreflightError(f"cannot join the Ray cluster at {cfg.ray.address!r}: {e}") from e
    stack.callback(ray.shutdown)
    fleet = RayFleet(cfg.ray, cfg.env)
    stack.callback(fleet.shutdown)
    return fleet


def _ray_setup(step: Any, *args: Any, **kw: Any) -> Any:
    """A fleet's start or attach, its failure said as a preflight error."""
    from agentenv.integrations.ray import RaySetupError

    try:
        return step(*args, **kw)
    except RaySetupError as e:
        raise PreflightError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agentenv run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (see configs/default.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set scheduler.rollout_n=4 (repeatable)")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                    help="continue a run: runs/latest, or DIR (its finished trajectories are skipped)")
    ap.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                    help="desktops on a Ray cluster: the one this machine joined (auto), HOST:PORT, or local "
                         "(one of our own); nodes with desktops advertise the resource ray.resource")
    a = ap.parse_args(argv)
    extra = ([f"output.resume={a.resume}"] if a.resume else []) + ([f"ray.address={a.ray}"] if a.ray else [])
    try:
        cfg = load_config(a.config, a.set + extra)
    except (ValueError, ValidationError) as e:
        print(f"agentenv run: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except PreflightError as e:
        print(f"agentenv run: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"agentenv run: {e} while starting; everything it had started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a local service that would not start
        print(f"agentenv run: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    if summary.get("error"):
        print(f"agentenv run: stopped early: {summary['error']}", file=sys.stderr)
        return 1
    return 0
