#!/usr/bin/env python
"""Benchmark real desktops on this machine: reset, step and screenshot latency, memory per
desktop, and how many desktops run side by side before step latency doubles.

    python scripts/bench_envs.py [--steps 40] [--think 1.0] [--max-desktops 16] [--kinds host,sandbox]
    python scripts/bench_envs.py --app gimp|vlc|thunderbird|impress|code [--resets 5]

Both kinds of desktop are measured side by side in one run: the plain one (apps on the host as the
desktop user) and the sandboxed one (bubblewrap, agentenv/envs/sandbox.py), in alternating rounds,
with sandbox/host ratios (median and spread over the rounds).

- reset: close apps, restore HOME, launch the editor and wait for its window (a built-in task).
- step: one action (type a character, XTest) plus a full-screen screenshot encoded as PNG.
- memory: PSS of every process of a desktop (Xvfb, openbox, the editor), from smaps_rollup.
- side by side: N desktops each step once per ``--think`` seconds (the model's time between two
  steps of an agent); N grows until the p50 step latency is twice the single-desktop p50.
- ``--app``: one sandboxed desktop, reset with a task that opens the app as OSWorld's tasks do and
  waits for its ready window; reset p50 with the app, p50 of a bare reset (no app: our own part),
  and PSS with the app open.
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
from agentenv.envs.desktop import Desktop, make_desktop  # noqa: E402
from agentenv.envs.desktop_types import DesktopSpec  # noqa: E402
from agentenv.types import Action  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def step_once(d: Desktop, i: int) -> float:
    t0 = time.perf_counter()
    d.execute(Action("type", text="abcdefghij"[i % 10]))
    d.screenshot_png()
    return time.perf_counter() - t0


def side_by_side(desktops: list[Desktop], think: float, steps: int) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()

    def worker(d: Desktop, offset: float) -> None:
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


# --app: a launch step per app and the window title that says it is ready (past splash screens).
APP_LAUNCH = {
    "gimp": (["gimp"], "GNU Image Manipulation Program"),
    "vlc": (["vlc"], "VLC media player"),
    "thunderbird": (["/usr/bin/thunderbird"], "user@example.invalid - Mozilla Thunderbird"),
    "impress": (["libreoffice", "--impress", "--norestore", "/home/user/deck.pptx"], "deck.pptx"),
    "code": (["code"], " - Visual Studio Code"),  # VS Code (code-server) on its Welcome page
}


def bench_app(app: str, n: int) -> dict:
    import base64

    from agentenv.types import Task

    argv, ready = APP_LAUNCH[app]
    config: list[dict] = [{"type": "launch", "parameters": {"command": argv, "window": ready, "timeout": 120}}]
    if app == "impress":  # a deck to open: our sample task's
        deck = Path(__file__).resolve().parent.parent / "tests" / "tasks" / "samples" / "files" / "deck.pptx"
        data = base64.b64encode(deck.read_bytes()).decode()
        code = f"import base64; open('/home/user/deck.pptx', 'wb').write(base64.b64decode('{data}'))"
        config.insert(0, {"type": "execute", "parameters": {"command": ["python3", "-c", code]}})
    task = Task(id=f"bench-{app}", instruction="-", extra={"snapshot": app}, config=config)
    bare = Task(id="bench-bare", instruction="-")
    d = make_desktop(f"bench-app-{app}", DesktopSpec(width=1280, height=800, sandbox=True)).start()
    with_app, without, pss = [], [], []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            d.reset(task)
            with_app.append(time.perf_counter() - t0)
            time.sleep(3.0)  # the app settles (caches, background pages) before its memory is read
            pss.append(d.memory_pss_kb() / 1024)
            t0 = time.perf_counter()
            d.reset(bare)
            without.append(time.perf_counter() - t0)
    finally:
        d.close()
    out = {"app": app, "reset_p50_s": round(statistics.median(with_app), 3), "reset_max_s": round(max(with_app), 3),
           "bare_reset_p50_s": round(statistics.median(without), 3), "pss_mb": round(statistics.median(pss), 1)}
    print(f"[{app}] reset with the app p50 {out['reset_p50_s']}s (max {out['reset_max_s']}s), bare reset p50 "
          f"{out['bare_reset_p50_s']}s, PSS with the app open {out['pss_mb']} MB", flush=True)
    return out


def make(kind: str, name: str) -> Desktop:
    return make_desktop(name, DesktopSpec(sandbox=(kind == "sandbox"))).start()


def ratio_line(name: str, ratios: list[float]) -> dict[str, float]:
    med = statistics.median(ratios)
    print(f"  {name:<10} sandbox/host median {med:.2f}x  spread {min(ratios):.2f}-{max(ratios):.2f} "
          f"over {len(ratios)} rounds", flush=True)
    return {"median": round(med, 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--resets", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5, help="A B A B rounds for the sandbox/host ratios")
    ap.add_argument("--think", type=float, default=1.0)
    ap.add_argument("--max-desktops", type=int, default=16)
    ap.add_argument("--kinds", default="host,sandbox", help="host, sandbox or both (compared side by side)")
    ap.add_argument("--app", choices=sorted(APP_LAUNCH), help="measure one app's desktop (see above)")
    a = ap.parse_args()
    if a.app:
        print(json.dumps(bench_app(a.app, a.resets)))
        return 0
    kinds = [k for k in a.kinds.split(",") if k]
    if not set(kinds) <= {"host", "sandbox"}:
        ap.error("--kinds takes host and/or sandbox")
    task = next(t for t in builtin_tasks() if t.id == "editor-type-hello")
    desktops: dict[str, list[Desktop]] = {k: [] for k in kinds}
    resets: dict[str, list[float]] = {k: [] for k in kinds}
    steps: dict[str, list[float]] = {k: [] for k in kinds}
    shots: dict[str, list[float]] = {k: [] for k in kinds}
    rounds: dict[str, dict[str, list[float]]] = {k: {"reset": [], "step": [], "pss": []} for k in kinds}
    out: dict[str, dict] = {}
    try:
        for k in kinds:
            desktops[k].append(make(k, f"bench-{k}-0"))
        # A B A B: each round resets and steps one desktop of each kind, the kinds taking turns,
        # so the load of the other sessions on this machine falls on both alike.
        per_round_resets = max(1, a.resets // a.rounds)
        per_round_steps = max(1, a.steps // a.rounds)
        for r in range(a.rounds):
            for k in (kinds if r % 2 == 0 else kinds[::-1]):
                d0 = desktops[k][0]
                rs = []
                for _ in range(per_round_resets):
                    t0 = time.perf_counter()
                    d0.reset(task)
                    rs.append(time.perf_counter() - t0)
                ss = [step_once(d0, i) for i in range(per_round_steps)]
                for _ in range(per_round_steps):
                    t0 = time.perf_counter()
                    d0.screenshot_png()
                    shots[k].append(time.perf_counter() - t0)
                resets[k] += rs
                steps[k] += ss
                rounds[k]["reset"].append(statistics.median(rs))
                rounds[k]["step"].append(statistics.median(ss))
                rounds[k]["pss"].append(d0.memory_pss_kb() / 1024)
        for k in kinds:
            pss_mb = statistics.median(rounds[k]["pss"])
            print(f"[{k}] reset      p50 {statistics.median(resets[k]):.3f}s  p95 {pct(resets[k], 95):.3f}s", flush=True)
            print(f"[{k}] screenshot p50 {statistics.median(shots[k]) * 1000:.1f}ms  "
                  f"p95 {pct(shots[k], 95) * 1000:.1f}ms", flush=True)
            print(f"[{k}] step       p50 {statistics.median(steps[k]) * 1000:.1f}ms  "
                  f"p95 {pct(steps[k], 95) * 1000:.1f}ms", flush=True)
            print(f"[{k}] memory     {pss_mb:.0f} MB PSS per desktop (X server + openbox + mousepad"
                  f"{' + bwrap, runner, D-Bus' if k == 'sandbox' else ''})", flush=True)
            out[k] = {"reset_p50_s": round(statistics.median(resets[k]), 3),
                      "reset_p95_s": round(pct(resets[k], 95), 3),
                      "step_p50_ms": round(statistics.median(steps[k]) * 1000, 1),
                      "step_p95_ms": round(pct(steps[k], 95) * 1000, 1),
                      "screenshot_p50_ms": round(statistics.median(shots[k]) * 1000, 1),
                      "pss_mb_per_desktop": round(pss_mb, 1)}
        if len(kinds) == 2:
            print("ratios, measured in alternating rounds:", flush=True)
            out["sandbox_over_host"] = {
                m: ratio_line(m, [s / h for s, h in zip(rounds["sandbox"][m], rounds["host"][m]) if h > 0])
                for m in ("reset", "step", "pss")}

        # Side by side: N desktops of a kind each step once per ``think`` seconds; N grows, and at
        # each N the kinds take turns (A B, then B A), so both meet the same load from elsewhere.
        sizes, n = [1], 1
        while n < a.max_desktops:
            n = min(a.max_desktops, n * 2 if n < 8 else n + 4)
            sizes.append(n)
        p50s: dict[str, dict[int, float]] = {k: {} for k in kinds}
        for i, n in enumerate(sizes):
            for k in (kinds if i % 2 == 0 else kinds[::-1]):
                while len(desktops[k]) < n:
                    d = make(k, f"bench-{k}-{len(desktops[k])}")
                    d.reset(task)
                    desktops[k].append(d)
                p50s[k][n] = statistics.median(side_by_side(desktops[k][:n], a.think, a.steps // 2))
            print(f"side by side, one step per {a.think}s each, {n:2d} desktops of a kind: " + "  ".join(
                f"[{k}] p50 {p50s[k][n] * 1000:.1f}ms ({p50s[k][n] / p50s[k][1]:.2f}x of 1)" for k in kinds), flush=True)
        for k in kinds:
            fit = max([n for n in sizes if p50s[k][n] <= 2 * p50s[k][1]], default=1)
            mem_all = sum(d.memory_pss_kb() for d in desktops[k]) / 1024 / len(desktops[k])
            out[k].update({"pss_mb_per_desktop_all": round(mem_all, 1), "desktops_before_step_latency_doubles": fit,
                           "tested_up_to": sizes[-1],
                           "side_by_side_p50_ms": {n: round(v * 1000, 1) for n, v in p50s[k].items()}})
    finally:
        for ds in desktops.values():
            for d in ds:
                d.close()
    print(json.dumps({**out, "think_s": a.think, "rounds": a.rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
