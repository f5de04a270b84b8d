#!/usr/bin/env python
"""agentenv inside verl vs agentenv standalone, on real components (the tiny model on the vLLM CPU
server, real desktops), in one run:

1. steps/s: the same tasks through verl's AgentLoopWorker running our agent loop (verl's server
   manager over the server's tokens route) and through our StreamingScheduler (the server's chat
   route), on the same server and the same desktops; the two sides alternate for --rounds rounds
   (A B A B ...) and the median ratio verl/standalone is reported with its spread (target >= 0.95);
2. the cost of building train samples per step (decode the stored prompts, step and sequence
   samples, verl outputs), timed over the trajectories of part 1 (target <= 1 ms);
3. throughput while one of two endpoints gets new weights (drained, reloaded, back), again and
   again, vs before, in windows long enough to expect 5 steps (target >= 0.5, never 0);
4. storage of per-step prompt token ids: stored against the previous step (shared prefix plus
   run-length encoded rest) vs stored whole, in parquet, for the bench's trajectories and for
   runs/latest (the README's main job) when it exists.

    python scripts/bench_verl.py [--rounds 3] [--tasks 4] [--rollout-n 2] [--max-steps 4]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from agentenv.config import (AGENTENV_HOME, TINY_MODEL, LoopConfig, SchedulerConfig, ServiceConfig,  # noqa: E402
                             tiny_model_pixels)
from agentenv.envs.pool import EnvPool  # noqa: E402
from agentenv.envs.tasks import builtin_tasks  # noqa: E402
from agentenv.rollout.agent import UITarsAgent  # noqa: E402
from agentenv.rollout.buffer import TrajectoryBuffer, read_trajectories  # noqa: E402
from agentenv.rollout.llm import Sampling, ServiceLLM  # noqa: E402
from agentenv.rollout.loop import Rollout  # noqa: E402
from agentenv.rollout.samples import trajectory_samples  # noqa: E402
from agentenv.rollout.scheduler import StreamingScheduler  # noqa: E402
from agentenv.rollout.sources import TaskSource  # noqa: E402
from agentenv.services import EnvService, VLLMService  # noqa: E402

LIGHT = ["editor-type-hello", "terminal-mkdir", "calc-add", "files-open-documents", "editor-clear",
         "terminal-sort", "files-new-folder", "editor-uppercase"]
CLICK_ONLY = r"Thought: [a-z ]{1,12}\nAction: click\(start_box='\([12]?\d{1,2},[12]?\d{1,2}\)'\)"
SEED1 = AGENTENV_HOME / "models" / "tiny-uitars-seed1"


def _agent(history: int) -> UITarsAgent:
    lo, hi = tiny_model_pixels()
    return UITarsAgent(history_images=history, min_pixels=lo, max_pixels=hi, wait_s=0.2)


async def standalone(url, model, pool, tasks, n, max_steps, out: Path) -> dict:
    llm = ServiceLLM(url, model)
    rollout = Rollout(llm, _agent(max_steps), Sampling(max_tokens=48, regex=CLICK_ONLY, logprobs=True),
                      LoopConfig(max_steps=max_steps))
    sched = StreamingScheduler(rollout, pool, TrajectoryBuffer(out, n), TaskSource(tasks), SchedulerConfig(rollout_n=n))
    t0 = time.perf_counter()
    s = await sched.run()
    dt = time.perf_counter() - t0
    await llm.aclose()
    return {"seconds": round(dt, 2), "steps": s["steps"], "steps_per_s": s["steps"] / dt}


def verl_worker(loops: Path):
    import verl
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    r = cfg.actor_rollout_ref.rollout
    cfg.actor_rollout_ref.model.path = str(TINY_MODEL)
    r.name, r.prompt_length, r.response_length = "vllm", 8192, 2048
    r.calculate_log_probs, r.temperature = True, 1.0
    r.agent.agent_loop_config_path = str(loops)
    return AgentLoopWorker(cfg, llm_client=None)


async def in_verl(worker, tasks, n) -> dict:
    from verl.protocol import DataProto

    from agentenv.integrations.verl import AGENT_NAME

    rows = [t for t in tasks for _ in range(n)]
    batch = DataProto.from_single_dict({
        "raw_prompt": np.array([[{"role": "user", "content": t.instruction}] for t in rows], dtype=object),
        "agent_name": np.array([AGENT_NAME] * len(rows), dtype=object),
        "extra_info": np.array([{"task": json.dumps(t.to_dict())} for t in rows], dtype=object),
        "index": np.arange(len(rows)),
    })
    t0 = time.perf_counter()
    out = await worker.generate_sequences(batch)
    dt = time.perf_counter() - t0
    steps = sum(len(info["policy_versions"]) for info in out.non_tensor_batch["agentenv"])
    return {"seconds": round(dt, 2), "steps": steps, "steps_per_s": steps / dt}


def sample_cost(run_dirs: list[Path]) -> dict:
    """Per step: decode the prompts, build step and sequence samples, and the verl outputs."""
    from agentenv.integrations.verl import to_output

    from agentenv.rollout.samples import SequenceModeError, sequence_sample

    trajs = [t for d in run_dirs for t in read_trajectories(d) if t.steps]
    steps = sum(len(t.steps) for t in trajs)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        for t in trajs:
            for mode in ("step", "auto"):
                for s in trajectory_samples(t, mode):
                    to_output(s, [], t, response_length=2048)
    dt = time.perf_counter() - t0
    # Over the chat route the server re-renders earlier replies: how often is a trajectory that kept
    # every screenshot still one sequence, token for token?
    sequences = 0
    for t in trajs:
        try:
            sequence_sample(t)
            sequences += 1
        except SequenceModeError:
            pass
    return {"steps": steps, "trajectories": len(trajs), "ms_per_step": round(dt / (reps * steps) * 1e3, 4),
            "chat_route_trajectories_that_are_one_sequence": sequences}


async def update_throughput(urls, model, pool, tasks, *, window_s: float, updates: int) -> dict:
    """Steps/s in 2 s windows before and while endpoint 0 is updated again and again."""
    llm = ServiceLLM(urls, model)
    rollout = Rollout(llm, _agent(2), Sampling(max_tokens=48, regex=CLICK_ONLY), LoopConfig(max_steps=4))
    sched = StreamingScheduler(rollout, pool, TrajectoryBuffer(None, 2), TaskSource(tasks, epochs=0),
                               SchedulerConfig(rollout_n=2))
    run = asyncio.ensure_future(sched.run())
    marks: list[tuple[float, int]] = []

    async def sample(until: float, every: float) -> None:
        while time.monotonic() < until:
            marks.append((time.monotonic(), sched.stats.steps))
            await asyncio.sleep(every)

    def rates(ms):
        return [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(ms, ms[1:])]

    await asyncio.sleep(10)  # warm up
    await sample(time.monotonic() + window_s, 2.0)
    before = rates(marks)
    # windows long enough to expect >= 5 steps at the rate before: a shorter one can see 0 by chance
    every = max(2.0, 5.0 / max(sum(before) / len(before), 1e-3))
    marks.clear()
    t0 = time.monotonic()
    sampler = asyncio.ensure_future(sample(float("inf"), every))
    loaded = []
    i = 0
    while i < updates or time.monotonic() - t0 < 3 * every:  # at least three windows of updates
        path = SEED1 if i % 2 == 0 else TINY_MODEL
        u0 = time.monotonic()
        await sched.update_weights(i + 1, path=str(path), only=[urls[0]])
        loaded.append(time.monotonic() - u0)
        i += 1
        await asyncio.sleep(1.0)
    marks.append((time.monotonic(), sched.stats.steps))
    sampler.cancel()
    during = rates(marks)
    sched.stop()
    await run
    await llm.aclose()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"before_steps_per_s": round(mean(before), 3), "during_steps_per_s": round(mean(during), 3),
            "ratio": round(mean(during) / mean(before), 3), "min_window_during": round(min(during), 3),
            "window_s": round(every, 1),
            "updates": i, "update_seconds_median": round(statistics.median(loaded), 3),
            "seconds": round(time.monotonic() - t0, 1)}


def storage(run_dir: Path) -> dict | None:
    """Parquet bytes with prompts stored as deltas (as written) vs whole, same rows otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agentenv.rollout import buffer as B

    trajs = read_trajectories(run_dir)
    if not trajs:
        return None
    with tempfile.TemporaryDirectory() as d:
        delta = Path(d) / "delta.parquet"
        pq.write_table(pa.Table.from_pylist([B._row(t) for t in trajs], schema=B.SCHEMA), delta)
        whole_rows = []
        for t in trajs:
            r = B._row(t)
            for s, p in zip(r["steps"], t.prompt_ids()):
                s["prompt_shared"], s["prompt_delta"] = 0, p
            whole_rows.append(r)
        whole = Path(d) / "whole.parquet"
        pq.write_table(pa.Table.from_pylist(whole_rows, schema=B.SCHEMA), whole)
        ids_whole = sum(len(p) for t in trajs for p in t.prompt_ids())
        ids_delta = sum(len(s.prompt_delta) for t in trajs for s in t.steps)
        return {"trajectories": len(trajs), "steps": sum(len(t.steps) for t in trajs),
                "prompt_ids_whole": ids_whole, "prompt_ids_stored": ids_delta,
                "ids_ratio": round(ids_delta / ids_whole, 4),
                "parquet_bytes_whole": whole.stat().st_size, "parquet_bytes_delta": delta.stat().st_size,
                "bytes_ratio": round(delta.stat().st_size / whole.stat().st_size, 4)}


