#!/usr/bin/env python
"""SIMULATION: scheduler designs compared on a simulated model server and simulated desktops.

Nothing here talks to a real server or desktop: a SIMULATED vLLM server (a fixed number of
sequence slots; prefill time that grows with image tokens; decode time per token that grows with
the batch) and SIMULATED desktops (reset/step times drawn from distributions; a small failure
rate) run on a virtual clock, so hours of rollout take seconds. The scheduler under test is the
real ``StreamingScheduler`` code, unchanged. On the same workload and seed it compares:

- ours: StreamingScheduler (admission by free desktop, independent samples);
- lock-step: the design we replace, emulated: concurrent tasks = desktops // rollout_n, each
  group's steps in lock-step, its model calls one after another, a desktop created and destroyed
  per task, completion polled every 5 s (the seed's design);
- lock-step+: the strongest lock-step: the group's model calls sent together, desktops reused, no
  polling; each step still waits for the whole group;
- sync batches: ours inside batches of groups; a batch must finish before the next starts (its
  steps counted, as ours are);
- the analytic throughput for the workload: the fixed point of Little's law with the server's
  latency curve, capped by the server's capacity (desktop-bound or server-bound, whichever is lower).

Settings: "local" desktops (reset/step medians from scripts/bench_envs.py on this machine) and
"vm" (OSWorld-like VM resets of 20-60 s). Then the scale run: 10,000 concurrent trajectories,
scheduler CPU time per step (simulation cost measured alone and subtracted) and memory per
in-flight trajectory (tracemalloc, images excluded).

    python scripts/bench_scheduler.py [--quick]

Last line: JSON with ratio_vs_bound, ratio_vs_lockstep, ratio_vs_lockstep_strong, ratio_vs_sync_batch (local setting) and
the scale figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.envs.client import EnvDeadError, Observation  # noqa: E402
from agentenv.rollout.agent import Agent, AgentState, register_agent  # noqa: E402
from agentenv.rollout.buffer import TrajectoryBuffer  # noqa: E402
from agentenv.rollout.llm import Completion, Sampling  # noqa: E402
from agentenv.config import LoopConfig, SchedulerConfig  # noqa: E402
from agentenv.rollout.loop import Rollout  # noqa: E402
from agentenv.rollout.scheduler import StreamingScheduler  # noqa: E402
from agentenv.rollout.sources import TaskSource  # noqa: E402
from agentenv.rollout.uitars import ParsedReply  # noqa: E402
from agentenv.types import Action, Task  # noqa: E402


# ----------------------------------------------------------------------------- virtual clock

class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer instead of sleeping (simulation only)."""

    def __init__(self) -> None:
        super().__init__()
        self._vt = 0.0

        def select(timeout=None):
            if timeout is None:
                raise RuntimeError("simulation deadlock: nothing scheduled and nothing ready")
            self._vt += max(0.0, timeout)
            return []

        self._selector.select = select  # type: ignore[method-assign]

    def time(self) -> float:
        return self._vt


def run_virtual(coro):
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# ----------------------------------------------------------------------------- workload

