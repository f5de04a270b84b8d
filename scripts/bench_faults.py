#!/usr/bin/env python
"""The reliability benchmark: the fault scenarios, the fuzz campaign, and memory over a long run.

1. Fault scenarios (real): tests/faults/test_fault_suite.py and test_run_infra.py under pytest,
   each writing its figures (faults injected, trajectories expected / lost / written twice,
   unreadable parquet files, processes left behind) through AGENTENV_FAULT_REPORT.
2. Fuzz campaign, at least --inputs (default 100,000) inputs per target: the pyautogui allow-list,
   the UI-TARS reply -> action path, the task-JSON loader (in process), and the env service's
   routes including the OSWorld in-VM ones (over real HTTP, one real desktop). Each target starts
   from inputs hypothesis builds from the grammars in tests/fuzz/harness.py; the in-process
   targets then go on under atheris (coverage-guided mutation of those seeds, libFuzzer), the
   HTTP target under random mutations of its seed requests sent from 8 threads.
3. Memory, SIMULATION: the real StreamingScheduler and TrajectoryBuffer over the simulated model
   server and desktops of scripts/bench_scheduler.py, on a run that cycles its tasks forever
   (--rss-trajectories, default 150,000); RSS is sampled every 10,000 trajectories and its growth
   after the first 30,000 (when the event window is full) is fitted per 10,000 trajectories.

    python scripts/bench_faults.py [--inputs 100000] [--quick] [--skip-faults] [--skip-fuzz] [--skip-rss]

Ports: AGENTENV_TEST_VLLM_PORT / AGENTENV_TEST_ENV_PORT as for the tests (their +40 for the
fuzzed service). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


# ----------------------------------------------------------------------------- 1. fault scenarios

def fault_scenarios() -> dict:
    report = Path(tempfile.mkdtemp(prefix="agentenv-faults-")) / "report.jsonl"
    junit = report.with_name("junit.xml")
    env = {**os.environ, "AGENTENV_FAULT_REPORT": str(report), "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", f"--junitxml={junit}",
                        "tests/faults/test_fault_suite.py", "tests/faults/test_run_infra.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    outcome: dict[str, str] = {}
    if junit.exists():
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            bad = case.find("failure") is not None or case.find("error") is not None
            outcome[case.get("name")] = "skipped" if case.find("skipped") is not None else ("FAILED" if bad else "passed")
    rows: dict[str, dict] = {}
    for line in report.read_text().splitlines() if report.exists() else []:
        d = json.loads(line)
        row = rows.setdefault(d.pop("test"), {"faults": 0, "expected": 0, "lost": 0, "duplicates": 0,
                                              "unreadable": 0, "orphans": 0})
        for k, v in d.items():
            row[k] = row.get(k, 0) + v
    for name, result in outcome.items():
        rows.setdefault(name, {"faults": 0, "expected": 0, "lost": 0, "duplicates": 0, "unreadable": 0,
                               "orphans": 0})["result"] = result
    print(f"\n== fault scenarios (real: tiny model on vLLM, real desktops) -- {elapsed:.0f} s, pytest exit {r.returncode}")
    print(f"  {'scenario':72s} {'faults':>6s} {'traj':>5s} {'lost':>4s} {'dup':>3s} {'bad pq':>6s} {'orphans':>7s}  result")
    for name, row in rows.items():
        print(f"  {name:72s} {row['faults']:6d} {row['expected']:5d} {row['lost']:4d} {row['duplicates']:3d} "
              f"{row['unreadable']:6d} {row['orphans']:7d}  {row.get('result', '?')}")
    if r.returncode != 0:
        print(r.stdout[-4000:])
    total = {k: sum(row[k] for row in rows.values()) for k in ("faults", "expected", "lost", "duplicates",
                                                                "unreadable", "orphans")}
    return {**total, "scenarios": len(rows), "failed": sum(row.get("result") == "FAILED" for row in rows.values()),
            "pytest_exit": r.returncode, "elapsed_s": round(elapsed)}


# ----------------------------------------------------------------------------- 2. fuzz campaign

def _seeds(strategy, n: int, check) -> list:
    """Run ``check`` on ``n`` inputs hypothesis draws from ``strategy``; returns the inputs."""
    from hypothesis import HealthCheck, given, settings

    out: list = []

    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(x):
        out.append(x)
        check(x)

    run()
    return out


PURE = {
    "allowlist": ("pyautogui_code", lambda h, x, tally: h.check_allowlist(x, tally)),
    "uitars_reply": ("uitars_reply", lambda h, x, tally: h.check_reply(x, (1920, 1080), tally)),
    "task_json": ("task_file_bytes", None),
}


def _atheris_child(target: str, runs: int, corpus: Path, out: Path) -> None:
    """In a child process: atheris (libFuzzer) on one in-process target, seeded with ``corpus``."""
    import atheris

    with atheris.instrument_imports(include=["agentenv"]):
        from tests.fuzz import harness as h
    tally = h.Tally()
    task_path = Path(tempfile.mkdtemp()) / "task.json"

    def one(data: bytes) -> None:
        if target == "task_json":
            h.check_task_file(task_path, data, tally)
        elif target == "allowlist":
            h.check_allowlist(data.decode("utf-8", "replace"), tally)
        else:
            h.check_reply(data.decode("utf-8", "replace"), (1920, 1080), tally)
        if tally.total % 500 == 0:
            out.write_text(json.dumps({"counts": tally.counts, "examples": tally.examples}))

    atheris.Setup([sys.argv[0], str(corpus), f"-runs={runs}", "-max_len=8192", "-timeout=20",
                   "-rss_limit_mb=4096", "-print_final_stats=1"], one)
    atheris.Fuzz()


def fuzz_pure(target: str, inputs: int, seeds: int) -> dict:
    from tests.fuzz import harness as h

    tally = h.Tally()
    strategy = getattr(h, PURE[target][0])
    task_path = Path(tempfile.mkdtemp()) / "task.json"
    if target == "task_json":
        found = _seeds(strategy, seeds, lambda x: h.check_task_file(task_path, x, tally))
    else:
        found = _seeds(strategy, seeds, lambda x: PURE[target][1](h, x, tally))
    corpus = Path(tempfile.mkdtemp(prefix=f"corpus-{target}-"))
    for i, x in enumerate(found):
        (corpus / f"seed{i}").write_bytes(x if isinstance(x, bytes) else str(x).encode("utf-8", "replace"))
    seeded = tally.total
    out = corpus.with_suffix(".json")
    t0 = time.monotonic()
    child = subprocess.run([sys.executable, __file__, "--atheris-child", target, "--runs", str(inputs - seeded),
                            "--corpus", str(corpus), "--out", str(out)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    mutated = json.loads(out.read_text()) if out.exists() else {"counts": {}, "examples": {}}
    for k, v in mutated["counts"].items():
        tally.counts[k] += v
    for k, v in mutated["examples"].items():
        tally.examples.setdefault(k, []).extend(v)
    if child.returncode not in (0,):  # libFuzzer stops on an exception that escaped: a crash
        tally.counts["crash"] += 1
        tally.examples.setdefault("crash", []).append(child.stderr[-1500:])
    return {"inputs": tally.total, "seeds": seeded, "mutated_by": "atheris", "counts": tally.counts,
            "examples": tally.examples, "mutation_s": round(time.monotonic() - t0)}


def _mutate(req, pool: list, rng: random.Random):
    """A random edit of a seed request: a value swapped for junk, a key dropped or added, a path edited."""
    from tests.fuzz.harness import Req

    r = Req(req.method, req.path, copy.deepcopy(req.json), dict(req.form) if req.form else None, req.file)
    if r.form is not None:
        r.form["file_path"] = rng.choice(pool["paths"])
        return r
    if not isinstance(r.json, dict) or rng.random() < 0.1:
        r.json = rng.choice(pool["values"])
        return r

    def leaves(node, acc, parent=None, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                leaves(v, acc, node, k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                leaves(v, acc, node, i)
        if parent is not None:
            acc.append((parent, key))
        return acc

    spots = leaves(r.json, [])
    if spots:
        parent, key = rng.choice(spots)
        op = rng.random()
        if op < 0.7:
            parent[key] = rng.choice(pool["values"])
        elif op < 0.85 and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[rng.choice(["x", "type", "code", "command", "path", "task", "seconds"])] = rng.choice(pool["values"])
    if rng.random() < 0.05:
        parts = r.path.split("/")
        parts[rng.randrange(1, len(parts))] = rng.choice(["..", "%2e%2e", "", "x" * 300, "d0"])
        r.path = "/".join(parts)
    return r


def fuzz_http(inputs: int, seeds: int, port: int) -> dict:
    import httpx

    from agentenv.services import EnvService
    from tests.fuzz import harness as h

    svc = EnvService(num=1, port=port, log=Path(tempfile.mkdtemp()) / "env.log").start()
    tally, lock = h.Tally(), threading.Lock()
    try:
        http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.token}"})
        did = http.get("/envs").json()[0]["id"]
        outside = h.plant_outside(http, did)
        found = _seeds(h.requests(did, outside), seeds, lambda r: h.check_request(http, r, outside, tally))
        pool = {"values": _seeds(h._json, 2000, lambda v: None) + _seeds(h._action_dict(), 500, lambda v: None)
                + _seeds(h._command, 500, lambda v: None),
                "paths": _seeds(h._paths(outside), 1000, lambda v: None)}
        seeded = tally.total
        t0 = time.monotonic()

        class Locked(h.Tally):  # the threads share one tally
            def add(self, outcome, example=None):
                with lock:
                    return tally.add(outcome, example)

        shared = Locked()
        local = threading.local()

        def one(i: int) -> None:
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.token}"})
            rng = random.Random(i)
            h.check_request(local.http, _mutate(rng.choice(found), pool, rng), outside, shared)

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(one, range(inputs - seeded), chunksize=64))
        alive = http.get(f"/envs/{did}/alive").json().get("alive")
        h.remove_outside(outside)
    finally:
        svc.stop()
    return {"inputs": tally.total, "seeds": seeded, "mutated_by": "random edits (8 threads)", "counts": tally.counts,
            "examples": tally.examples, "mutation_s": round(time.monotonic() - t0), "desktop_alive_after": alive,
            "dropped_once_then_answered": tally.transient}


def fuzz_campaign(inputs: int, seeds: int, port: int, targets: list[str]) -> dict:
    out = {}
    for target in [t for t in PURE if t in targets]:
        t0 = time.monotonic()
        out[target] = fuzz_pure(target, inputs, seeds)
        out[target]["elapsed_s"] = round(time.monotonic() - t0)
        print(f"  fuzz {target}: {out[target]['counts']} in {out[target]['elapsed_s']} s", flush=True)
    if "env_service_http" in targets:
        t0 = time.monotonic()
        out["env_service_http"] = fuzz_http(inputs, seeds, port)
        out["env_service_http"]["elapsed_s"] = round(time.monotonic() - t0)
        print(f"  fuzz env_service_http: {out['env_service_http']['counts']}", flush=True)
    print("\n== fuzz campaign")
    print(f"  {'target':20s} {'inputs':>8s} {'seeds':>6s} {'ok':>7s} {'refused':>8s} {'escape':>6s} {'crash':>5s} "
          f"{'hang':>4s}  mutated by")
    for name, r in out.items():
        c = r["counts"]
        print(f"  {name:20s} {r['inputs']:8d} {r['seeds']:6d} {c['ok']:7d} {c['refused']:8d} {c['escape']:6d} "
              f"{c['crash']:5d} {c['hang']:4d}  {r['mutated_by']}")
        for kind, ex in r["examples"].items():
            print(f"    {kind}: {ex[:2]}")
    return out


# ----------------------------------------------------------------------------- 3. memory over a long run

def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def rss_simulation(trajectories: int) -> dict:
    import asyncio
    import gc

    from bench_scheduler import SimPool, SimServer, Workload, _scheduler, run_virtual, tasks
    from loguru import logger

    from agentenv.rollout.buffer import TrajectoryBuffer
    from agentenv.rollout.sources import TaskSource

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    w = Workload("rss", desktops=256, rollout_n=4, slots=256, fail_per_step=0.005)
    samples: list[tuple[int, int]] = []

    async def main() -> None:
        server, pool = SimServer(w), SimPool(w)
        # as `agentenv run` has it: no trainer holds groups, so the buffer holds none (max_ready=0)
        buffer = TrajectoryBuffer(None, w.rollout_n, max_ready=0)
        sched = _scheduler(w, server, pool, buffer, TaskSource(tasks(500), epochs=0))

        async def probe() -> None:
            mark = 10_000
            while buffer.trajectories_done < trajectories:
                await asyncio.sleep(5.0)
                if buffer.trajectories_done >= mark:
                    gc.collect()
                    samples.append((buffer.trajectories_done, _rss_kb()))
                    mark += 10_000
            sched.stop()

        await asyncio.gather(sched.run(), probe())

    t0 = time.monotonic()
    run_virtual(main())
    steady = [(n, kb) for n, kb in samples if n >= 30_000]
    n = len(steady)
    mx, my = sum(x for x, _ in steady) / n, sum(y for _, y in steady) / n
    slope = sum((x - mx) * (y - my) for x, y in steady) / sum((x - mx) ** 2 for x, _ in steady)  # KB per trajectory
    print(f"\n== memory, SIMULATION: {samples[-1][0]} trajectories (rollout_n 4, 256 simulated desktops, tasks cycled"
          f" forever) in {time.monotonic() - t0:.0f} s")
    for done, kb in samples:
        print(f"  {done:8d} trajectories  RSS {kb / 1024:7.1f} MB")
    print(f"  growth after 30,000: {slope * 10_000 / 1024:.2f} MB per 10,000 trajectories (least squares over "
          f"{n} samples)")
    return {"simulation": True, "trajectories": samples[-1][0], "rss_mb_first": round(samples[0][1] / 1024, 1),
            "rss_mb_last": round(samples[-1][1] / 1024, 1),
            "rss_growth_mb_per_10k_trajectories": round(slope * 10_000 / 1024, 3)}


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000, help="fuzz inputs per target")
    ap.add_argument("--seeds", type=int, default=5000, help="of which hypothesis builds")
    ap.add_argument("--rss-trajectories", type=int, default=150_000)
    ap.add_argument("--quick", action="store_true", help="2,000 inputs per target, 50,000 simulated trajectories")
    ap.add_argument("--skip-faults", action="store_true")
    ap.add_argument("--skip-fuzz", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--fuzz-targets", default=",".join([*PURE, "env_service_http"]),
                    help="comma-separated (default: all)")
    ap.add_argument("--atheris-child", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.atheris_child:
        _atheris_child(a.atheris_child, a.runs, Path(a.corpus), Path(a.out))
        return 0
    if a.quick:
        a.inputs, a.seeds, a.rss_trajectories = 2000, 500, 50_000
    port = int(os.environ.get("AGENTENV_TEST_ENV_PORT", "18100")) + 40
    result: dict = {}
    if not a.skip_rss:
        result["memory"] = rss_simulation(a.rss_trajectories)
    if not a.skip_fuzz:
        result["fuzz"] = fuzz_campaign(a.inputs, a.seeds, port, a.fuzz_targets.split(","))
    if not a.skip_faults:
        result["faults"] = fault_scenarios()
    f, z, m = result.get("faults", {}), result.get("fuzz", {}), result.get("memory", {})
    summary = {
        "faults_injected": f.get("faults"), "fault_scenarios": f.get("scenarios"),
        "fault_scenarios_failed": f.get("failed"), "trajectories_checked": f.get("expected"),
        "trajectories_lost": f.get("lost"), "duplicates": f.get("duplicates"),
        "unreadable_parquet": f.get("unreadable"), "orphan_processes": f.get("orphans"),
        "fuzz_inputs_per_target": {k: v["inputs"] for k, v in z.items()},
        "escapes": sum(v["counts"]["escape"] for v in z.values()) if z else None,
        "crashes": sum(v["counts"]["crash"] for v in z.values()) if z else None,
        "hangs": sum(v["counts"]["hang"] for v in z.values()) if z else None,
        "rss_growth_mb_per_10k_trajectories": m.get("rss_growth_mb_per_10k_trajectories"),
        "rss_simulation": True if m else None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
