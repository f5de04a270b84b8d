"""``agentenv tasks smoke DIR``: every task that ``tasks check`` says runs here, on real desktops side
by side: reset with the task's setup, the agent's first screenshot, a no-op evaluation.

What it tells an OSWorld user before a training run:
- ``setup_ok``: the task's setup steps ran (a failure names the step and why);
- ``noop_score``: a feasible task must score 0 when the agent does nothing; a 1 is a task that
  passes without the agent (named in the report, with the evaluator that passed it);
- ``reset_to_screenshot_s``: from asking for the reset to holding the first screenshot, the
  figure OSWorld's harness spends 60 s of sleep on;
- ``blank`` / ``unsettled``: the first screenshot is one flat colour, or differs from the screen a
  moment later (perceptual distance past replay's threshold): the agent would have acted on a
  screen that was not ready.

The last line of the command's output is one JSON object (see :func:`summary`).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agentenv.envs.client import AsyncDesktopEnv, AsyncEnvClient, EnvRequestError
from agentenv.types import Task
from agentenv.view.compare import THRESHOLD, compare, gray
from agentenv.view.replay import WAIT0, each_on_a_desktop

OSWORLD_RESET_WAIT_S = 60.0  # OSWorld's runner sleeps this long after every reset (lib_run_single.py)
BLANK_STD = 2.0              # grey-level spread under which a screenshot is one flat colour


@dataclass
class SmokeResult:
    id: str
    domain: str
    setup_ok: bool = False
    error: str = ""                      # the setup's or the evaluation's error, when there was one
    noop_score: float | None = None
    reset_to_screenshot_s: float | None = None
    blank: bool = False
    unsettled: bool = False
    distance_after: float | None = None  # the first screenshot against the screen ``settle_s`` later


def is_blank(png: bytes, empty: np.ndarray | None) -> bool:
    """One flat colour that is not the empty desktop (a task that opens nothing shows just that)."""
    g = gray(png)
    if float(np.std(g)) >= BLANK_STD:
        return False
    return empty is None or empty.shape != g.shape or float(np.abs(g - empty).mean()) > 1.0


async def smoke_one(task: Task, env: AsyncDesktopEnv, domain: str, settle_s: float = 2.0,
                    empty: np.ndarray | None = None) -> SmokeResult:
    res = SmokeResult(id=task.id, domain=domain)
    t0 = time.perf_counter()
    try:
        obs = await env.reset(task)
    except EnvRequestError as e:
        res.error = f"setup: {e.reason}"[:500]
        return res
    res.setup_ok, res.reset_to_screenshot_s = True, round(time.perf_counter() - t0, 3)
    res.blank = is_blank(obs.png, empty)
    await asyncio.sleep(settle_s)
    later, _, _ = await env.step(WAIT0)  # a wait action with a screenshot: the screen now
    first = gray(obs.png)
    res.distance_after = round(compare(first, gray(later.png, (first.shape[1], first.shape[0]))).distance, 3)
    res.unsettled = res.distance_after > THRESHOLD
    try:
        res.noop_score = await env.evaluate(task, None)
    except EnvRequestError as e:
        res.error = f"evaluate: {e.reason}"[:500]
    return res


async def smoke_tasks(client: AsyncEnvClient, tasks: list[Task], domains: dict[str, str], desktops: int,
                      screen: tuple[int, int], settle_s: float = 2.0, progress: Any = None) -> list[SmokeResult]:
    """Each task on one of ``desktops`` desktops of ``screen`` size, several at once; ``domains``: each
    task's domain by id, as ``tasks check`` reported it."""
    done = 0
    empty: list[np.ndarray] = []  # the empty desktop, grabbed once: what "nothing open" looks like

    async def work(task: Task, env: AsyncDesktopEnv) -> SmokeResult:
        nonlocal done
        if not empty:
            empty.append(gray((await env.reset(None)).png))
        r = await smoke_one(task, env, domains[task.id], settle_s, empty[0])
        done += 1
        if progress is not None:
            progress(done, len(tasks), r)
        return r

    return await each_on_a_desktop(tasks, client, desktops, lambda _t: screen, work)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


def summary(results: list[SmokeResult]) -> dict[str, Any]:
    """The JSON object the command prints last: counts, the no-op passes by name, reset times."""
    times = [r.reset_to_screenshot_s for r in results if r.reset_to_screenshot_s is not None]
    domains: dict[str, dict[str, Any]] = defaultdict(lambda: {"tasks": 0, "setup_ok": 0, "noop_zero": 0})
    for r in results:
        d = domains[r.domain]
        d["tasks"] += 1
        d["setup_ok"] += r.setup_ok
        d["noop_zero"] += r.noop_score == 0
    return {
        "tasks": len(results),
        "setup_ok": sum(r.setup_ok for r in results),
        "noop_zero": sum(r.noop_score == 0 for r in results),
        "noop_nonzero": [r.id for r in results if r.noop_score not in (None, 0)],
        "eval_errors": sum(bool(r.setup_ok and r.noop_score is None) for r in results),
        "blank_first_screenshots": sum(r.blank for r in results),
        "unsettled_first_screenshots": sum(r.unsettled for r in results),
        "reset_to_screenshot_p50_s": _pct(times, 0.5),
        "reset_to_screenshot_p95_s": _pct(times, 0.95),
        "osworld_reset_wait_s": OSWORLD_RESET_WAIT_S,
        "domains": dict(sorted(domains.items())),
    }


def render(results: list[SmokeResult]) -> str:
    """A table per domain, then the tasks that need a look (setup failed, no-op not 0, a bad first screen)."""
    s = summary(results)
    lines = [f"{'domain':<22}{'tasks':>6}{'setup ok':>10}{'no-op 0':>9}{'reset->shot p50':>17}"]
    by_domain: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r.reset_to_screenshot_s is not None:
            by_domain[r.domain].append(r.reset_to_screenshot_s)
    for dom, d in s["domains"].items():
        p50 = _pct(by_domain[dom], 0.5)
        lines.append(f"{dom:<22}{d['tasks']:>6}{d['setup_ok']:>10}{d['noop_zero']:>9}"
                     f"{'-' if p50 is None else f'{p50:.2f} s':>17}")
    lines.append(f"reset to first screenshot: p50 {s['reset_to_screenshot_p50_s']} s, p95 "
                 f"{s['reset_to_screenshot_p95_s']} s (OSWorld's harness: {OSWORLD_RESET_WAIT_S:.0f} s of sleep "
                 "plus setup)")
    for r in results:
        flags = [f for f, on in (("setup failed", not r.setup_ok), ("no-op scored %g" % (r.noop_score or 0),
                                  r.noop_score not in (None, 0)), ("blank first screenshot", r.blank),
                                 ("unsettled first screenshot (distance %s)" % r.distance_after, r.unsettled),
                                 ("evaluation failed", r.setup_ok and r.noop_score is None)) if on]
        if flags:
            lines.append(f"  {r.domain}/{r.id}: {'; '.join(flags)}{': ' + r.error if r.error else ''}")
    return "\n".join(lines)


def results_json(results: list[SmokeResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
