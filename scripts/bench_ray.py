#!/usr/bin/env python
"""Ray's cost, measured two ways.

1. Real desktops: the same number of desktops behind env services that Ray placed as actors on
   1, 2 and 3 nodes of a local Ray cluster (ray.cluster_utils.Cluster on loopback, one raylet per
   node) against the same services started as plain ``agentenv serve-envs`` processes, one per
   "node", both alive side by side. The real StreamingScheduler, real HTTP, real X desktops; the
   model is SIMULATED (a scripted UI-TARS click after ``--model-s`` seconds) so that the desktops'
   path, the only thing Ray could slow down, is what is measured. Rounds alternate Ray, plain,
   Ray, plain...; per node count: the median ratio of steps/s (Ray / plain) and its spread.

2. SIMULATION: the scheduler's CPU per step with 100 simulated env services in one EnvPool
   (100 desktops each) and 10,000 concurrent trajectories, a node lost mid-run (10 services
   dropped, their trajectories rerun) and returned (10 services added); on a virtual clock.

    python scripts/bench_ray.py [--rounds 5] [--desktops-per-node 2] [--nodes 1,2,3] [--scale 10000]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from agentenv.config import (EnvConfig, EnvServiceConfig, LoopConfig, RayConfig, SchedulerConfig,  # noqa: E402
                             ServiceConfig)
from agentenv.envs.client import EnvDeadError, Observation  # noqa: E402
from agentenv.envs.pool import EnvPool  # noqa: E402
from agentenv.envs.tasks import builtin_tasks  # noqa: E402
from agentenv.envs.wire import Created, DesktopInfo, Health  # noqa: E402
from agentenv.net import free_port  # noqa: E402
from agentenv.rollout.agent import UITarsAgent  # noqa: E402
from agentenv.rollout.buffer import TrajectoryBuffer  # noqa: E402
from agentenv.rollout.llm import Completion, Sampling  # noqa: E402
from agentenv.rollout.loop import Rollout  # noqa: E402
from agentenv.rollout.scheduler import StreamingScheduler  # noqa: E402
from agentenv.rollout.sources import TaskSource  # noqa: E402
from agentenv.types import Action  # noqa: E402

TASKS = ["terminal-mkdir", "calc-add", "terminal-sort", "calc-multiply", "terminal-copy", "calc-subtract"]
MB = 1024 * 1024


# ----------------------------------------------------------------------------- 1. real desktops

class ScriptedModel:
    """SIMULATED model: after ``delay_s``, a click somewhere in the middle of the screen."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.rng = random.Random(0)

    async def chat(self, messages, sampling=None, *, session=None) -> Completion:
        await asyncio.sleep(self.delay_s)
        x, y = self.rng.randint(200, 800), self.rng.randint(200, 500)
        return Completion(text=f"Thought: click\nAction: click(start_box='({x},{y})')", prompt_token_ids=[1, 2, 3],
                          token_ids=[4, 5], latency_s=self.delay_s)

    async def aclose(self) -> None:
        return None


async def _measure(specs: list[ServiceConfig], trajectories: int, max_steps: int, model_s: float) -> float:
    """steps/s of the streaming scheduler over these services (trajectories of max_steps clicks)."""
    by_id = {t.id: t for t in builtin_tasks()}
    tasks = [by_id[TASKS[i % len(TASKS)]] for i in range(trajectories)]
    tasks = [type(t)(**{**t.__dict__, "id": f"{t.id}-{i}"}) for i, t in enumerate(tasks)]
    pool = await EnvPool(specs).start()
    try:
        rollout = Rollout(ScriptedModel(model_s), UITarsAgent(wait_s=0.0), Sampling(max_tokens=32),
                          LoopConfig(max_steps=max_steps))
        sched = StreamingScheduler(rollout, pool, TrajectoryBuffer(None, 1, save_screenshots=False),
                                   TaskSource(tasks), SchedulerConfig(rollout_n=1))
        t0 = time.perf_counter()
        s = await sched.run()
        dt = time.perf_counter() - t0
    finally:
        await pool.aclose()
    bad = {k: v for k, v in s["statuses"].items() if k != "max_steps"}
    if bad:
        raise RuntimeError(f"trajectories that did not run to the end: {bad}")
    return s["steps"] / dt


