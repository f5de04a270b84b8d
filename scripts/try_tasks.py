"""Run the setup and a no-op evaluation of every task `agentenv tasks check` says runs here, on one
real desktop: how many set up, how many score without an error, what a no-op scores, reset times.

    python scripts/try_tasks.py PATH/TO/evaluation_examples/examples [--domain os] [--limit N]

A no-op should score 0 on a feasible task; a 1 means the task passes without the agent (a weak
evaluator, or a desktop that already holds the answer). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentenv.envs.tasks.check import check_tasks  # noqa: E402
from agentenv.envs.tasks.evaluate import EvaluatorError, evaluate  # noqa: E402
from agentenv.envs.tasks.setup import TaskSetupError  # noqa: E402
from agentenv.envs.desktop import make_desktop  # noqa: E402
from agentenv.envs.desktop_types import DesktopSpec  # noqa: E402
from agentenv.rollout.sources import load_items  # noqa: E402
from agentenv.types import Task  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--domain", default=None, help="only this domain (folder name)")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    runnable = {(r.file, r.id) for r in check_tasks(a.dir) if r.status == "runs"
                and (a.domain is None or r.domain == a.domain)}
    tasks = [t for t in load_items(a.dir) if isinstance(t, Task)
             and (t.source, t.extra.get("original_id", t.id)) in runnable][: a.limit]
    out: Counter = Counter()
    resets: list[float] = []
    d = make_desktop(f"try-{os.getpid()}", DesktopSpec(width=1920, height=1080)).start()
    try:
        for t in tasks:
            t0 = time.perf_counter()
            try:
                d.reset(t)
            except TaskSetupError as e:
                out["setup_failed"] += 1
                print(f"setup failed  {t.id}: {e}"[:300], flush=True)
                continue
            resets.append(time.perf_counter() - t0)
            try:
                score = evaluate(d, t, None)
            except EvaluatorError as e:
                out["eval_error"] += 1
                print(f"eval error    {t.id}: {e}"[:300], flush=True)
                continue
            out[f"noop_{score:g}"] += 1
            print(f"no-op {score:g}     {t.id}  reset {resets[-1]:.2f}s", flush=True)
    finally:
        d.close()
    res = {"runnable_by_check": len(tasks), **out,
           "reset_p50_s": round(statistics.median(resets), 3) if resets else None}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
