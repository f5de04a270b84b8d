"""What the report shows, computed from trajectories: pure logic, no I/O.

Action markers (what to draw on a screenshot, in screen pixels), one-line action summaries,
the run overview (statuses, success by task, rewards, latencies), the timelines (steps/s and
desktops busy over time) and the replay records the viewer puts next to the original.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from agentenv.types import Status, Trajectory

DEFAULT_SCREEN = (1920, 1080)


# ------------------------------------------------------------------ actions
@dataclass
class Marker:
    """One thing drawn over a screenshot. Coordinates are screen pixels (the action's own)."""

    kind: str                 # point | drag | scroll | text | keys | note
    x: float | None = None
    y: float | None = None
    x2: float | None = None
    y2: float | None = None
    label: str = ""


def _actions(action: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not action:
        return []
    if action.get("type") == "sequence":
        return [a for a in action.get("actions") or [] if isinstance(a, dict)]
    return [action]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _short(text: str, n: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 1] + "…"


def action_markers(action: dict[str, Any] | None) -> list[Marker]:
    """Markers for a step's action (a ``sequence`` gives one per action)."""
    out: list[Marker] = []
    for a in _actions(action):
        t = a.get("type", "")
        x, y = _num(a.get("x")), _num(a.get("y"))
        if t == "drag" and x is not None and y is not None and _num(a.get("x2")) is not None:
            out.append(Marker("drag", x, y, _num(a.get("x2")), _num(a.get("y2")), "drag"))
        elif t == "scroll":
            out.append(Marker("scroll", x, y, label=f"scroll {a.get('direction', '')} {a.get('amount', '')}".strip()))
        elif x is not None and y is not None:
            out.append(Marker("point", x, y, label=t.replace("_", " ")))
        if t == "type" and a.get("text") is not None:
            out.append(Marker("text", label=_short(str(a["text"]))))
        elif t in ("hotkey", "key") and a.get("keys"):
            out.append(Marker("keys", label="+".join(map(str, a["keys"]))))
        elif t in ("finished", "call_user", "wait", "pyautogui"):
            out.append(Marker("note", label=action_summary(a)))
    return out


def action_summary(action: dict[str, Any] | None) -> str:
    """One line: ``click (120, 340)``, ``type 'hello'``, ``hotkey ctrl+s``..."""
    parts = []
    for a in _actions(action):
        t = a.get("type", "?")
        x, y = _num(a.get("x")), _num(a.get("y"))
        at = f" ({x:.0f}, {y:.0f})" if x is not None and y is not None else ""
        if t == "drag":
            x2, y2 = _num(a.get("x2")), _num(a.get("y2"))
            to = f" → ({x2:.0f}, {y2:.0f})" if x2 is not None and y2 is not None else ""
            parts.append(f"drag{at}{to}")
        elif t == "type":
            parts.append(f"type “{_short(str(a.get('text', '')))}”")
        elif t in ("hotkey", "key"):
            parts.append(f"{t} {'+'.join(map(str, a.get('keys') or []))}")
        elif t == "scroll":
            parts.append(f"scroll {a.get('direction', '')}{at}")
        elif t == "wait":
            parts.append(f"wait {a.get('seconds', '')}s")
        elif t == "finished":
            parts.append("finished" + (f" “{_short(str(a['text']))}”" if a.get("text") else ""))
        elif t == "pyautogui":
            parts.append(f"pyautogui {_short(str(a.get('code', '')))}")
        else:
            parts.append(f"{t.replace('_', ' ')}{at}")
    return "; ".join(parts) if parts else "(no action)"


# ------------------------------------------------------------------ names and sizes
def slug(task_id: str) -> str:
    """A file name for a task's page: readable, and distinct for distinct ids."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)[:60]
    return f"{safe}-{hashlib.sha1(task_id.encode()).hexdigest()[:6]}"


def base_task_id(key: str) -> str:
    """The task id of a buffer key: later epochs are stored as ``id@e<k>``."""
    return re.sub(r"@e\d+$", "", key)


def screen_of(env_id: str, screens: dict[str, Sequence[int]], default: Sequence[int] = DEFAULT_SCREEN) -> tuple[int, int]:
    """A desktop's screen size from the run's record: by desktop, else by its service, else ``default``."""
    s = screens.get(env_id)
    if s is None and "/envs/" in env_id:
        s = screens.get(env_id.rsplit("/envs/", 1)[0])
    return (int(s[0]), int(s[1])) if s else (int(default[0]), int(default[1]))


# ------------------------------------------------------------------ overview
def _quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    s = sorted(xs)
    return {"p50": s[len(s) // 2], "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "max": s[-1]}


@dataclass
class TaskRow:
    task_id: str
    page: str
    samples: int
    mean_reward: float
    success: float                  # fraction of samples with reward >= 1
    mean_steps: float
    statuses: dict[str, int]
    rewards: list[float]


def success(reward: float) -> bool:
    return reward >= 1.0


def task_rows(trajs: Iterable[Trajectory]) -> list[TaskRow]:
    by: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by[t.task_id].append(t)
    rows = []
    for tid in sorted(by):
        ts = sorted(by[tid], key=lambda t: t.sample)
        rewards = [t.reward for t in ts]
        rows.append(TaskRow(tid, slug(tid), len(ts), statistics.fmean(rewards),
                            sum(map(success, rewards)) / len(ts), statistics.fmean(len(t.steps) for t in ts),
                            dict(Counter(t.status.value for t in ts)), rewards))
    return rows


def overview(trajs: Sequence[Trajectory]) -> dict[str, Any]:
    """Run-level numbers: counts, statuses, rewards, latencies, duration."""
    n = len(trajs)
    steps = [s for t in trajs for s in t.steps]
    starts = [t.started_at for t in trajs if t.started_at]
    ends = [t.ended_at for t in trajs if t.ended_at]
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    rewards = [t.reward for t in trajs]
    statuses = Counter(t.status.value for t in trajs)
    return {
        "trajectories": n,
        "tasks": len({t.task_id for t in trajs}),
        "steps": len(steps),
        "invalid_steps": sum(not s.valid for s in steps),
        "statuses": dict(statuses.most_common()),
        "trainable": sum(t.status.trainable for t in trajs),
        "infrastructure": sum(t.status.infrastructure for t in trajs),
        "mean_reward": statistics.fmean(rewards) if rewards else 0.0,
        "success_rate": sum(map(success, rewards)) / n if n else 0.0,
        "duration_s": span,
        "steps_per_s": len(steps) / span if span > 0 else 0.0,
        "llm_latency_s": _quantiles([s.llm_latency_s for s in steps if s.llm_latency_s > 0]),
        "env_latency_s": _quantiles([s.env_latency_s for s in steps if s.env_latency_s > 0]),
        "desktops": len({t.env_id for t in trajs if t.env_id}),
        "policy_versions": sorted({s.policy_version for s in steps}),
        "started_at": min(starts) if starts else 0.0,
    }


def failures(trajs: Iterable[Trajectory], limit: int = 200) -> list[Trajectory]:
    """Trajectories that ended by a failure (invalid replies, timeouts, errors, broken tasks), newest first."""
    bad = [t for t in trajs if t.status not in _ENDED_BY_POLICY]
    return sorted(bad, key=lambda t: -t.ended_at)[:limit]


_ENDED_BY_POLICY = frozenset({Status.FINISHED, Status.CALL_USER, Status.MAX_STEPS})


# ------------------------------------------------------------------ timelines
def step_times(t: Trajectory, shot_times: Sequence[float | None] | None = None) -> list[float]:
    """Wall-clock end of each step.

    ``shot_times``: when each step's screenshot and then the final one were saved (their files'
    modification times), one more than there are steps; step i ends when step i+1's screenshot
    (or the final one) was saved. Without them, or when they are not within the trajectory's
    start and end (files copied without their times), the steps are laid end to end by their
    model and desktop latencies, the unaccounted time (reset, evaluation) split before and after."""
    n = len(t.steps)
    if not n or not t.started_at:
        return []
    if shot_times is not None and len(shot_times) == n + 1:
        ends = list(shot_times[1:])
        if all(x is not None and t.started_at - 1 <= x <= t.ended_at + 1 for x in ends):
            return ends  # type: ignore[return-value]
    lat = [s.llm_latency_s + s.env_latency_s for s in t.steps]
    total = sum(lat)
    room = max(0.0, t.ended_at - t.started_at)
    scale = min(1.0, room / total) if total > 0 else 0.0
    lead = max(0.0, room - total) / 2 if total > 0 else room / 2
    out, acc = [], t.started_at + lead
    for d in lat:
        acc += d * scale
        out.append(acc)
    return out


def throughput(trajs: Sequence[Trajectory], times: dict[tuple[str, int], list[float]] | None = None,
               bins: int | None = None) -> tuple[list[float], list[float]]:
    """(bin centres in seconds from the run's start, steps per second in that bin). ``times``: each
    trajectory's step end times (``step_times``), estimated here when not given."""
    ends = sorted(x for t in trajs for x in ((times or {}).get(t.key) or step_times(t)))
    if not ends:
        return [], []
    t0 = min(t.started_at for t in trajs if t.started_at)
    t1 = max(max(ends), max(t.ended_at for t in trajs))
    if bins is None:   # bins of at least 2 s: shorter ones count single steps
        bins = max(5, min(60, int((t1 - t0) / 2)))
    width = max((t1 - t0) / bins, 1e-6)
    counts = [0] * bins
    for x in ends:
        counts[min(bins - 1, max(0, int((x - t0) / width)))] += 1
    return [(i + 0.5) * width for i in range(bins)], [c / width for c in counts]


@dataclass
class Lane:
    """One desktop's row in the timeline: (start, end, status) per trajectory, seconds from t0."""

    env_id: str
    spans: list[tuple[float, float, str]] = field(default_factory=list)


def lanes(trajs: Sequence[Trajectory]) -> tuple[list[Lane], float]:
    """Per desktop, the trajectories it ran; and t0 (the run's first start, wall clock)."""
    timed = [t for t in trajs if t.started_at and t.ended_at]
    if not timed:
        return [], 0.0
    t0 = min(t.started_at for t in timed)
    by: dict[str, Lane] = {}
    for t in sorted(timed, key=lambda t: t.started_at):
        lane = by.setdefault(t.env_id or "?", Lane(t.env_id or "?"))
        lane.spans.append((t.started_at - t0, t.ended_at - t0, t.status.value))
    return sorted(by.values(), key=lambda lane: _natural(lane.env_id)), t0


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def busy_series(trajs: Sequence[Trajectory]) -> tuple[list[float], list[int]]:
    """Desktops busy over time as a step function: (times from t0, busy count from that time on)."""
    timed = [t for t in trajs if t.started_at and t.ended_at]
    if not timed:
        return [], []
    t0 = min(t.started_at for t in timed)
    edges = sorted([(t.started_at - t0, 1) for t in timed] + [(t.ended_at - t0, -1) for t in timed])
    xs, ys, busy = [], [], 0
    for x, d in edges:
        busy += d
        if xs and xs[-1] == x:
            ys[-1] = busy
        else:
            xs.append(x)
            ys.append(busy)
    return xs, ys


def mean_busy(xs: list[float], ys: list[int]) -> float:
    if len(xs) < 2:
        return 0.0
    area = sum(ys[i] * (xs[i + 1] - xs[i]) for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0]) if xs[-1] > xs[0] else 0.0


def busy_at(xs: list[float], ys: list[int], x: float) -> int:
    i = bisect.bisect_right(xs, x) - 1
    return ys[i] if i >= 0 else 0


# ------------------------------------------------------------------ replays
@dataclass
class ReplayStep:
    """One compared screenshot of a replay: ``index`` is the recorded step whose screenshot it is
    compared with (``final`` for the screen after the last action)."""

    index: int
    final: bool = False
    distance: float = 0.0             # perceptual distance to the recorded screenshot (see compare.py)
    diverged: bool = False
    region: list[float] | None = None  # [x0, y0, x1, y1] of the differing area, fractions of the image
    screenshot: str = ""              # the replay's screenshot, relative to the run dir
    settle_s: float = 0.0             # how long the replay waited for the screen to match
    step_s: float = 0.0               # the replay's time for this step's actions + screenshot
    error: str = ""                   # the desktop refused an action of this step

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReplayStep":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class ReplayResult:
    task_id: str
    sample: int
    threshold: float
    pace: str
    recorded_reward: float
    recorded_status: str
    reward: float | None = None       # None: not evaluated (the recorded run was not scored either)
    steps: list[ReplayStep] = field(default_factory=list)
    error: str = ""                   # the replay could not run to the end (setup failed, desktop died)
    started_at: float = 0.0
    ended_at: float = 0.0
    screen: list[int] = field(default_factory=list)
    image_size: list[int] = field(default_factory=list)

    @property
    def first_divergence(self) -> ReplayStep | None:
        return next((s for s in self.steps if s.diverged), None)

    @property
    def reward_matches(self) -> bool | None:
        return None if self.reward is None else abs(self.reward - self.recorded_reward) < 1e-9

    @property
    def verdict(self) -> str:
        """identical | diverged | reward differs | error."""
        if self.error:
            return "error"
        if self.first_divergence is not None:
            return "diverged"
        if self.reward_matches is False:
            return "reward differs"
        return "identical"

    def where(self) -> str:
        d = self.first_divergence
        if d is None:
            return ""
        return "final screen" if d.final else f"step {d.index}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReplayResult":
        d = dict(d)
        d["steps"] = [ReplayStep.from_dict(s) for s in d.get("steps") or []]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def row(self) -> dict[str, Any]:
        """The determinism table's row."""
        d = self.first_divergence
        return {
            "task": self.task_id, "sample": self.sample, "steps": sum(not s.final for s in self.steps),
            "verdict": self.verdict, "first_divergence": self.where(),
            "max_distance": round(max((s.distance for s in self.steps), default=0.0), 4),
            "divergence_distance": round(d.distance, 4) if d else None,
            "recorded_reward": self.recorded_reward, "replay_reward": self.reward, "error": self.error,
        }


def determinism_table(results: Iterable[ReplayResult]) -> str:
    """A plain-text table, one row per replay."""
    rows = [r.row() for r in results]
    head = ("task", "sample", "steps", "verdict", "first divergence", "distance", "reward rec/replay")
    lines = [[r["task"], str(r["sample"]), str(r["steps"]), r["verdict"], r["first_divergence"] or "-",
              f"{r['divergence_distance'] if r['divergence_distance'] is not None else r['max_distance']:.3f}",
              f"{r['recorded_reward']:g} / {'-' if r['replay_reward'] is None else format(r['replay_reward'], 'g')}"]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines])
