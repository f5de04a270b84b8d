"""SIMULATION: a run directory of made-up trajectories, for the report benchmark at scale.

Everything but the model and the desktops is real: trajectories go through the real
``TrajectoryBuffer`` (parquet parts, compaction), screenshots are real PNG files (a few distinct
pictures, hard-linked under every step's own path), and run.json/tasks.jsonl are written as
``agentenv run`` writes them. The actions, replies, latencies and outcomes are random.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from agentenv.rollout.buffer import TrajectoryBuffer
from agentenv.types import Status, Step, Task, Trajectory
from agentenv.view.runinfo import write_run_info

SCREEN = (1920, 1080)
STATUSES = [(Status.FINISHED, 0.55), (Status.MAX_STEPS, 0.3), (Status.INVALID, 0.08), (Status.CALL_USER, 0.03),
            (Status.TIMEOUT, 0.02), (Status.ENV_ERROR, 0.01), (Status.EVAL_ERROR, 0.01)]


def _pictures(folder: Path, n: int, size: tuple[int, int], rng: random.Random) -> list[Path]:
    """``n`` distinct desktop-like PNGs: a title bar, a menu, some text lines."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", size, (246, 246, 246))
        d = ImageDraw.Draw(img)
        d.rectangle([0, 0, size[0], size[1] // 30], fill=(60, 90, 150))
        for k in range(rng.randint(3, 12)):
            y = size[1] // 10 + k * size[1] // 28
            d.text((size[0] // 60, y), f"simulated line {i}.{k} " + "x" * rng.randint(5, 40), fill=(20, 20, 20))
        p = folder / f"pic-{i:03d}.png"
        img.save(p)
        out.append(p)
    return out


def _action(rng: random.Random) -> dict:
    kind = rng.choice(["click", "click", "double_click", "type", "hotkey", "drag", "scroll", "wait"])
    x, y = rng.uniform(0, SCREEN[0]), rng.uniform(0, SCREEN[1])
    if kind == "type":
        return {"type": "type", "text": "hello " * rng.randint(1, 4)}
    if kind == "hotkey":
        return {"type": "hotkey", "keys": ["ctrl", rng.choice("acsvz")]}
    if kind == "drag":
        return {"type": "drag", "x": x, "y": y, "x2": rng.uniform(0, SCREEN[0]), "y2": rng.uniform(0, SCREEN[1])}
    if kind == "scroll":
        return {"type": "scroll", "x": x, "y": y, "direction": "down", "amount": 5}
    if kind == "wait":
        return {"type": "wait", "seconds": 1.0}
    return {"type": kind, "x": x, "y": y}


def simulate_run(out: str | Path, trajectories: int = 10_000, rollout_n: int = 8, desktops: int = 64,
                 max_steps: int = 15, image_size: tuple[int, int] = (588, 336), seed: int = 0) -> Path:
    """Write a SIMULATION run directory with ``trajectories`` trajectories; returns it."""
    rng = random.Random(seed)
    out = Path(out)
    pics = _pictures(out / ".sim-pictures", 24, image_size, rng)
    tasks = [Task(id=f"sim-task-{i:05d}", instruction=f"simulated task {i}") for i in range(trajectories // rollout_n)]
    buf = TrajectoryBuffer(out, rollout_n)
    free_at = [0.0] * desktops
    t_start = 1_700_000_000.0
    for task in tasks:
        for sample in range(rollout_n):
            d = min(range(desktops), key=free_at.__getitem__)
            traj = Trajectory(task_id=task.id, sample=sample, env_id=f"http://127.0.0.1:8100/envs/sim{d}")
            status = rng.choices([s for s, _ in STATUSES], [w for _, w in STATUSES])[0]
            n = max_steps if status == Status.MAX_STEPS else rng.randint(1, max_steps)
            prev: list[int] | None = None
            prompt = [1] * 40 + [151655] * 200  # system + first image placeholder run
            for i in range(n):
                step = Step(index=i, thought=f"step {i}: I will act", valid=rng.random() > 0.05,
                            llm_latency_s=rng.lognormvariate(0.0, 0.4), env_latency_s=rng.lognormvariate(-3.0, 0.3),
                            token_ids=[rng.randrange(150000) for _ in range(rng.randint(10, 60))],
                            image_steps=list(range(max(0, i - 4), i + 1)))
                step.action = _action(rng) if step.valid else None
                step.text = f"Thought: {step.thought}\nAction: {step.action}"
                step.error = "" if step.valid else "could not parse the reply"
                rel = f"screenshots/{task.id}/{sample}/a1-step-{i:03d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(rng.choice(pics), out / rel)
                step.screenshot = rel
                traj.add_step(step, prompt, prev)
                prev = prompt
                prompt = prompt + step.token_ids + [151655] * 200
            final = f"screenshots/{task.id}/{sample}/a1-final.png"
            os.link(rng.choice(pics), out / final)
            traj.final_screenshot = final
            traj.status, traj.reason = status, f"SIMULATION: {status.value}"
            traj.reward = 1.0 if status == Status.FINISHED and rng.random() < 0.7 else 0.0
            duration = 0.5 + sum(s.llm_latency_s + s.env_latency_s for s in traj.steps)
            traj.started_at = t_start + free_at[d]
            traj.ended_at = traj.started_at + duration
            free_at[d] += duration + 0.01
            buf.add(traj)
    buf.compact()
    write_run_info(out, screens={"http://127.0.0.1:8100": list(SCREEN)},
                   config={"simulation": True, "scheduler": {"rollout_n": rollout_n}}, tasks=tasks)
    return out
