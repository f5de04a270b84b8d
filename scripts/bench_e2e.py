#!/usr/bin/env python
"""End to end on real components: the tiny model on vLLM and real desktops on this machine.

Our StreamingScheduler against the lock-step design emulated on the same server and the same env
service, in one run, same tasks, same sampling:

- ours: a pool of ``--desktops`` desktops reused between tasks, every sample independent;
- lock-step: ``desktops // rollout_n`` groups at a time; per group, desktops created and destroyed,
  the group's model calls one after another, every step waits for the group's slowest sample,
  completion polled every 5 s.

    python scripts/bench_e2e.py [--desktops 4] [--tasks 12] [--rollout-n 2] [--max-steps 6]

Last line: JSON with ratio_vs_lockstep and each side's steps/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.config import tiny_model_pixels  # noqa: E402
from agentenv.envs.client import AsyncDesktopEnv, AsyncEnvClient  # noqa: E402
from agentenv.envs.pool import EnvPool, ServiceSpec  # noqa: E402
from agentenv.envs.tasks import builtin_tasks  # noqa: E402
from agentenv.rollout.agent import UITarsAgent  # noqa: E402
from agentenv.rollout.buffer import TrajectoryBuffer  # noqa: E402
from agentenv.rollout.llm import Sampling, ServiceLLM  # noqa: E402
from agentenv.config import LoopConfig, SchedulerConfig  # noqa: E402
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


async def lockstep(llm, client: AsyncEnvClient, agent, sampling, tasks, n, max_steps, desktops) -> dict:
    steps = 0
    trajectories = 0
    queue: asyncio.Queue = asyncio.Queue()
    for t in tasks:
        queue.put_nowait(t)

    async def group_slot() -> None:
        nonlocal steps, trajectories
        while not queue.empty():
            task = queue.get_nowait()
            created = await asyncio.gather(*[client.create() for _ in range(n)])  # a desktop per sample
            envs = [AsyncDesktopEnv(client, e["id"], (e["width"], e["height"])) for e in created]
            try:
                size = agent.image_size(envs[0].screen)
                obs = await asyncio.gather(*[e.reset(task, size) for e in envs])
                states = [agent.start(task.instruction, o.screen) for o in obs]
                active = list(range(n))
                for _ in range(max_steps):
                    actions = {}
                    for i in active:  # the group's model calls, one after another
                        agent.observe(states[i], obs[i].png)
                        c = await llm.chat(agent.messages(states[i]), sampling, session=f"{task.id}#{i}")
                        agent.record_reply(states[i], c.text)
                        actions[i] = agent.parse(states[i], c.text).actions
                        steps += 1
                    results = await asyncio.gather(*[envs[i].step(actions[i][0], size) for i in active
                                                     if actions[i]])  # lock-step: wait for all
                    for i, (o, _, _) in zip([i for i in active if actions[i]], results):
                        obs[i] = o
                    active = [i for i in active if not (actions[i] and actions[i][0].is_terminal)]
                    if not active:
                        break
                await asyncio.gather(*[e.evaluate(task) for e in envs])
                trajectories += n
            finally:
                await asyncio.gather(*[client.close(e.id) for e in envs])  # destroyed per task
            await asyncio.sleep(5.0 - (time.monotonic() % 5.0))  # completion polled every 5 s

    t0 = time.perf_counter()
    await asyncio.gather(*[group_slot() for _ in range(max(1, desktops // n))])
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 1), "trajectories": trajectories, "steps": steps,
            "steps_per_s": round(steps / dt, 3), "traj_per_hour": round(trajectories / dt * 3600)}


async def bench(a, vllm_url, model, env_url, token) -> dict:
    by_id = {t.id: t for t in builtin_tasks()}
    tasks = [by_id[i] for i in LIGHT[:a.tasks]]
    min_px, max_px = tiny_model_pixels()
    agent = UITarsAgent(min_pixels=min_px, max_pixels=max_px, wait_s=0.5, history_images=a.history_images)
    # Random replies (no seed) within the UI-TARS action grammar: trajectory lengths vary, as in real rollouts.
    sampling = Sampling(temperature=1.0, max_tokens=48, regex=ACTION_REGEX)
    llm = ServiceLLM(vllm_url, model)
    pool = await EnvPool([ServiceSpec(env_url, token)]).start()
    client = AsyncEnvClient(env_url, token)
    try:
        o = await ours(llm, pool, agent, sampling, tasks, a.rollout_n, a.max_steps)
        print(f"ours:      {o}", flush=True)
        lk = await lockstep(llm, client, agent, sampling, tasks, a.rollout_n, a.max_steps, a.desktops)
        print(f"lock-step: {lk}", flush=True)
    finally:
        await client.aclose()
        await pool.aclose()
        await llm.aclose()
    return {"ratio_vs_lockstep": round(o["steps_per_s"] / lk["steps_per_s"], 2),
            "ours_steps_per_s": o["steps_per_s"], "lockstep_steps_per_s": lk["steps_per_s"],
            "ours": o, "lockstep": lk, "desktops": a.desktops, "tasks": a.tasks, "rollout_n": a.rollout_n,
            "max_steps": a.max_steps, "history_images": a.history_images}


def main() -> int:
    from agentenv.services import EnvService, VLLMService

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--desktops", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--rollout-n", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--history-images", type=int, default=5, help="screenshots kept in the prompt (UI-TARS: 5)")
    a = ap.parse_args()
    with VLLMService(port=18600) as v, EnvService(num=a.desktops, port=18700) as e:
        result = asyncio.run(bench(a, v.url, v.model, e.url, e.token))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
