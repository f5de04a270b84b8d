"""StreamingScheduler: many trajectories in flight, each at its own pace.

Admission is driven by free desktops: whenever the pool has one, the next (task, sample) starts
on it. Samples of a group are independent trajectories (their own desktop, their own model calls);
the group completes in the buffer. Nothing waits for a group's slowest sample, model calls are
concurrent across everyone, and a desktop goes back to the pool the moment its trajectory ends.

Structured concurrency: ``run()`` owns every task it starts (one ``asyncio.TaskGroup``); it runs in
the caller's event loop, cancels nothing it does not own, and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from agentenv._compat import TaskGroup, timeout
from agentenv.envs.client import AsyncDesktopEnv, EnvDeadError, EnvError
from agentenv.envs.pool import EnvPool
from agentenv.rollout.agent import Agent
from agentenv.rollout.buffer import TrajectoryBuffer
from agentenv.rollout.llm import LLM, Sampling
from agentenv.rollout.loop import LoopSettings, run_trajectory
from agentenv.rollout.sources import BrokenTask, TaskSource
from agentenv.types import Status, Trajectory


@dataclass
class SchedulerSettings:
    rollout_n: int = 2
    max_steps: int = 15
    max_invalid_in_row: int = 3
    step_timeout_s: float = 120.0
    trajectory_timeout_s: float = 1800.0
    env_retries: int = 2
    max_llm_in_flight: int = 64
    max_rps: float | None = None


@dataclass
class Event:
    t: float
    kind: str          # admit | release | done | group
    key: str
    sample: int = -1
    env: str = ""


@dataclass
class Stats:
    started: float | None = None
    steps: int = 0
    llm_in_flight: int = 0
    admitted: int = 0
    events: list[Event] = field(default_factory=list)


class StreamingScheduler:
    def __init__(self, llm: LLM, pool: EnvPool, agent: Agent, buffer: TrajectoryBuffer, source: TaskSource,
                 sampling: Sampling | None = None, settings: SchedulerSettings | None = None,
                 policy_version: int = 0):
        self.llm, self.pool, self.agent, self.buffer, self.source = llm, pool, agent, buffer, source
        self.sampling = sampling or Sampling()
        self.s = settings or SchedulerSettings()
        if self.s.rollout_n != buffer.rollout_n:
            raise ValueError(f"rollout_n {self.s.rollout_n} != buffer's {buffer.rollout_n}")
        self.policy_version = policy_version
        self.stats = Stats()
        self._llm_sem: asyncio.Semaphore | None = None
        self._throttle: Any = None
        self._unpaused: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._running = False

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """No new model calls start until ``resume``; calls in flight finish."""
        if self._unpaused is not None:
            self._unpaused.clear()

    def resume(self, policy_version: int | None = None) -> None:
        if policy_version is not None:
            self.policy_version = policy_version
            self.buffer.set_policy_version(policy_version)
        if self._unpaused is not None:
            self._unpaused.set()

    def stop(self) -> None:
        """Stop admitting; trajectories in flight finish (cancel ``run()`` to abandon them)."""
        if self._stop is not None:
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    # ------------------------------------------------------------------ internals
    def _llm_slot(self) -> "_LLMSlot":
        return _LLMSlot(self)

    @staticmethod
    def _now() -> float:
        # The event loop's clock: monotonic in production, virtual in the simulation benchmark.
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    def _event(self, kind: str, key: str, sample: int = -1, env: str = "") -> None:
        self.stats.events.append(Event(self._now(), kind, key, sample, env))

    async def _acquire(self) -> AsyncDesktopEnv | None:
        """A free desktop, or None once stop() was called."""
        acquire = asyncio.ensure_future(self.pool.acquire())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            env = acquire.result()
            if self.stopping:
                await self.pool.release(env)
                return None
            return env
        return None

    async def _run_one(self, key: str, task: Any, sample: int, env: AsyncDesktopEnv) -> None:
        traj = Trajectory(task_id=key, sample=sample, started_at=time.time())
        failures: list[str] = []
        settings = LoopSettings(self.s.max_steps, self.s.max_invalid_in_row, self.s.step_timeout_s)
        try:
            while True:
                try:
                    async with timeout(self.s.trajectory_timeout_s):
                        await run_trajectory(
                            traj, task, env, self.llm, self.agent, self.sampling, settings,
                            llm_slot=self._llm_slot, policy_version=lambda: self.policy_version,
                            save_screenshot=self.buffer.screenshot_path if self.buffer.save_screenshots else None)
                    break
                except asyncio.TimeoutError:
                    traj.status = Status.TIMEOUT
                    traj.reason = f"trajectory exceeded {self.s.trajectory_timeout_s}s"
                    break
                except EnvDeadError as e:
                    failures.append(f"attempt {traj.attempts} on {env.name}: {e}")
                    logger.warning("desktop {} died during {}#{}: {}", env.name, key, sample, e)
                    await self.pool.release(env, broken=True)
                    self._event("release", key, sample, env.name)
                    env = None
                    if traj.attempts > self.s.env_retries:
                        traj.status = Status.ENV_ERROR
                        traj.reason = f"desktop failed {traj.attempts} times"
                        break
                    traj.attempts += 1
                    env = await self._acquire_for_rerun()
                    if env is None:
                        traj.status, traj.reason = Status.ENV_ERROR, "no desktop left for a rerun"
                        break
        finally:
            if env is not None:
                await asyncio.shield(self.pool.release(env))
                self._event("release", key, sample, env.name)
        if failures:
            traj.reason += "; rerun after: " + " | ".join(failures)
        traj.ended_at = time.time()
        self._finish(traj)

    async def _acquire_for_rerun(self) -> AsyncDesktopEnv | None:
        try:
            return await self.pool.acquire()
        except EnvError as e:  # the pool lost every desktop
            logger.error("no desktop for a rerun: {}", e)
            return None

    def _finish(self, traj: Trajectory) -> None:
        group = self.buffer.add(traj)
        self._event("done", traj.task_id, traj.sample)
        if group is not None:
            self._event("group", group.task_id)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> dict[str, Any]:
        """Run until the source is exhausted or stop() is called; returns a summary."""
        if self._running:
            raise RuntimeError("this scheduler is already running")
        self._running = True
        self._llm_sem = asyncio.Semaphore(self.s.max_llm_in_flight)
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._stop = asyncio.Event()
        if self.s.max_rps:
            from asyncio_throttle import Throttler

            self._throttle = Throttler(rate_limit=self.s.max_rps, period=1.0)
        self.buffer.set_policy_version(self.policy_version)
        self.stats.started = self._now()
        done = self.buffer.done_keys()
        try:
            async with TaskGroup() as tg:
                for key, item in self.source:
                    if self.stopping:
                        break
                    samples = [i for i in range(self.s.rollout_n) if (key, i) not in done]
                    if isinstance(item, BrokenTask):
                        for i in samples:
                            now = time.time()
                            self._finish(Trajectory(task_id=key, sample=i, status=Status.TASK_ERROR,
                                                    reason=item.reason, started_at=now, ended_at=now))
                        continue
                    for i in samples:
                        env = await self._acquire()
                        if env is None:
                            break
                        self.stats.admitted += 1
                        self._event("admit", key, i, env.name)
                        tg.create_task(self._run_one(key, item, i, env), name=f"traj:{key}#{i}")
        finally:
            self._running = False
        return self.summary()

    def summary(self) -> dict[str, Any]:
        elapsed = self._now() - self.stats.started if self.stats.started is not None else 0.0
        b = self.buffer
        rewards = b.rewards
        return {
            "trajectories": b.trajectories_done, "groups": b.groups_done, "statuses": dict(b.statuses),
            "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
            "success_rate": sum(r >= 1.0 for r in rewards) / len(rewards) if rewards else 0.0,
            "steps": self.stats.steps, "elapsed_s": round(elapsed, 2),
            "steps_per_s": round(self.stats.steps / elapsed, 3) if elapsed else 0.0,
            "env_pool": self.pool.stats(), "dropped_stale": b.dropped_stale,
            "policy_version": self.policy_version,
        }


class _LLMSlot:
    """Entry to a model call: not paused, under the in-flight cap and the rate cap.
    A plain class, not @asynccontextmanager: it runs once per step."""

    __slots__ = ("s",)

    def __init__(self, sched: StreamingScheduler):
        self.s = sched

    async def __aenter__(self) -> None:
        s = self.s
        if not s._unpaused.is_set():
            await s._unpaused.wait()
        await s._llm_sem.acquire()
        if s._throttle is not None:
            async with s._throttle:
                pass
        s.stats.llm_in_flight += 1

    async def __aexit__(self, *exc: object) -> None:
        s = self.s
        s.stats.llm_in_flight -= 1
        s.stats.steps += 1
        s._llm_sem.release()
