"""Benchmark of `agentenv view` and `agentenv replay`.

1. Report build time and size for a real run (the README's main job: 29 tasks x 2 samples = 58
   trajectories, `runs/latest`) and for 10,000 trajectories of a SIMULATION buffer (made-up
   trajectories written through the real buffer, real PNG files): the two builds alternate
   (A B A B ...) for --rounds rounds; medians and spreads are printed.
2. Replay time per step against the recorded step time, on real desktops, for trajectories of the
   real run (model steps: the recorded time includes the model call) and for oracle recordings of
   the built-in suite (no model): per trajectory, replay seconds per step / recorded seconds per
   step, at pace `fast` and `recorded`, alternating.

    python scripts/bench_view.py [--run-dir runs/latest] [--sim 10000] [--rounds 3] [--replays 4]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentenv.rollout.buffer import read_trajectories  # noqa: E402
from agentenv.view.report import build_report  # noqa: E402


def spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "rounds": len(xs)}


def bench_build(run_dir: Path, sim_dir: Path, rounds: int) -> dict:
    sides = {"real": run_dir, "sim": sim_dir}
    times: dict[str, list[float]] = {"real": [], "sim": []}
    first: dict[str, dict] = {}
    for r in range(rounds):
        for name, d in sides.items():   # A B A B ...
            if r == 0 and (d / "report" / "thumbs").exists():
                shutil.rmtree(d / "report" / "thumbs")   # round 0 makes the thumbnails from scratch
            b = build_report(d)
            times[name].append(b.seconds)
            if r == 0:
                first[name] = {"trajectories": len(read_trajectories(d)), "pages": b.pages, "bytes": b.bytes,
                               "thumbnails_made": b.thumbnails, "first_build_s": round(b.seconds, 3)}
            print(f"round {r} {name}: {b.seconds:.2f} s, {b.bytes / 1e6:.1f} MB, {b.pages} pages, "
                  f"{b.thumbnails} thumbnails made", flush=True)
    return {name: {**first[name], "build_s": spread(times[name])} for name in sides}


async def bench_replay(run_dir: Path, oracle_dir: Path, n: int, rounds: int) -> dict:
    from agentenv.envs.tasks import builtin_tasks
    from agentenv.view.replay import ReplayOptions, env_client, record_oracles, replay_run

    # Not the browser tasks: their screens show the desktop's own HOME path, so they never replay
    # identically on another desktop, and a replay that waits for a match at every step says little.
    trajs = sorted((t for t in read_trajectories(run_dir) if len(t.steps) >= 3 and t.status.trainable
                    and not t.task_id.startswith("browser")), key=lambda t: t.key)[:n]
    out: dict = {}
    async with env_client(None, None, log=Path(tempfile.gettempdir()) / "bench-view-env.log") as client:
        tasks = [t for t in builtin_tasks() if t.related_apps and t.related_apps[0] in ("mousepad", "terminal")][:n]
        await record_oracles(oracle_dir, client, tasks, desktops_n=1)
        for label, d, sel in (("model run", run_dir, trajs), ("oracles", oracle_dir, read_trajectories(oracle_dir))):
            ratios: dict[str, list[float]] = {"fast": [], "recorded": []}
            per_step: dict[str, list[float]] = {"fast": [], "recorded": []}
            recorded_step = []
            verdicts: dict[str, int] = {}
            for r in range(rounds):
                for pace in ("fast", "recorded"):   # alternate the two paces
                    for t in sel:
                        # both from reset to evaluation, desktop creation excluded
                        rec = (t.ended_at - t.started_at) / max(1, len(t.steps))
                        (res,) = await replay_run(d, client, task=t.task_id, sample=t.sample, desktops_n=1,
                                                  options=ReplayOptions(pace=pace))
                        rep = (res.ended_at - res.started_at) / max(1, len(t.steps))
                        ratios[pace].append(rep / rec)
                        per_step[pace].append(rep)
                        if r == 0 and pace == "fast":
                            recorded_step.append(rec)
                        verdicts[res.verdict] = verdicts.get(res.verdict, 0) + 1
                    print(f"round {r} {label} pace={pace}: replay/recorded per step median "
                          f"{statistics.median(ratios[pace][-len(sel):]):.2f}", flush=True)
            out[label] = {
                "trajectories": len(sel), "recorded_s_per_step": round(statistics.median(recorded_step), 3),
                **{f"replay_s_per_step_{p}": round(statistics.median(v), 3) for p, v in per_step.items()},
                **{f"ratio_{p}": spread(v) for p, v in ratios.items()}, "verdicts": verdicts,
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "latest"), help="a real run (the main job's)")
    ap.add_argument("--sim", type=int, default=10_000, help="trajectories in the SIMULATION buffer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replays", type=int, default=4, help="trajectories replayed per kind (0: skip replay)")
    ap.add_argument("--keep", help="keep the SIMULATION buffer in this folder (reused when it exists)")
    a = ap.parse_args()
    run_dir = Path(a.run_dir)
    if not read_trajectories(run_dir):
        print(f"no trajectories in {run_dir}: run the main job first (scripts/run.sh)", file=sys.stderr)
        return 2
    from agentenv.view.simulate import simulate_run

    tmp = Path(tempfile.mkdtemp(prefix="bench-view-"))
    sim_dir = Path(a.keep) if a.keep else tmp / "sim"
    try:
        if not (sim_dir / "trajectories.parquet").exists():
            t0 = time.perf_counter()
            simulate_run(sim_dir, trajectories=a.sim)
            print(f"SIMULATION buffer: {a.sim} trajectories written in {time.perf_counter() - t0:.0f} s", flush=True)
        result = {"build": bench_build(run_dir, sim_dir, a.rounds)}
        result["build"]["sim"]["simulation"] = True
        if a.replays:
            result["replay"] = asyncio.run(bench_replay(run_dir, tmp / "oracles", a.replays, max(1, a.rounds - 1)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
