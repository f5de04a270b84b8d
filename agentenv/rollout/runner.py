"""One trajectory on a leased desktop: the policy every driver shares (the streaming scheduler,
the verl agent loop).

``run_leased`` runs the trajectory within ``scheduler.trajectory_timeout_s``; when its desktop dies
(``EnvDeadError``) that desktop goes back broken and the trajectory reruns on another, up to
``scheduler.env_retries`` times, each failure recorded in the reason ("rerun after: ..."). Whatever
else goes wrong ends the trajectory with a status and a reason, never the caller; the desktop in
hand goes back to the pool in ``finally``, cancelled or not.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from loguru import logger

from agentenv.compat import timeout
from agentenv.config import SchedulerConfig
from agentenv.envs.client import AsyncDesktopEnv, EnvDeadError, EnvError
from agentenv.envs.pool import EnvPool, EnvPoolExhausted
from agentenv.rollout.llm import LLMError
from agentenv.rollout.loop import Rollout, run_trajectory
from agentenv.types import Status, Task, Trajectory


async def run_leased(traj: Trajectory, task: Task, pool: EnvPool, rollout: Rollout, limits: SchedulerConfig, *,
                     env: AsyncDesktopEnv | None = None,
                     released: Callable[[str], None] | None = None) -> Trajectory:
    """Fill ``traj`` on desktops of ``pool`` and set its ``ended_at``. ``env``: a desktop the caller
    leased already (the scheduler admits by free desktops); without one, one is leased here, and a
    pool with none left raises ``EnvPoolExhausted`` (nothing ran: the caller decides). ``released``
    is told the name of each desktop given back."""
    if env is None:
        env = await pool.acquire()
    failures: list[str] = []

    async def give_back(desktop: AsyncDesktopEnv, broken: bool = False) -> None:
        await pool.release(desktop, broken=broken)
        if released is not None:
            released(desktop.name)

    try:
        while env is not None:
            try:
                async with timeout(limits.trajectory_timeout_s):
                    await run_trajectory(traj, task, env, rollout)
                break
            except asyncio.TimeoutError:
                traj.status = Status.TIMEOUT
                traj.reason = f"trajectory exceeded {limits.trajectory_timeout_s}s"
                break
            except EnvDeadError as e:
                failures.append(f"attempt {traj.attempts} on {env.name}: {e}")
                logger.warning("desktop {} died during {}#{}: {}", env.name, traj.task_id, traj.sample, e)
                dead, env = env, None
                await give_back(dead, broken=True)
                if traj.attempts > limits.env_retries:
                    traj.status, traj.reason = Status.ENV_ERROR, f"desktop failed {traj.attempts} times"
                    break
                traj.attempts += 1
                env = await _lease_for_rerun(pool)
                if env is None:
                    traj.status, traj.reason = Status.ENV_ERROR, "no desktop left for a rerun"
            except EnvError as e:  # the env service refused something mid-trajectory
                traj.status, traj.reason = Status.ENV_ERROR, str(e)
                break
            except LLMError as e:  # raised outside a step (never expected): still one trajectory's failure
                traj.status, traj.reason = Status.LLM_ERROR, str(e)
                break
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug must end this trajectory, not every trajectory in flight
        logger.opt(exception=e).error("trajectory {}#{} failed unexpectedly", traj.task_id, traj.sample)
        traj.status, traj.reason = Status.ERROR, f"{type(e).__name__}: {e}"
    finally:
        if env is not None:
            await asyncio.shield(give_back(env))
    if failures:
        traj.reason += "; rerun after: " + " | ".join(failures)
    traj.ended_at = time.time()
    return traj


async def _lease_for_rerun(pool: EnvPool) -> AsyncDesktopEnv | None:
    try:
        return await pool.acquire()
    except EnvPoolExhausted as e:
        logger.error("no desktop for a rerun: {}", e)
        return None
