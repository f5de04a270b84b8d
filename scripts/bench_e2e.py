#!/usr/bin/env python
"""End to end on real components: the tiny model on vLLM and real desktops on this machine.

Our StreamingScheduler against two lock-step designs on the same server and the same env service,
same tasks, same sampling, in alternating rounds (ours, seed, strong, ours, seed, strong, ...):

- ours: a pool of ``--desktops`` desktops reused between tasks, every sample independent;
- lock-step, the seed's design: ``desktops // rollout_n`` groups at a time; per group, desktops
  created and destroyed, the group's model calls one after another, every step waits for the
  group's slowest sample, completion polled every 5 s (after the last group too);
- lock-step, strongest: what a competent engineer writes without streaming: desktops reused (from
  the pool), the group's model calls sent together, no polling; every step still waits for the
  whole group.

Configurations (README): 2 x 4 (rollout_n 2, 4 desktops), GRPO-sized 8 x 16 (``--rollout-n 8
--desktops 16``), and either with the model server on cores of its own (``--server-cores 1``: the
vLLM server's processes pinned there, this process and the desktops on the others).

    python scripts/bench_e2e.py [--desktops 4] [--tasks 4] [--rollout-n 2] [--max-steps 6] [--rounds 3]
                                [--server-cores 1]

Last line: JSON: per baseline the median ratio of steps/s (ours / theirs), its spread, the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.config import tiny_model_pixels  # noqa: E402
from agentenv.envs.client import AsyncDesktopEnv, AsyncEnvClient, EnvRequestError  # noqa: E402
from agentenv.envs.pool import EnvPool  # noqa: E402
from agentenv.envs.tasks import builtin_tasks  # noqa: E402
from agentenv.net import free_port  # noqa: E402
from agentenv.rollout.agent import UITarsAgent  # noqa: E402
from agentenv.rollout.buffer import TrajectoryBuffer  # noqa: E402
from agentenv.rollout.llm import Sampling, ServiceLLM  # noqa: E402
from agentenv.config import LoopConfig, SchedulerConfig, ServiceConfig  # noqa: E402
from agentenv.rollout.loop import Rollout  # noqa: E402
from agentenv.rollout.scheduler import StreamingScheduler  # noqa: E402
from agentenv.rollout.sources import TaskSource  # noqa: E402
from agentenv.rollout.uitars import ACTION_REGEX  # noqa: E402

LIGHT = ["editor-type-hello", "terminal-mkdir", "calc-add", "files-open-documents", "editor-clear",
         "terminal-sort", "files-new-folder", "editor-uppercase", "terminal-copy", "calc-multiply",
         "editor-quote", "terminal-rename"]


async def ours(llm, pool, agent, sampling, tasks, n, max_steps) -> dict:
    sched = StreamingScheduler(Rollout(llm, agent, sampling, LoopConfig(max_steps=max_steps)), pool,
                               TrajectoryBuffer(None, n), TaskSource(tasks), SchedulerConfig(rollout_n=n))
    t0 = time.perf_counter()
    s = await sched.run()
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 1), "trajectories": s["trajectories"], "steps": s["steps"],
            "steps_per_s": round(s["steps"] / dt, 3), "traj_per_hour": round(s["trajectories"] / dt * 3600)}


async def lockstep(llm, agent, sampling, tasks, n, max_steps, desktops, *, acquire, release,
                   calls_together: bool, poll_s: float) -> dict:
    """``desktops // n`` groups at a time; every step waits for the group's slowest sample.

    ``acquire(n)`` / ``release(envs)`` give a group its desktops and take them back; the group's
    model calls go one after another or together; ``poll_s`` > 0: completion is polled that often
    (the seed's 5 s, after the last group too)."""
    steps = 0
    trajectories = 0
    failed = 0
    queue: asyncio.Queue = asyncio.Queue()
    for t in tasks:
        queue.put_nowait(t)

    async def group_slot() -> None:
        nonlocal steps, trajectories, failed
        while not queue.empty():
            task = queue.get_nowait()
            envs = await acquire(n)
            try:
                size = agent.image_size(envs[0].screen)
                try:
                    obs = await asyncio.gather(*[e.reset(task, size) for e in envs])
                except EnvRequestError:  # a setup that failed (an app slow to open under load): the
                    failed += 1          # group ends as ours would end it (task_error), the run goes on
                    continue
                states = [agent.start(task.instruction, o.screen) for o in obs]
                active = list(range(n))
                for _ in range(max_steps):
                    for i in active:
                        agent.observe(states[i], obs[i].png)

                    def call(i: int):
                        return llm.chat(agent.messages(states[i]), sampling, session=f"{task.id}#{i}")

                    if calls_together:
                        replies = await asyncio.gather(*[call(i) for i in active])
                    else:
                        replies = [await call(i) for i in active]
                    actions = {}
                    for i, c in zip(active, replies):
                        agent.record_reply(states[i], c.text)
                        actions[i] = agent.parse(states[i], c.text).actions
                    steps += len(active)
                    acting = [i for i in active if actions[i]]
                    results = await asyncio.gather(*[envs[i].step(actions[i][0], size) for i in acting])
                    for i, (o, _, _) in zip(acting, results):
                        if o is not None:
                            obs[i] = o
                    active = [i for i in active if not (actions[i] and actions[i][0].is_terminal)]
                    if not active:
                        break
                await asyncio.gather(*[e.evaluate(task) for e in envs])
                trajectories += n
            finally:
                await release(envs)
            if poll_s:
                await asyncio.sleep(poll_s - (time.monotonic() % poll_s))

    t0 = time.perf_counter()
    await asyncio.gather(*[group_slot() for _ in range(max(1, desktops // n))])
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 1), "trajectories": trajectories, "steps": steps,
            "steps_per_s": round(steps / dt, 3), "traj_per_hour": round(trajectories / dt * 3600),
            "groups_failed_setup": failed}


def lockstep_seed(llm, client: AsyncEnvClient, agent, sampling, tasks, n, max_steps, desktops):
    """The seed's design: a group's desktops made and destroyed per task, its model calls one after
    another, completion polled every 5 s."""
    async def acquire(k: int) -> list[AsyncDesktopEnv]:
        created = await asyncio.gather(*[client.create() for _ in range(k)])
        return [AsyncDesktopEnv(client, e.id, e.screen) for e in created]

    async def release(envs: list[AsyncDesktopEnv]) -> None:
        await asyncio.gather(*[client.close(e.id) for e in envs])

    return lockstep(llm, agent, sampling, tasks, n, max_steps, desktops, acquire=acquire, release=release,
                    calls_together=False, poll_s=5.0)


def lockstep_strong(llm, pool: EnvPool, agent, sampling, tasks, n, max_steps, desktops):
    """The strongest lock-step: desktops reused (from the pool), the group's calls together, no polling."""
    async def acquire(k: int) -> list:
        return [await pool.acquire() for _ in range(k)]

    async def release(envs: list) -> None:
        for e in envs:
            await pool.release(e)

    return lockstep(llm, agent, sampling, tasks, n, max_steps, desktops, acquire=acquire, release=release,
                    calls_together=True, poll_s=0.0)


def _ratios(rounds: list[dict], other: str) -> dict:
    r = [x["ours"]["steps_per_s"] / x[other]["steps_per_s"] for x in rounds]
    return {"median": round(statistics.median(r), 2), "spread": [round(min(r), 2), round(max(r), 2)],
            "rounds": len(r)}


async def bench(a, vllm_url, model, env_url, token) -> dict:
    by_id = {t.id: t for t in builtin_tasks()}
    tasks = [by_id[i] for i in LIGHT[:a.tasks]]
    min_px, max_px = tiny_model_pixels()
    agent = UITarsAgent(min_pixels=min_px, max_pixels=max_px, wait_s=0.5, history_images=a.history_images)
    # Random replies (no seed) within the UI-TARS action grammar: trajectory lengths vary, as in real rollouts.
    sampling = Sampling(temperature=1.0, max_tokens=48, regex=ACTION_REGEX)
    llm = ServiceLLM(vllm_url, model)
    pool = await EnvPool([ServiceConfig(url=env_url, token=token)]).start()
    client = AsyncEnvClient(env_url, token)
    rounds = []
    try:
        for r in range(a.rounds):
            o = await ours(llm, pool, agent, sampling, tasks, a.rollout_n, a.max_steps)
            seed = await lockstep_seed(llm, client, agent, sampling, tasks, a.rollout_n, a.max_steps, a.desktops)
            strong = await lockstep_strong(llm, pool, agent, sampling, tasks, a.rollout_n, a.max_steps, a.desktops)
            rounds.append({"ours": o, "seed": seed, "strong": strong})
            print(f"round {r + 1}: ours {o['steps_per_s']} steps/s, lock-step (seed) {seed['steps_per_s']}, "
                  f"lock-step (strongest) {strong['steps_per_s']}", flush=True)
    finally:
        await client.aclose()
        await pool.aclose()
        await llm.aclose()
    vs_seed, vs_strong = _ratios(rounds, "seed"), _ratios(rounds, "strong")
    print(f"ours / lock-step (seed's design): median {vs_seed['median']}x (spread {vs_seed['spread']}); "
          f"ours / lock-step (strongest): median {vs_strong['median']}x (spread {vs_strong['spread']}); "
          f"{a.rounds} rounds", flush=True)
    return {"ratio_vs_lockstep_strong": vs_strong, "ratio_vs_lockstep_seed": vs_seed,
            "ours_steps_per_s_median": statistics.median(x["ours"]["steps_per_s"] for x in rounds),
            "rounds": rounds, "desktops": a.desktops, "tasks": a.tasks, "rollout_n": a.rollout_n,
            "max_steps": a.max_steps, "history_images": a.history_images, "server_cores": a.server_cores}



def pin(pid: int, cores: set[int]) -> int:
    """Pin a process tree (every thread of each process) to ``cores``; how many threads."""
    from agentenv.procs import descendants

    n = 0
    for p in [pid, *descendants(pid)]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for t in tids:
            try:
                os.sched_setaffinity(t, cores)
                n += 1
            except OSError:
                pass
    return n


def main() -> int:
    from agentenv.services import EnvService, VLLMService

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--desktops", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=4, help="tasks per round (each runs rollout_n samples)")
    ap.add_argument("--rollout-n", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of ours, seed lock-step, strongest lock-step")
    ap.add_argument("--history-images", type=int, default=5, help="screenshots kept in the prompt (UI-TARS: 5)")
    ap.add_argument("--server-cores", default=None, metavar="LIST",
                    help="pin the vLLM server to these cores (e.g. 1) and everything else to the rest")
    a = ap.parse_args()
    with VLLMService(port=free_port()) as v, EnvService(num=a.desktops, port=free_port()) as e:
        if a.server_cores:
            server = {int(c) for c in a.server_cores.split(",")}
            rest = set(os.sched_getaffinity(0)) - server
            if not rest:
                raise SystemExit(f"--server-cores {a.server_cores} leaves no core for the desktops")
            print(f"model server on cores {sorted(server)} ({pin(v.proc.pid, server)} threads), desktops and "
                  f"scheduler on {sorted(rest)} ({pin(e.proc.pid, rest) + pin(os.getpid(), rest)} threads)", flush=True)
        result = asyncio.run(bench(a, v.url, v.model, e.url, e.token))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