async def bench(a) -> dict:
    import subprocess

    from agentenv.integrations.verl import close_worker_pools

    subprocess.run([sys.executable, str(Path(__file__).parent / "make_tiny_model.py"), "--quiet", "--seed", "1",
                    "--out", str(SEED1)], check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-verl-"))
    flags = ["--tokens-api", "--weight-updates"]
    va = VLLMService(port=a.port, run_dir=work, extra=flags)
    vb = VLLMService(port=a.port + 1, run_dir=work, extra=flags)
    es = EnvService(num=a.desktops, port=a.port + 100, log=work / "env.log")
    with va, es:
        by_id = {t.id: t for t in builtin_tasks()}
        tasks = [by_id[i] for i in LIGHT[:a.tasks]]
        pool = await EnvPool([ServiceConfig(url=es.url, token=es.token)]).start()
        cfg = work / "agentenv.json"
        lo, hi = tiny_model_pixels()
        cfg.write_text(json.dumps({
            "env": {"services": [{"url": es.url, "token": es.token}]},
            "agent": {"history_images": a.max_steps, "min_pixels": lo, "max_pixels": hi, "wait_s": 0.2},
            "sampling": {"max_tokens": 48, "regex": CLICK_ONLY, "logprobs": True},
            "loop": {"max_steps": a.max_steps}}))
        loops = work / "loops.yaml"
        loops.write_text(f"- name: agentenv_gui\n  _target_: agentenv.integrations.verl.AgentenvAgentLoop\n"
                         f"  agentenv_config: {cfg}\n  mode: sequence\n")
        worker = verl_worker(loops)
        from agentenv.integrations.verl import HTTPServerManager

        worker.llm_client = HTTPServerManager(va.url, worker.processor, model=va.model)
        ratios, sides = [], {"standalone": [], "verl": []}
        runs = []
        for r in range(a.rounds):
            order = ("standalone", "verl") if r % 2 == 0 else ("verl", "standalone")
            got = {}
            for side in order:
                if side == "standalone":
                    runs.append(work / f"standalone-{r}")
                    got[side] = await standalone(va.url, va.model, pool, tasks, a.rollout_n, a.max_steps, runs[-1])
                else:
                    got[side] = await in_verl(worker, tasks, a.rollout_n)
                sides[side].append(got[side])
                print(f"round {r + 1} {side:10s} {got[side]}", flush=True)
            ratios.append(got["verl"]["steps_per_s"] / got["standalone"]["steps_per_s"])
        await worker.llm_client.aclose()
        await close_worker_pools()
        cost = sample_cost(runs)
        print(f"sample building: {cost}", flush=True)
        with vb:
            up = await update_throughput([va.url, vb.url], va.model, pool, tasks, window_s=a.window,
                                         updates=a.updates)
        print(f"weight updates of one of two endpoints: {up}", flush=True)
        await pool.aclose()
    store = {"bench": storage(runs[0])}
    latest = Path("runs/latest")
    if latest.exists():
        store["runs_latest"] = storage(latest)
    print(f"storage: {store}", flush=True)
    med = statistics.median(ratios)
    return {"ratio_verl_vs_standalone": round(med, 3), "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "rounds": a.rounds, "target_ratio": 0.95,
            "standalone_steps_per_s": round(statistics.median(x["steps_per_s"] for x in sides["standalone"]), 3),
            "verl_steps_per_s": round(statistics.median(x["steps_per_s"] for x in sides["verl"]), 3),
            "sample_ms_per_step": cost["ms_per_step"], "target_sample_ms": 1.0,
            "update_throughput_ratio": up["ratio"], "update_min_window_steps_per_s": up["min_window_during"],
            "target_update_ratio": 0.5, "update": up, "storage": store}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rollout-n", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--desktops", type=int, default=4)
    ap.add_argument("--window", type=float, default=20.0, help="seconds measured before the updates")
    ap.add_argument("--updates", type=int, default=6)
    ap.add_argument("--port", type=int, default=19000)
    a = ap.parse_args()
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(json.dumps(asyncio.run(bench(a))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