def real_desktops(a) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from agentenv.integrations.ray import RayFleet, stay_on_loopback
    from agentenv.services import EnvService

    os.environ["PYTHONPATH"] = str(ROOT)
    stay_on_loopback()
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 * MB}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    out: dict = {"desktops_per_node": a.desktops_per_node, "rounds": a.rounds, "by_nodes": {}}
    try:
        for _ in range(max(a.nodes)):
            cluster.add_node(**node, resources={"desktop": a.desktops_per_node})
        ray.init(address=cluster.address, namespace=f"bench-{uuid.uuid4().hex[:6]}", log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        screen = EnvConfig(serve=EnvServiceConfig(width=1280, height=720))
        for k in a.nodes:
            fleet = RayFleet(RayConfig(desktops_per_actor=a.desktops_per_node, actors=k), screen)
            plain = [EnvService(a.desktops_per_node, port=free_port(), settings=screen.serve) for _ in range(k)]
            try:
                ray_specs = fleet.start()
                assert len({m.node_id for m in fleet.members}) == k, "Ray put two services on one node"
                plain_specs = [ServiceConfig(url=p.start().url, token=p.token) for p in plain]
                n = k * a.desktops_per_node
                traj = a.trajectories_per_desktop * n
                asyncio.run(_measure(ray_specs, n, 2, a.model_s))  # warm up both (first app starts)
                asyncio.run(_measure(plain_specs, n, 2, a.model_s))
                rows = []
                for r in range(a.rounds):
                    rs = asyncio.run(_measure(ray_specs, traj, a.max_steps, a.model_s))
                    ps = asyncio.run(_measure(plain_specs, traj, a.max_steps, a.model_s))
                    rows.append({"ray": round(rs, 3), "plain": round(ps, 3), "ratio": round(rs / ps, 3)})
                    print(f"  {k} node(s), {n} desktops, round {r + 1}: Ray {rs:.2f} steps/s, plain serve-envs "
                          f"{ps:.2f} steps/s, ratio {rs / ps:.3f}", flush=True)
                ratios = [x["ratio"] for x in rows]
                med = statistics.median(ratios)
                out["by_nodes"][k] = {"desktops": n, "rounds": rows, "median_ratio": round(med, 3),
                                      "spread": [min(ratios), max(ratios)],
                                      "overhead_pct": round((1 - med) * 100, 1)}
                print(f"{k} node(s): Ray / plain steps/s median {med:.3f} (spread {min(ratios):.3f}-"
                      f"{max(ratios):.3f}, {a.rounds} rounds) -> Ray overhead {(1 - med) * 100:.1f}%", flush=True)
            finally:
                fleet.shutdown()
                for p in plain:
                    p.stop()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    return out



# ----------------------------------------------------------------------------- 2. SIMULATION

OBS = Observation(png=b"\x89PNG-sim", size=(28, 28), screen=(1920, 1080))


class SimService:
    """SIMULATED env service (the AsyncEnvClient interface): desktops cost the workload's reset and
    step times; a service whose node is 'lost' refuses everything, as a dead node does."""

    def __init__(self, i: int, desktops: int, w, rng: random.Random):
        self.url, self.token = f"http://sim-node-{i}:8100", None
        self.w, self.rng = w, rng
        self.desktops = desktops
        self.dead = False
        self._n = 0

    def _check(self, where: str) -> None:
        if self.dead:
            raise EnvDeadError(f"{self.url}{where}", "SIMULATION: node lost")

    async def health(self):
        self._check("/health")
        return Health(desktops=self.desktops)

    async def list(self):
        self._check("/envs")
        out = []
        for _ in range(self.desktops):
            self._n += 1
            out.append(DesktopInfo(id=f"d{self._n}", width=1920, height=1080))
        return out

    async def create(self, width=None, height=None):
        self._check("/envs")
        self._n += 1
        return Created(id=f"d{self._n}", width=1920, height=1080)

    async def close(self, env_id):
        self._check(f"/envs/{env_id}")

    async def alive(self, env_id):
        return not self.dead

    async def reset(self, env_id, task, image_size=None):
        await asyncio.sleep(self.w.reset_time(self.rng))
        self._check(f"/envs/{env_id}/reset")
        return OBS

    async def step(self, env_id, action, image_size=None, screen=(0, 0)):
        await asyncio.sleep(self.w.step_time(self.rng))
        self._check(f"/envs/{env_id}/step")
        return OBS, {}, action.is_terminal

    async def evaluate(self, env_id, task, last_action=None):
        self._check(f"/envs/{env_id}/evaluate")
        return 1.0 if last_action == "finished" else 0.0

    async def aclose(self):
        return None


async def _sim_only(w, services: list[SimService], trajectories: int) -> int:
    """The simulation's own cost: the same calls with no scheduler, pool, agent or buffer around them."""
    from bench_scheduler import SimServer

    server = SimServer(w)
    steps = 0
    per = trajectories // len(services)

    async def one(i: int) -> None:
        nonlocal steps
        svc = services[i // per]
        await svc.reset("d", None)
        for _ in range(w.length(f"t{i}")):
            await server.chat([], session=f"t{i}#0#1")
            await svc.step("d", Action("click", x=1, y=1))
            steps += 1
        await svc.evaluate("d", None)

    await asyncio.gather(*[one(i) for i in range(trajectories)])
    return steps


async def _scale_ours(w, n_services: int, trajectories: int, lose: int) -> dict:
    from bench_scheduler import SimAgent, SimServer, tasks

    rng = random.Random(1)
    per = trajectories // n_services
    services = [SimService(i, per, w, rng) for i in range(n_services)]
    pool = await EnvPool(services).start()
    server = SimServer(w)
    buffer = TrajectoryBuffer(None, 1)
    rollout = Rollout(server, SimAgent(), Sampling(), LoopConfig(max_steps=w.max_steps, step_timeout_s=1e9))
    sched = StreamingScheduler(rollout, pool, buffer, TaskSource(tasks(trajectories)),
                               SchedulerConfig(rollout_n=1, trajectory_timeout_s=1e9, env_retries=3,
                                               max_llm_in_flight=10 ** 9))

    async def trainer():  # a trainer consumes groups as they complete, as in production
        while True:
            await buffer.ready.get()

    async def node_loss():  # a third of the way in, `lose` nodes die; a while later as many return
        loop = asyncio.get_running_loop()
        while sched.stats.steps < trajectories * 2:
            await asyncio.sleep(0.5)
        for s in services[:lose]:
            s.dead = True
            pool.drop_service(s.url, "SIMULATION: node lost")
        pool.set_expecting(lose)
        t = loop.time()
        await asyncio.sleep(30.0)
        for i in range(lose):
            await pool.add_service(SimService(n_services + i, per, w, rng))
        pool.set_expecting(0)
        return loop.time() - t

    consumer = asyncio.ensure_future(trainer())
    loss = asyncio.ensure_future(node_loss())
    summary = await sched.run()
    await loss
    consumer.cancel()
    return {"steps": sched.stats.steps, "trajectories": buffer.trajectories_done, "statuses": summary["statuses"],
            "pool": pool.stats()}


def scale(n_services: int, trajectories: int, lose: int) -> dict:
    from bench_scheduler import Workload, run_virtual

    w = Workload("scale", desktops=trajectories, rollout_n=1, slots=trajectories, fail_per_step=0.0)
    rng = random.Random(1)
    t0 = time.process_time()
    sim_steps = run_virtual(_sim_only(w, [SimService(i, 1, w, rng) for i in range(n_services)], trajectories))
    sim_cpu = time.process_time() - t0
    t0 = time.process_time()
    r = run_virtual(_scale_ours(w, n_services, trajectories, lose))
    total_cpu = time.process_time() - t0
    per_total, per_sim = total_cpu / r["steps"] * 1e6, sim_cpu / sim_steps * 1e6
    ok = r["trajectories"] == trajectories
    print(f"SIMULATION [scale] {n_services} env services, {trajectories} concurrent trajectories, {r['steps']} steps, "
          f"{lose} services lost and {lose} returned mid-run: process CPU {per_total:.0f} us/step, the simulation "
          f"alone {per_sim:.0f} us/step -> scheduler {per_total - per_sim:.0f} us/step; every trajectory ended "
          f"once: {ok} ({r['statuses']}); pool {r['pool']}", flush=True)
    return {"simulation": True, "env_services": n_services, "trajectories": trajectories, "steps": r["steps"],
            "services_lost_and_returned": lose, "cpu_us_per_step_total": round(per_total, 1),
            "cpu_us_per_step_sim_only": round(per_sim, 1),
            "cpu_us_per_step_scheduler": round(per_total - per_sim, 1), "every_trajectory_once": ok,
            "statuses": r["statuses"], "pool": r["pool"]}


def main() -> int:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nodes", default="1,2,3", help="node counts to measure, comma-separated")
    ap.add_argument("--desktops-per-node", type=int, default=2)
    ap.add_argument("--trajectories-per-desktop", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--model-s", type=float, default=0.1, help="the SIMULATED model's reply time")
    ap.add_argument("--scale", type=int, default=10_000, help="SIMULATION: concurrent trajectories")
    ap.add_argument("--services", type=int, default=100, help="SIMULATION: env services")
    ap.add_argument("--skip-real", action="store_true", help="only the SIMULATION")
    a = ap.parse_args()
    a.nodes = [int(x) for x in a.nodes.split(",")]
    sim = scale(a.services, a.scale, lose=max(1, a.services // 10))
    real = None if a.skip_real else real_desktops(a)
    result = {"scale_simulation": sim, "real_desktops": real}
    if real:
        result["ray_overhead_pct_by_nodes"] = {k: v["overhead_pct"] for k, v in real["by_nodes"].items()}
        pooled = [x["ratio"] for v in real["by_nodes"].values() for x in v["rounds"]]
        result["ray_over_plain_pooled_median"] = round(statistics.median(pooled), 3)
        print(f"all node counts: Ray / plain median {statistics.median(pooled):.3f} over {len(pooled)} rounds "
              f"(spread {min(pooled):.3f}-{max(pooled):.3f})", flush=True)
    result["scheduler_cpu_us_per_step"] = sim["cpu_us_per_step_scheduler"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
