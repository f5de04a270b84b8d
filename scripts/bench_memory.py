#!/usr/bin/env python
"""Memory per in-flight trajectory with the screenshots included, at 15 and 50 steps.

What a trajectory in flight holds: the agent's state (each turn's screenshot as a data URL, each
reply) and the Trajectory (its steps: token ids, prompts stored as deltas against the previous
step's prompt). Built here with the real UITarsAgent, Trajectory and prompt encoding; the model's
token ids and the screenshots are SIMULATION: a screenshot is ``--png-kb`` KB of incompressible
bytes (a 1920x1080 desktop's PNG at UI-TARS-1.5's resize is 100-300 KB), a step's prompt is the
chat template, the instruction, ``--image-tokens`` per screenshot in the window and the replies.

Compared: the history window applied to memory (UI-TARS shows 5 screenshots; older ones are now
dropped) against the same agent keeping every screenshot's data URL (what it did before).

    python scripts/bench_memory.py [--trajectories 20] [--png-kb 150] [--image-tokens 1300]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.rollout.agent import Agent, UITarsAgent  # noqa: E402
from agentenv.types import Step, Trajectory  # noqa: E402


def one(steps: int, history: int, png_kb: int, image_tokens: int, rng: random.Random, keep_all: bool):
    agent = UITarsAgent(history_images=history)
    if keep_all:  # the agent before the window applied to memory: every screenshot's data URL kept
        agent.observe = lambda state, png: Agent.observe(agent, state, png)  # type: ignore[method-assign]
    state = agent.start("open the text editor and type hello", (1920, 1080))
    traj = Trajectory(task_id="t", sample=0)
    prev: list[int] | None = None
    replies: list[list[int]] = []
    for i in range(steps):
        agent.observe(state, os.urandom(png_kb * 1024))
        reply = [rng.randrange(4096) for _ in range(60)]
        # the prompt: template + instruction, then per turn (image tokens if in the window) + reply
        first = max(0, i + 1 - history)
        prompt = list(range(200))
        for j in range(i + 1):
            if j >= first:
                prompt += [151655] * image_tokens
            if j < i:
                prompt += replies[j]
        agent.record_reply(state, "Thought: t\nAction: click(start_box='(1,2)')")
        step = Step(index=i, token_ids=reply, text="Thought: t\nAction: click(start_box='(1,2)')")
        traj.add_step(step, prompt, prev)
        prev = prompt
        replies.append(reply)
    return state, traj


def measure(n: int, steps: int, history: int, png_kb: int, image_tokens: int, keep_all: bool = False) -> float:
    """Bytes per trajectory, n of them alive at once (the loop's last prompt included)."""
    rng = random.Random(0)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    alive = [one(steps, history, png_kb, image_tokens, rng, keep_all) for _ in range(n)]
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del alive
    return used / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=20)
    ap.add_argument("--png-kb", type=int, default=150)
    ap.add_argument("--image-tokens", type=int, default=1300)
    ap.add_argument("--history", type=int, default=5)
    a = ap.parse_args()
    out = {"simulation": True, "png_kb": a.png_kb, "image_tokens": a.image_tokens, "history_images": a.history}
    for steps in (15, 50):
        window = measure(a.trajectories, steps, a.history, a.png_kb, a.image_tokens)
        keep_all = measure(a.trajectories, steps, a.history, a.png_kb, a.image_tokens, keep_all=True)
        out[f"mb_per_trajectory_{steps}_steps"] = round(window / 1e6, 2)
        out[f"mb_per_trajectory_{steps}_steps_every_screenshot_kept"] = round(keep_all / 1e6, 2)
        print(f"SIMULATION {steps} steps: {window / 1e6:.2f} MB per in-flight trajectory with a {a.history}-screenshot "
              f"window ({keep_all / 1e6:.2f} MB keeping every screenshot); screenshots {a.png_kb} KB PNG, "
              f"{a.image_tokens} tokens each", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