@dataclass
class Workload:
    name: str
    desktops: int = 32
    rollout_n: int = 4
    slots: int = 64                     # server sequence slots
    image_tokens: int = 1300
    prefill_s_per_token: float = 25e-6
    prefill_base_s: float = 0.02
    out_tokens: int = 60
    decode_s_per_token: float = 0.010
    decode_batch_slope: float = 1.0     # per-token time grows (1 + slope * batch/slots)
    reset_median_s: float = 0.6
    reset_range_s: tuple[float, float] | None = None   # uniform resets (VM setting)
    step_median_s: float = 0.1
    length_median: float = 6.0
    length_sigma: float = 0.7
    max_steps: int = 15
    fail_per_step: float = 0.005
    seed: int = 0
    _lengths: dict = field(default_factory=dict, repr=False)

    def reset_time(self, rng: random.Random) -> float:
        if self.reset_range_s:
            return rng.uniform(*self.reset_range_s)
        return self.reset_median_s * math.exp(rng.gauss(0, 0.3))

    def step_time(self, rng: random.Random) -> float:
        return self.step_median_s * math.exp(rng.gauss(0, 0.3))

    def length(self, key: str) -> int:
        if key in self._lengths:
            return self._lengths[key]
        r = random.Random(f"{self.seed}:{key}")
        n = max(1, min(self.max_steps, int(round(self.length_median * math.exp(r.gauss(0, self.length_sigma))))))
        self._lengths[key] = n
        return n

    def llm_time(self, batch: int) -> float:
        prefill = self.prefill_base_s + self.image_tokens * self.prefill_s_per_token
        per_tok = self.decode_s_per_token * (1 + self.decode_batch_slope * max(0, batch - 1) / self.slots)
        return prefill + self.out_tokens * per_tok

    @property
    def mean_reset(self) -> float:
        if self.reset_range_s:
            return sum(self.reset_range_s) / 2
        return self.reset_median_s * math.exp(0.3 ** 2 / 2)

    @property
    def mean_step(self) -> float:
        return self.step_median_s * math.exp(0.3 ** 2 / 2)

    def mean_length(self) -> float:
        return sum(self.length(f"t{i}#{s}") for i in range(500) for s in range(2)) / 1000


# ----------------------------------------------------------------------------- simulated parts

