#!/usr/bin/env python
"""Benchmark real desktops on this machine: reset, step and screenshot latency, memory per
desktop, and how many desktops run side by side before step latency doubles.

    python scripts/bench_envs.py [--steps 40] [--think 1.0] [--max-desktops 16]

- reset: close apps, restore HOME, launch the editor and wait for its window (a built-in task).
- step: one action (type a character, XTest) plus a full-screen screenshot encoded as PNG.
- memory: PSS of every process of a desktop (Xvfb, openbox, the editor), from smaps_rollup.
- side by side: N desktops each step once per ``--think`` seconds (the model's time between two
  steps of an agent); N grows until the p50 step latency is twice the single-desktop p50.
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.envs.tasks import builtin_tasks  # noqa: E402
from agentenv.envs.xvfb import LocalDesktop  # noqa: E402
from agentenv.types import Action  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def step_once(d: LocalDesktop, i: int) -> float:
    t0 = time.perf_counter()
    d.execute(Action("type", text="abcdefghij"[i % 10]))
    d.screenshot_png()
    return time.perf_counter() - t0


def side_by_side(desktops: list[LocalDesktop], think: float, steps: int) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()

    def worker(d: LocalDesktop, offset: float) -> None:
        time.sleep(offset)
        for i in range(steps):
            t = step_once(d, i)
            with lock:
                lat.append(t)
            time.sleep(max(0.0, think - t))

    threads = [threading.Thread(target=worker, args=(d, think * k / len(desktops))) for k, d in enumerate(desktops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--resets", type=int, default=15)
    ap.add_argument("--think", type=float, default=1.0)
    ap.add_argument("--max-desktops", type=int, default=16)
    a = ap.parse_args()
    task = next(t for t in builtin_tasks() if t.id == "editor-type-hello")
    desktops: list[LocalDesktop] = []
    try:
        d0 = LocalDesktop("bench-0").start()
        desktops.append(d0)
        resets = []
        for _ in range(a.resets):
            t0 = time.perf_counter()
            d0.reset(task)
            resets.append(time.perf_counter() - t0)
        shots = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            d0.screenshot_png()
            shots.append(time.perf_counter() - t0)
        steps = [step_once(d0, i) for i in range(a.steps)]
        pss_mb = d0.memory_pss_kb() / 1024
        print(f"reset      p50 {statistics.median(resets):.3f}s  p95 {pct(resets, 95):.3f}s", flush=True)
        print(f"screenshot p50 {statistics.median(shots) * 1000:.1f}ms  p95 {pct(shots, 95) * 1000:.1f}ms", flush=True)
        print(f"step       p50 {statistics.median(steps) * 1000:.1f}ms  p95 {pct(steps, 95) * 1000:.1f}ms", flush=True)
        print(f"memory     {pss_mb:.0f} MB PSS per desktop (Xvfb + openbox + mousepad)", flush=True)

        base = statistics.median(side_by_side([d0], a.think, a.steps // 2))
        print(f"side by side, one step per {a.think}s per desktop: 1 desktop p50 {base * 1000:.1f}ms", flush=True)
        fit = 1
        n = 1
        while n < a.max_desktops:
            n = min(a.max_desktops, n * 2 if n < 8 else n + 4)
            while len(desktops) < n:
                d = LocalDesktop(f"bench-{len(desktops)}").start()
                d.reset(task)
                desktops.append(d)
            p50 = statistics.median(side_by_side(desktops[:n], a.think, a.steps // 2))
            print(f"  {n:2d} desktops p50 {p50 * 1000:.1f}ms ({p50 / base:.2f}x)", flush=True)
            if p50 > 2 * base:
                break
            fit = n
        mem_all = sum(d.memory_pss_kb() for d in desktops) / 1024 / len(desktops)
    finally:
        for d in desktops:
            d.close()
    print(json.dumps({
        "reset_p50_s": round(statistics.median(resets), 3), "reset_p95_s": round(pct(resets, 95), 3),
        "step_p50_ms": round(statistics.median(steps) * 1000, 1), "step_p95_ms": round(pct(steps, 95) * 1000, 1),
        "screenshot_p50_ms": round(statistics.median(shots) * 1000, 1),
        "screenshot_p95_ms": round(pct(shots, 95) * 1000, 1),
        "pss_mb_per_desktop": round(pss_mb, 1), "pss_mb_per_desktop_all": round(mem_all, 1),
        "desktops_before_step_latency_doubles": fit, "think_s": a.think, "tested_up_to": n,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
