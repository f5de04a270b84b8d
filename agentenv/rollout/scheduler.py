"""StreamingScheduler: many trajectories in flight, each at its own pace.

Admission is driven by free desktops: whenever the pool has one, the next (task, sample) starts
on it. Samples of a group are independent trajectories (their own desktop, their own model calls);
the group completes in the buffer. Nothing waits for a group's slowest sample, model calls are
concurrent across everyone, and a desktop goes back to the pool the moment its trajectory ends.

Structured concurrency: ``run()`` owns every task it starts (one ``asyncio.TaskGroup``); it runs in
the caller's event loop, cancels nothing it does not own, and leaves nothing behind. Each
trajectory is a failure boundary: whatever goes wrong in one ends that trajectory with a status and
a reason, never the run.

Faults: a desktop that dies is replaced and its trajectory rerun (``env_retries``; the policy is
``runner.run_leased``, which the verl agent loop shares); when every desktop is lost, admission
stops and ``run()`` returns with ``error`` in its summary; when a trajectory ends because the
model service is unavailable, admission waits until the service answers its health check again
instead of burning the queue (and stops, with ``error``, once the LLM says every server is gone for
good: ``LLM.exhausted``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Protocol, TypeVar

from loguru import logger

from agentenv.compat import TaskGroup
from agentenv.config import SchedulerConfig
from agentenv.envs.client import AsyncDesktopEnv
from agentenv.envs.pool import EnvPool, EnvPoolExhausted
from agentenv.rollout.buffer import TrajectoryBuffer
from agentenv.rollout.llm import LLM, LLMNoEndpointError
from agentenv.rollout.loop import Rollout
from agentenv.rollout.runner import run_leased
from agentenv.rollout.sources import BrokenTask, TaskSource
from agentenv.types import Status, Trajectory

T = TypeVar("T")
EVENT_WINDOW = 100_000  # events kept in memory: a week-long run must not grow without bound


class SchedulerListener(Protocol):
    """What a scheduler tells its ``listeners`` (the live page, say) as a run goes."""

    def on_screenshot(self, traj: Trajectory, name: str, path: str) -> None: ...

    def on_finished(self, traj: Trajectory) -> None: ...


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
    events: collections.deque[Event] = field(default_factory=lambda: collections.deque(maxlen=EVENT_WINDOW))


class StreamingScheduler:
    def __init__(self, rollout: Rollout, pool: EnvPool, buffer: TrajectoryBuffer, source: TaskSource,
                 config: SchedulerConfig | None = None, *, policy_version: int = 0):
        self.pool, self.buffer, self.source = pool, buffer, source
        self.config = config or SchedulerConfig()
        self.rollout = dataclasses.replace(
            rollout, llm_slot=self._llm_slot, policy_version=lambda: self.policy_version,
            save_screenshot=self._save_screenshot if buffer.save_screenshots else None)
        self.listeners: list[SchedulerListener] = []
        self.policy_version = policy_version
        self.stats = Stats()
        self.error: str | None = None
        self._llm_sem = asyncio.Semaphore(self.config.max_llm_in_flight)
        self._throttle: Any = None
        if self.config.max_rps:
            from asyncio_throttle import Throttler

            self._throttle = Throttler(rate_limit=self.config.max_rps, period=1.0)
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._idle = asyncio.Event()  # set while no model call is in flight
        self._idle.set()
        self._stop = asyncio.Event()
        self._llm_suspect = False     # a trajectory just failed on the model service
        self._running = False

    @property
    def llm(self) -> LLM:
        return self.rollout.llm

    # ------------------------------------------------------------------ control
    async def pause(self) -> None:
        """Stop starting model calls and admitting trajectories; return once no model call is in
        flight, so weights can be swapped with nothing racing. Trajectories wait at their next step."""
        self._unpaused.clear()
        await self._idle.wait()

    def resume(self, policy_version: int | None = None) -> None:
        """Go on, recording ``policy_version`` on every step from now (and in the buffer's staleness)."""
        if policy_version is not None:
            self.policy_version = policy_version
            self.buffer.set_policy_version(policy_version)
        self._unpaused.set()

    async def update_weights(self, version: int, **how: Any) -> None:
        """New weights without stopping rollouts: the LLM swaps them one endpoint at a time
        (``ServiceLLM.update_weights(version, path=... | lora=...)``) while the others serve; each
        step records the version of the endpoint that produced it, and staleness counts from
        ``version`` once every endpoint serves it. An LLM that cannot do this (in-process, verl's
        server manager) is updated between ``await pause()`` and ``resume(version)`` instead."""
        await self.llm.update_weights(version, **how)  # TypeError from an LLM that cannot
        self.policy_version = version
        self.buffer.set_policy_version(version)

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def stop(self) -> None:
        """Stop admitting; trajectories in flight finish (cancel ``run()`` to abandon them)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

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

    async def _unless_stopped(self, aw: Awaitable[T]) -> tuple[bool, T | None]:
        """Await ``aw`` unless stop() comes first: (True, result) or (False, None)."""
        if self.stopping:
            if asyncio.iscoroutine(aw):
                aw.close()
            return False, None
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # both are ours: neither outlives this call
            for t in (stop, task):
                if not t.done():
                    t.cancel()
            await asyncio.gather(task, stop, return_exceptions=True)
        if task.done() and not task.cancelled():
            return True, task.result()
        return False, None

    async def _admit(self) -> AsyncDesktopEnv | None:
        """A desktop for the next trajectory once admission may go on; None once it may not
        (stop() was called, or every desktop is lost)."""
        while True:
            if not (await self._unless_stopped(self._unpaused.wait()))[0]:
                return None
            if self._llm_suspect and not await self._wait_for_llm():
                return None
            try:
                ok, env = await self._unless_stopped(self.pool.acquire())
            except EnvPoolExhausted as e:
                self.error = str(e)
                logger.error("no desktop left: admission stops ({})", e)
                return None
            if not ok:
                return None
            if self.paused or self.stopping or self._llm_suspect:  # things changed while we waited
                await self.pool.release(env)
                continue
            return env

    async def _wait_for_llm(self) -> bool:
        """After a trajectory failed on the model service: admit nothing until it answers again."""
        self._llm_suspect = False
        warned = False
        while not self.stopping:
            if await self.llm.ready():
                if warned:
                    logger.info("the model service answers again; admission resumes")
                return True
            if self.llm.exhausted:
                self.error = "every model server was lost and none is expected back"
                logger.error("{}: admission stops", self.error)
                return False
            if not warned:
                logger.warning("the model service does not answer: admission paused until it does")
                warned = True
            await self._unless_stopped(asyncio.sleep(self.config.llm_wait_s))
        return False

    async def _run_one(self, key: str, task: Any, sample: int, env: AsyncDesktopEnv) -> None:
        traj = Trajectory(task_id=key, sample=sample, started_at=time.time())
        await run_leased(traj, task, self.pool, self.rollout, self.config, env=env,
                         released=lambda name: self._event("release", key, sample, name))
        self._finish(traj)

    def _save_screenshot(self, traj: Trajectory, name: str, png: bytes) -> str:
        path = self.buffer.screenshot_path(traj, name, png)
        self._tell("on_screenshot", traj, name, path)
        return path

    def _tell(self, what: str, *args: Any) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, what)(*args)
            except Exception as e:  # an observer must never break a trajectory
                logger.opt(exception=e).warning("scheduler listener {} failed in {}", type(listener).__name__, what)

    def _finish(self, traj: Trajectory) -> None:
        if traj.status == Status.LLM_ERROR:
            self._llm_suspect = True
        try:
            group = self.buffer.add(traj)
        except OSError as e:  # the disk is full or gone: what is on disk stays whole; stop here
            if self.error is None:
                self.error = f"cannot write trajectories to {self.buffer.dir}: {e}"
                logger.error("{}; admission stops (a rerun with --resume finishes the rest)", self.error)
            self.stop()
            return
        except ValueError as e:  # the same (task, sample) twice: a bug, never a second row
            logger.error("{}", e)
            return
        self._event("done", traj.task_id, traj.sample)
        if group is not None:
            self._event("group", group.task_id)
        self._tell("on_finished", traj)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> dict[str, Any]:
        """Run until the source is exhausted, stop() is called or no desktop is left; returns a summary."""
        if self._running:
            raise RuntimeError("this scheduler is already running")
        self._running = True
        self.buffer.set_policy_version(self.policy_version)
        self.stats.started = self._now()
        done = self.buffer.done_keys()
        try:
            async with TaskGroup() as tg:
                for key, item in self.source:
                    samples = [i for i in range(self.buffer.rollout_n) if (key, i) not in done]
                    if isinstance(item, BrokenTask):
                        for i in samples:
                            now = time.time()
                            self._finish(Trajectory(task_id=key, sample=i, status=Status.TASK_ERROR,
                                                    reason=item.reason, started_at=now, ended_at=now))
                        continue
                    admitting = True
                    for i in samples:
                        env = await self._admit()
                        if env is None:
                            admitting = False
                            break
                        self.stats.admitted += 1
                        self._event("admit", key, i, env.name)
                        tg.create_task(self._run_one(key, item, i, env), name=f"traj:{key}#{i}")
                    if not admitting:
                        break
        finally:
            self._running = False
        return self.summary()

    def summary(self) -> dict[str, Any]:
        elapsed = self._now() - self.stats.started if self.stats.started is not None else 0.0
        b = self.buffer
        n = b.trajectories_done
        out = {
            "trajectories": n, "groups": b.groups_done, "statuses": dict(b.statuses),
            "mean_reward": b.reward_sum / n if n else 0.0,
            "success_rate": b.successes / n if n else 0.0,
            "steps": self.stats.steps, "elapsed_s": round(elapsed, 2),
            "steps_per_s": round(self.stats.steps / elapsed, 3) if elapsed else 0.0,
            "env_pool": self.pool.stats(), "dropped_stale": b.dropped_stale,
            "policy_version": self.policy_version,
        }
        if self.error:
            out["error"] = self.error
        return out


class _LLMSlot:
    """Entry to a model call: not paused, under the in-flight cap and the rate cap.
    A plain class, not @asynccontextmanager: it runs once per step."""

    __slots__ = ("s",)

    def __init__(self, sched: StreamingScheduler):
        self.s = sched

    async def __aenter__(self) -> None:
        s = self.s
        while not s._unpaused.is_set():
            await s._unpaused.wait()
        await s._llm_sem.acquire()
        if not s._unpaused.is_set():  # paused while waiting for the semaphore: wait again
            s._llm_sem.release()
            return await self.__aenter__()
        s.stats.llm_in_flight += 1  # from here on pause() waits for this call
        s._idle.clear()
        if s._throttle is not None:
            try:
                async with s._throttle:
                    pass
            except BaseException:  # cancelled before the call: __aexit__ will not run
                await self.__aexit__()
                s.stats.steps -= 1
                raise

    async def __aexit__(self, et: type[BaseException] | None = None, *exc: object) -> None:
        s = self.s
        s.stats.llm_in_flight -= 1
        if et is None or not issubclass(et, LLMNoEndpointError):  # no server to call: not a step; it goes again
            s.stats.steps += 1
        if s.stats.llm_in_flight == 0:
            s._idle.set()
        s._llm_sem.release()