class SimServer:
    """SIMULATED vLLM server: slots, prefill, batch-dependent decode. Replies 'A' (act) until the
    trajectory's drawn length, then 'F' (finished)."""

    def __init__(self, w: Workload, token_ids: bool = True):
        self.w = w
        self.sem = asyncio.Semaphore(w.slots)
        self.active = 0
        self.busy_integral = 0.0
        self._last = 0.0
        self.calls: dict[str, int] = {}
        self.token_ids = token_ids

    def _account(self) -> None:
        now = asyncio.get_running_loop().time()
        self.busy_integral += self.active * (now - self._last)
        self._last = now

    async def chat(self, messages, sampling=None, *, session=None) -> Completion:
        key = (session or "").rsplit("#", 1)[0]
        n = self.calls.get(session, 0) + 1
        self.calls[session] = n
        async with self.sem:
            self._account()
            self.active += 1
            t = self.w.llm_time(self.active)
            await asyncio.sleep(t)
            self._account()
            self.active -= 1
        if n >= self.w.length(key):
            self.calls.pop(session, None)
        text = "F" if n >= self.w.length(key) else "A"
        if self.token_ids:
            return Completion(text=text, prompt_token_ids=list(range(self.w.image_tokens // 4)),
                              token_ids=list(range(1000, 1000 + self.w.out_tokens)), latency_s=t)
        return Completion(text=text, prompt_token_ids=[], token_ids=[], latency_s=t)

    async def aclose(self) -> None:
        return None


@register_agent("sim")
class SimAgent(Agent):
    """SIMULATION agent: no prompt rendering, 'A' -> click, 'F' -> finished."""

    def observe(self, state: AgentState, png: bytes) -> None:
        state.turns.append(None)  # type: ignore[arg-type]

    def record_reply(self, state, text):
        pass

    def messages(self, state):
        return []

    def parse(self, state, text):
        return ParsedReply("", [Action("finished") if text == "F" else Action("click", x=10, y=10)])


OBS = Observation(png=b"\x89PNG-sim", size=(28, 28), screen=(1920, 1080))


class SimDesktop:
    """SIMULATED desktop."""

    def __init__(self, pool: "SimPool", i: int):
        self.pool, self.name, self.id = pool, f"sim/{i}", str(i)
        self.screen = (1920, 1080)
        self.dead = False

    async def reset(self, task, image_size=None):
        await asyncio.sleep(self.pool.w.reset_time(self.pool.rng))
        return OBS

    async def step(self, action, image_size=None):
        await asyncio.sleep(self.pool.w.step_time(self.pool.rng))
        if self.pool.rng.random() < self.pool.w.fail_per_step:
            self.dead = True
            raise EnvDeadError(self.name, "simulated desktop death")
        return OBS, {}, action.is_terminal

    async def evaluate(self, task, last_action=None):
        return 1.0 if last_action == "finished" else 0.0

    async def alive(self):
        return not self.dead


class SimPool:
    """SIMULATED EnvPool: FIFO free list, busy-time accounting, replacement costs a reset."""

    def __init__(self, w: Workload):
        self.w = w
        self.rng = random.Random(w.seed)
        self.free: asyncio.Queue = asyncio.Queue()
        self._n = 0
        for _ in range(w.desktops):
            self.free.put_nowait(self._new())
        self.busy_count = 0
        self.busy_integral = 0.0
        self._last = 0.0
        self.replaced = 0

    def _new(self) -> SimDesktop:
        self._n += 1
        return SimDesktop(self, self._n)

    def _account(self) -> None:
        now = asyncio.get_running_loop().time()
        self.busy_integral += self.busy_count * (now - self._last)
        self._last = now

    @property
    def size(self) -> int:
        return self.w.desktops

    @property
    def busy(self) -> int:
        return self.busy_count

    async def acquire(self) -> SimDesktop:
        d = await self.free.get()
        self._account()
        self.busy_count += 1
        return d

    async def release(self, d: SimDesktop, broken: bool = False) -> None:
        if broken or d.dead:
            self.replaced += 1
            await asyncio.sleep(self.w.reset_time(self.rng))  # a new desktop boots
            d = self._new()
        self._account()
        self.busy_count -= 1
        self.free.put_nowait(d)

    def stats(self) -> dict:
        return {"desktops": self.size, "busy": self.busy, "replaced": self.replaced}


def tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}", instruction="simulated") for i in range(n)]


@dataclass
class Result:
    name: str
    trajectories: int
    steps: int
    window_s: float
    desktop_util: float
    server_util: float

    @property
    def per_hour(self) -> float:
        return self.trajectories / self.window_s * 3600

    def row(self) -> str:
        return (f"  {self.name:12s} {self.per_hour:10.0f} traj/h  {self.steps / self.window_s:8.2f} steps/s  "
                f"desktops {self.desktop_util:5.1%}  server {self.server_util:5.1%}")


def _scheduler(w: Workload, server: SimServer, pool: SimPool, buffer: TrajectoryBuffer, source: TaskSource,
               rollout_n: int | None = None) -> StreamingScheduler:
    """The real StreamingScheduler over the simulated parts, with no limit of its own in the way."""
    rollout = Rollout(server, SimAgent(), Sampling(), LoopConfig(max_steps=w.max_steps, step_timeout_s=1e9))
    config = SchedulerConfig(rollout_n=rollout_n or w.rollout_n, trajectory_timeout_s=1e9, env_retries=1000,
                             max_llm_in_flight=10 ** 9)
    return StreamingScheduler(rollout, pool, buffer, source, config)  # type: ignore[arg-type]


async def run_ours(w: Workload, warmup: float, horizon: float, name: str = "ours") -> Result:
    server, pool = SimServer(w), SimPool(w)
    buffer = TrajectoryBuffer(None, w.rollout_n)
    sched = _scheduler(w, server, pool, buffer, TaskSource(tasks(10 ** 6)))
    marks: dict[str, float] = {}

    async def stopper():
        await asyncio.sleep(warmup)
        pool._account(), server._account()
        marks.update(d0=buffer.trajectories_done, s0=sched.stats.steps, pb=pool.busy_integral,
                     sb=server.busy_integral)
        await asyncio.sleep(horizon)
        pool._account(), server._account()
        marks.update(d1=buffer.trajectories_done, s1=sched.stats.steps, pb1=pool.busy_integral,
                     sb1=server.busy_integral)
        sched.stop()
        for t in asyncio.all_tasks():  # abandon the tail: throughput is measured in the window
            if t.get_name().startswith("traj:"):
                t.cancel()

    run = asyncio.ensure_future(sched.run())
    await stopper()
    try:
        await run
    except asyncio.CancelledError:
        pass
    return Result(name, marks["d1"] - marks["d0"], marks["s1"] - marks["s0"], horizon,
                  (marks["pb1"] - marks["pb"]) / (horizon * w.desktops),
                  (marks["sb1"] - marks["sb"]) / (horizon * w.slots))


async def run_lockstep(w: Workload, warmup: float, horizon: float, strong: bool = False) -> Result:
    """The design we replace, emulated faithfully (see the module docstring). ``strong``: the best
    lock-step a competent engineer writes: the group's model calls sent together, desktops reused
    (a reset, as ours), no completion polling; each step still waits for the whole group."""
    server = SimServer(w)
    rng = random.Random(w.seed + 1)
    loop = asyncio.get_running_loop()
    done: list[float] = []
    steps: list[float] = []
    busy = {"n": 0, "integral": 0.0, "last": 0.0}

    def acct(delta: int) -> None:
        now = loop.time()
        busy["integral"] += busy["n"] * (now - busy["last"])
        busy["last"], busy["n"] = now, busy["n"] + delta

    counter = iter(range(10 ** 9))

    async def group_slot() -> None:
        while True:
            tid = f"t{next(counter)}"
            acct(w.rollout_n)  # desktops created for this task
            await asyncio.sleep(max(w.reset_time(rng) for _ in range(w.rollout_n)))  # create = boot
            lengths = [w.length(f"{tid}#{s}") for s in range(w.rollout_n)]
            for t in range(max(lengths)):
                active = [s for s in range(w.rollout_n) if t < lengths[s]]
                if strong:  # the group's calls together
                    await asyncio.gather(*[server.chat([], session=f"{tid}#{s}#1") for s in active])
                    steps.extend([loop.time()] * len(active))
                else:
                    for s in active:  # model calls one after another
                        await server.chat([], session=f"{tid}#{s}#1")
                        steps.append(loop.time())
                times = []
                for s in active:
                    dt = w.step_time(rng)
                    if rng.random() < w.fail_per_step:
                        dt += w.reset_time(rng)  # the desktop is recreated
                    times.append(dt)
                await asyncio.sleep(max(times))  # lock-step: wait for the slowest sample
                for s in active:
                    if t == lengths[s] - 1:
                        done.append(loop.time())
            acct(-w.rollout_n)  # destroyed (strong: given back for the next task)
            if not strong:
                now = loop.time()
                await asyncio.sleep(5.0 - (now % 5.0))  # the driver polls for completion every 5 s

    slots = [asyncio.ensure_future(group_slot()) for _ in range(w.desktops // w.rollout_n)]
    await asyncio.sleep(warmup)
    acct(0)
    server._account()
    b0, s0 = busy["integral"], server.busy_integral
    await asyncio.sleep(horizon)
    acct(0)
    server._account()
    for s in slots:
        s.cancel()
    await asyncio.gather(*slots, return_exceptions=True)
    n = sum(1 for t in done if warmup <= t < warmup + horizon)
    k = sum(1 for t in steps if warmup <= t < warmup + horizon)
    return Result("lock-step+" if strong else "lock-step", n, k, horizon, (busy["integral"] - b0) / (horizon * w.desktops),
                  (server.busy_integral - s0) / (horizon * w.slots))


async def run_sync_batches(w: Workload, warmup: float, horizon: float) -> Result:
    """Ours inside batches: a batch of desktops // rollout_n groups must finish before the next."""
    server, pool = SimServer(w), SimPool(w)
    loop = asyncio.get_running_loop()
    per_batch = w.desktops // w.rollout_n
    done: list[float] = []
    calls = {"n": 0}  # model calls answered: the steps, counted as ours are (not estimated)
    marks: dict[str, float] = {}
    chat = server.chat

    async def counted(*args, **kw):
        out = await chat(*args, **kw)
        calls["n"] += 1
        return out
    server.chat = counted  # type: ignore[method-assign]

    async def batches() -> None:
        b = 0
        while True:
            buffer = TrajectoryBuffer(None, w.rollout_n)
            src = TaskSource([Task(id=f"b{b}-t{i}", instruction="simulated") for i in range(per_batch)])
            sched = _scheduler(w, server, pool, buffer, src)
            orig = sched._finish

            def finish(traj, _orig=orig):
                done.append(loop.time())
                _orig(traj)
            sched._finish = finish  # type: ignore[method-assign]
            await sched.run()
            b += 1

    task = asyncio.ensure_future(batches())
    await asyncio.sleep(warmup)
    pool._account(), server._account()
    marks.update(pb=pool.busy_integral, sb=server.busy_integral, s0=calls["n"])
    await asyncio.sleep(horizon)
    pool._account(), server._account()
    marks.update(pb1=pool.busy_integral, sb1=server.busy_integral, s1=calls["n"])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    n = sum(1 for t in done if warmup <= t < warmup + horizon)
    return Result("sync-batch", n, int(marks["s1"] - marks["s0"]), horizon,
                  (marks["pb1"] - marks["pb"]) / (horizon * w.desktops),
                  (marks["sb1"] - marks["sb"]) / (horizon * w.slots))


def analytic_bound(w: Workload) -> tuple[float, str]:
    """Trajectories/hour: fixed point of Little's law with the server's latency curve, capped by
    the server's capacity. Desktop-bound: every desktop always leased, each trajectory holding it
    for reset + L * (step + model latency at the load this creates)."""
    L = w.mean_length()
    server_cap = w.slots / (L * w.llm_time(w.slots)) * 3600  # all slots busy
    x = w.desktops / (w.mean_reset + L * (w.mean_step + w.llm_time(1)))  # traj/s, light load
    for _ in range(200):
        in_flight = min(w.slots, x * L * w.llm_time(max(1, int(round(x * L * w.llm_time(1))))))
        x_new = w.desktops / (w.mean_reset + L * (w.mean_step + w.llm_time(max(1, int(round(in_flight))))))
        x = 0.5 * x + 0.5 * x_new
    desk = x * 3600
    return (desk, "desktop-bound") if desk <= server_cap else (server_cap, "server-bound")


def compare(w: Workload, warmup: float, horizon: float) -> dict:
    ours = run_virtual(run_ours(w, warmup, horizon))
    lock = run_virtual(run_lockstep(w, warmup, horizon))
    strong = run_virtual(run_lockstep(w, warmup, horizon, strong=True))
    sync = run_virtual(run_sync_batches(w, warmup, horizon))
    bound, kind = analytic_bound(w)
    print(f"SIMULATION [{w.name}] {w.desktops} desktops, rollout_n={w.rollout_n}, {w.slots} server slots, "
          f"{horizon:.0f} s window:")
    for r in (ours, lock, strong, sync):
        print(r.row())
    print(f"  {'bound':12s} {bound:10.0f} traj/h  ({kind})")
    return {"ours_per_hour": round(ours.per_hour), "lockstep_per_hour": round(lock.per_hour),
            "sync_batch_per_hour": round(sync.per_hour), "bound_per_hour": round(bound), "bound": kind,
            "ratio_vs_bound": round(ours.per_hour / bound, 3),
            "ratio_vs_lockstep": round(ours.per_hour / lock.per_hour, 2),
            "ratio_vs_lockstep_strong": round(ours.per_hour / strong.per_hour, 2),
            "ratio_vs_lockstep_strong_steps": round(ours.steps / strong.steps, 2),
            "ratio_vs_sync_batch_steps": round(ours.steps / sync.steps, 2),
            "ratio_vs_sync_batch": round(ours.per_hour / sync.per_hour, 2),
            "desktop_util": round(ours.desktop_util, 3), "server_util": round(ours.server_util, 3)}


# ----------------------------------------------------------------------------- scale

async def _sim_only(w: Workload, trajectories: int) -> int:
    """The simulation's own cost: the same calls with no scheduler, agent or buffer around them."""
    server, pool = SimServer(w), SimPool(w)
    steps = 0

    async def one(i: int) -> None:
        nonlocal steps
        d = await pool.acquire()
        await d.reset(None)
        for _ in range(w.length(f"t{i}")):
            await server.chat([], session=f"t{i}#0#1")
            try:
                await d.step(Action("click", x=1, y=1))
            except EnvDeadError:
                pass
            steps += 1
        await pool.release(d)

    await asyncio.gather(*[one(i) for i in range(trajectories)])
    return steps


async def _scale_ours(w: Workload, trajectories: int, snapshot: bool) -> tuple[int, float, int]:
    server, pool = SimServer(w), SimPool(w)
    buffer = TrajectoryBuffer(None, 1)
    sched = _scheduler(w, server, pool, buffer, TaskSource(tasks(trajectories)), rollout_n=1)
    per_traj = 0.0
    peak = 0

    async def trainer():  # a trainer consumes groups as they complete, as in production
        while True:
            await buffer.ready.get()

    consumer = asyncio.ensure_future(trainer())
    if snapshot:
        async def probe():
            nonlocal per_traj, peak
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            while sched.stats.admitted < w.desktops:
                await asyncio.sleep(0.01)
            await asyncio.sleep(w.reset_median_s * 3 + 3 * w.llm_time(1))  # a few steps in
            gc.collect()
            in_flight = pool.busy
            peak = in_flight
            per_traj = (tracemalloc.get_traced_memory()[0] - base) / max(1, in_flight)

        probe_task = asyncio.ensure_future(probe())
        await sched.run()
        await probe_task
    else:
        await sched.run()
    consumer.cancel()
    return sched.stats.steps, per_traj, peak


def scale(n: int) -> dict:
    # The local workload's trajectory lengths (median 6, long tail to 15), at n desktops and slots.
    w = Workload("scale", desktops=n, rollout_n=1, slots=n, fail_per_step=0.0)
    trajectories = n
    t0 = time.process_time()
    sim_steps = run_virtual(_sim_only(w, trajectories))
    sim_cpu = time.process_time() - t0
    t0 = time.process_time()
    steps, _, _ = run_virtual(_scale_ours(w, trajectories, snapshot=False))
    total_cpu = time.process_time() - t0
    per_step_total = total_cpu / steps * 1e6
    per_step_sim = sim_cpu / sim_steps * 1e6
    tracemalloc.start()
    _, per_traj, peak = run_virtual(_scale_ours(w, trajectories, snapshot=True))
    tracemalloc.stop()
    print(f"SIMULATION [scale] {n} concurrent trajectories, {steps} steps: process CPU {per_step_total:.0f} us/step, "
          f"of which the simulation alone {per_step_sim:.0f} us/step -> scheduler {per_step_total - per_step_sim:.0f} "
          f"us/step; memory {per_traj / 1024:.1f} KB per in-flight trajectory ({peak} in flight, images excluded,"
          f" token ids included)")
    return {"concurrent": n, "steps": steps, "cpu_us_per_step_total": round(per_step_total, 1),
            "cpu_us_per_step_sim_only": round(per_step_sim, 1),
            "cpu_us_per_step_scheduler": round(per_step_total - per_step_sim, 1),
            "kb_per_inflight_trajectory": round(per_traj / 1024, 1)}


def main() -> int:
    from loguru import logger

    logger.remove()  # the simulated failures would log thousands of warnings
    logger.add(sys.stderr, level="ERROR")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter windows, 1,000-trajectory scale run")
    ap.add_argument("--scale", type=int, default=10_000)
    a = ap.parse_args()
    horizon = 1800.0 if a.quick else 7200.0
    local = compare(Workload("local"), warmup=300.0, horizon=horizon)
    vm = compare(Workload("vm", reset_range_s=(20.0, 60.0)), warmup=600.0, horizon=horizon)
    sc = scale(1000 if a.quick else a.scale)
    print(json.dumps({"simulation": True, "ratio_vs_bound": local["ratio_vs_bound"],
                      "ratio_vs_lockstep": local["ratio_vs_lockstep"],
                      "ratio_vs_lockstep_strong": local["ratio_vs_lockstep_strong"],
                      "ratio_vs_sync_batch": local["ratio_vs_sync_batch"],
                      "local": local, "vm": vm, "scale": sc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
