"""What ``agentenv run`` checks before it admits work, so a typo fails in seconds, not after it
has consumed the task queue:

- the task source (before any service is started): it exists, yields tasks, the ids asked for
  exist, not every task is broken; tasks that miss something on this machine (an app, a setup
  type, an evaluator function, an uncached file offline) are named in a warning
  (``agentenv tasks check`` says the same per file);
- the run directory: a new one per run (``<root>/<stamp>``, ``<root>/latest`` pointing at it);
  continuing an earlier one is an explicit choice (``--resume [DIR]``), and an explicit
  ``output.dir`` that already holds trajectories is refused without it;
- the model service (before desktops are started): every endpoint answers ``/v1/models`` and
  serves the model asked for;
- the desktops: every one answers; a dead one is replaced before the first lease.

Each failure raises ``PreflightError`` with a message that says what to fix.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from agentenv.config import OutputConfig, TaskConfig

if TYPE_CHECKING:
    from agentenv.rollout.llm import LLM


class PreflightError(RuntimeError):
    """The run cannot start; the message says why and what to change."""


# ----------------------------------------------------------------------------- tasks

def check_tasks(t: TaskConfig, osworld_like: bool = True) -> list[Any]:
    """The task items of the run (``load_items``), or PreflightError when the source is unusable.
    ``osworld_like``: the run's desktops are sandboxed (they look like OSWorld's VM from inside)."""
    from agentenv.rollout.sources import BrokenTask, TaskSource, load_items

    try:
        items = load_items(t.source)
    except Exception as e:  # noqa: BLE001 - a file of the wrong kind raises whatever its reader raises
        raise PreflightError(f"task source {t.source!r} cannot be read: {e} (tasks.source: builtin, a task JSON "
                             "file, a folder, .jsonl or .parquet)") from e
    if not items:
        raise PreflightError(f"task source {t.source!r} holds no task")
    by_id = {i.id for i in items}  # unique: load_items renames duplicates (sources.dedupe_ids)
    if t.ids:
        unknown = sorted(set(t.ids) - set(by_id))
        if unknown:
            raise PreflightError(f"tasks.ids names tasks that {t.source!r} does not have: {unknown[:10]}")
    try:
        chosen = TaskSource.from_config(t, items).items
    except ValueError as e:
        raise PreflightError(f"tasks: {e}") from e
    if not chosen:
        raise PreflightError(f"no task left after tasks.ids / limit / rank {t.rank} of {t.world_size}")
    broken = [i for i in chosen if isinstance(i, BrokenTask)]
    if len(broken) == len(chosen):
        reasons = "; ".join(b.reason for b in broken[:3])
        raise PreflightError(f"every task of {t.source!r} is broken: {reasons}")
    warn_missing(chosen, osworld_like)
    return items


def warn_missing(items: list[Any], osworld_like: bool = True) -> list[Any]:
    """Tasks that will fail at setup or scoring on this machine, in one warning before the run
    (they still run: each ends as a recorded task or evaluator error)."""
    from loguru import logger

    from agentenv.envs.tasks.check import check_task
    from agentenv.envs.tasks.cache import DownloadCache
    from agentenv.types import Task

    cache = DownloadCache.from_config()
    reports = [check_task(i, Path(i.source or i.id), Path(i.source or ".").parent, cache, osworld_like)
               for i in items if isinstance(i, Task)]
    bad = [r for r in reports if r.status == "missing" or (r.status == "needs_fetch" and cache.offline)]
    if bad:
        logger.warning("{} of {} tasks miss something on this machine (`agentenv tasks check` lists each): {}",
                       len(bad), len(reports), "; ".join(f"{r.id}: {', '.join(r.missing)}" for r in bad[:5]))
    return bad


# ----------------------------------------------------------------------------- run directory

def _has_trajectories(d: Path) -> bool:
    return (d / "trajectories.parquet").exists() or any((d / "parts").glob("*.parquet"))


def check_output(out: OutputConfig) -> Path | None:
    """Refuse an output choice that cannot work, before anything starts; the directory when it is
    fixed by the config (``resume`` or ``dir``), None when the run will get a new one."""
    if out.resume:
        d = Path(out.root) / "latest" if out.resume == "latest" else Path(out.resume)
        if not d.is_dir():
            raise PreflightError(f"--resume {out.resume}: {d} is not a run directory")
        return d.resolve()
    if out.dir:
        d = Path(out.dir)
        if d.is_dir() and _has_trajectories(d):
            raise PreflightError(f"{d} already holds trajectories of an earlier run: pass --resume {d} to "
                                 "continue it, or choose a new output.dir")
        return d
    return None


def prepare_run_dir(out: OutputConfig, now: float | None = None) -> Path:
    """The directory this run writes to (created). See the module docstring."""
    fixed = check_output(out)
    if fixed is not None:
        fixed.mkdir(parents=True, exist_ok=True)
        return fixed
    root = Path(out.root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    d, n = root / stamp, 1
    while True:
        try:
            d.mkdir()
            break
        except FileExistsError:  # two runs in one second
            n += 1
            d = root / f"{stamp}-{n}"
    latest = root / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = root / f".latest-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(d.name)
        os.replace(tmp, latest)  # atomic: latest never points nowhere
    return d


# ----------------------------------------------------------------------------- services

async def _models(url: str, api_key: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0)) as http:
            r = await http.get(url.rstrip("/") + "/models", headers=headers)
    except httpx.ConnectError as e:
        raise PreflightError(f"no model server answers at {url} ({e or 'connection refused'}): start one "
                             "(scripts/start_vllm_service.sh) or fix llm.url / VLLM_SERVER_URL") from e
    except httpx.HTTPError as e:
        raise PreflightError(f"the model server at {url} did not answer: {type(e).__name__}: {e}") from e
    if r.status_code in (401, 403):
        raise PreflightError(f"the model server at {url} refused us (HTTP {r.status_code}): check VLLM_API_KEY")
    if r.status_code != 200:
        raise PreflightError(f"{url}/models answered HTTP {r.status_code}: is this an OpenAI-compatible server? "
                             f"{r.text[:200]}")
    try:
        return [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PreflightError(f"{url}/models did not answer a model list: {r.text[:200]}") from e


async def check_llm(llm: LLM, model: str | None) -> None:
    """Every endpoint of a ServiceLLM answers and serves ``model`` (when one is named).
    In-process engines have no endpoints and need no check."""
    endpoints = llm.endpoints
    if not endpoints:
        return
    served = await asyncio.gather(*(_models(u, llm.api_key(u)) for u in endpoints))
    if model:
        for url, names in zip(endpoints, served):
            if model not in names:
                raise PreflightError(f"the model server at {url} does not serve {model!r} (it serves {names}): "
                                     "fix llm.model / VLLM_MODEL_NAME")


async def check_desktops(pool: Any) -> None:
    """Lease every desktop once and give it back: the pool checks each one and replaces a dead
    one (or loses it). No desktop left: PreflightError."""
    from agentenv.envs.pool import EnvPoolExhausted

    envs = []
    try:
        for _ in range(pool.size):
            envs.append(await pool.acquire())
    except EnvPoolExhausted as e:
        raise PreflightError(f"no desktop answers: {e}") from e
    for env in envs:
        await pool.release(env)
    if pool.size == 0:
        raise PreflightError("no desktop answers its health check, and none could be replaced")
