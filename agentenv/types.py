"""Data that crosses a boundary: tasks, actions, steps, trajectories, groups.

Plain dataclasses with ``to_dict``/``from_dict`` so they round-trip through JSON (the env
service), and parquet (the buffer) without a schema of their own.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

ACTION_TYPES = (
    "click", "double_click", "right_click", "middle_click", "drag", "move", "type", "hotkey",
    "key", "scroll", "wait", "finished", "call_user", "pyautogui",
)
SCROLL_DIRECTIONS = ("up", "down", "left", "right")


@dataclass
class Action:
    """One structured action on the desktop, in screen pixels.

    ``type`` is one of ACTION_TYPES. Pointer actions use ``x``/``y`` (``drag`` also ``x2``/``y2``);
    ``type`` uses ``text``; ``hotkey``/``key`` use ``keys`` (xdotool/X keysym-ish names such as
    ``ctrl``, ``Return``, ``a``); ``scroll`` uses ``direction`` and ``amount`` (wheel clicks);
    ``finished`` may carry ``text`` (the answer); ``pyautogui`` carries ``code`` that runs only
    after the allow-list in ``agentenv.envs.actions`` accepts it.
    """

    type: str
    x: float | None = None
    y: float | None = None
    x2: float | None = None
    y2: float | None = None
    text: str | None = None
    keys: list[str] | None = None
    direction: str | None = None
    amount: int = 5
    seconds: float = 1.0
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Per step on the hot path: avoid dataclasses.asdict's deep copies.
        d = {k: getattr(self, k) for k in _ACTION_FIELDS}
        if self.keys is not None:
            d["keys"] = list(self.keys)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Action":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown action fields {sorted(unknown)}")
        if d.get("type") not in ACTION_TYPES:
            raise ValueError(f"unknown action type {d.get('type')!r}; expected one of {ACTION_TYPES}")
        return cls(**d)

    @property
    def is_terminal(self) -> bool:
        return self.type in ("finished", "call_user")


_ACTION_FIELDS = tuple(f.name for f in dataclasses.fields(Action))


@dataclass
class Task:
    """An OSWorld-style task: instruction, setup steps, evaluator, and optionally an oracle."""

    id: str
    instruction: str
    config: list[dict[str, Any]] = field(default_factory=list)
    evaluator: dict[str, Any] = field(default_factory=dict)
    oracle: list[dict[str, Any]] | None = None
    related_apps: list[str] = field(default_factory=list)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """OSWorld-style JSON: the keys we do not model (``extra``) at the top level, as in a task
        file, so ``Task.from_dict(t.to_dict()) == t``."""
        d = dataclasses.asdict(self)
        return {**d.pop("extra"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> "Task":
        if not isinstance(d, dict):
            raise ValueError(f"task must be a JSON object, got {type(d).__name__}")
        for key in ("id", "instruction"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise ValueError(f"task {source or '?'}: missing or empty {key!r}")
        known = {"id", "instruction", "config", "evaluator", "oracle", "related_apps", "source"}
        for key, kind in (("config", list), ("evaluator", dict), ("oracle", list), ("related_apps", list)):
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise ValueError(f"task {d['id']!r}: {key!r} must be a JSON {'array' if kind is list else 'object'}, "
                                 f"got {type(d[key]).__name__}")
        return cls(
            id=d["id"],
            instruction=d["instruction"],
            config=list(d.get("config") or []),
            evaluator=dict(d.get("evaluator") or {}),
            oracle=d.get("oracle"),
            related_apps=list(d.get("related_apps") or []),
            source=source or d.get("source", ""),
            extra={k: v for k, v in d.items() if k not in known},
        )


class Status(str, enum.Enum):
    """How a trajectory ended. Every trajectory ends with exactly one, plus a reason.

    Three kinds: outcomes of the policy (``trainable``: the data says something about the
    model), failures of the infrastructure (``infrastructure``: the model service, the desktop,
    the evaluator, our own timeouts; a resumed run reruns them), and a broken task.
    """

    FINISHED = "finished"            # the model said finished(...)
    CALL_USER = "call_user"          # the model asked for the user
    MAX_STEPS = "max_steps"
    INVALID = "invalid"              # too many unparseable replies in a row
    TIMEOUT = "timeout"              # a model call or the whole trajectory ran out of time
    ENV_ERROR = "env_error"          # the desktop died and retries ran out
    LLM_ERROR = "llm_error"          # the model service failed after retries
    EVAL_ERROR = "eval_error"        # the evaluator could not score the end state
    ERROR = "error"                  # an unexpected error in agentenv itself (a bug: see the reason)
    CANCELLED = "cancelled"          # the scheduler stopped before it finished
    TASK_ERROR = "task_error"        # the task itself is broken (bad file, failing setup)

    @property
    def trainable(self) -> bool:
        return self in _POLICY_OUTCOMES

    @property
    def infrastructure(self) -> bool:
        return self in _INFRASTRUCTURE


_POLICY_OUTCOMES = frozenset({Status.FINISHED, Status.CALL_USER, Status.MAX_STEPS, Status.INVALID})
_INFRASTRUCTURE = frozenset({Status.TIMEOUT, Status.ENV_ERROR, Status.LLM_ERROR, Status.EVAL_ERROR,
                             Status.ERROR, Status.CANCELLED})


# ------------------------------------------------------------------ prompt token ids, compactly
# A step's prompt usually repeats the previous step's (same system prompt, same earlier replies)
# and most of its length is runs of one image placeholder token. A step stores only the length
# it shares with the previous step's prompt plus the rest, with runs of one token written as
# (-count, token): exact ids at a fraction of the size. Token ids are never negative.
_RUN = 8  # shorter runs are cheaper written out


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, one comparison in C
        return n
    lo, hi = 0, n       # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def encode_prompt(previous: list[int] | None, prompt: list[int]) -> tuple[int, list[int]]:
    """``prompt`` as (tokens shared with ``previous``, the rest run-length encoded)."""
    shared = _shared_prefix(previous, prompt) if previous else 0
    out: list[int] = []
    for t, run in itertools.groupby(prompt[shared:]):
        k = len(list(run))
        if k >= _RUN:
            out += (-k, t)
        else:
            out += [t] * k
    return shared, out


def decode_prompt(previous: list[int] | None, shared: int, delta: list[int]) -> list[int]:
    """The inverse of ``encode_prompt``."""
    out = list(previous[:shared]) if shared else []
    it = iter(delta)
    for v in it:
        if v < 0:
            out += [next(it)] * -v
        else:
            out.append(v)
    return out


@dataclass
class Step:
    index: int
    text: str = ""
    thought: str = ""
    action: dict[str, Any] | None = None
    valid: bool = True
    error: str = ""
    # The prompt's token ids as the server saw them, stored against the previous step's prompt
    # (see encode_prompt); Trajectory.prompt_ids(i) gives them back whole.
    prompt_shared: int = 0
    prompt_delta: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str = ""
    screenshot: str = ""             # file the screenshot this step saw was saved to
    image_steps: list[int] = field(default_factory=list)  # steps whose screenshots are in the prompt, in order
    llm_latency_s: float = 0.0
    env_latency_s: float = 0.0
    policy_version: int = 0
    env_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Step":
        return cls(**d)


@dataclass
class Trajectory:
    task_id: str
    sample: int
    status: Status = Status.CANCELLED
    reason: str = ""
    reward: float = 0.0
    steps: list[Step] = field(default_factory=list)
    attempts: int = 1
    env_id: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    final_screenshot: str = ""       # file the screen after the last action was saved to

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.sample)

    @property
    def policy_versions(self) -> list[int]:
        return [s.policy_version for s in self.steps]

    def add_step(self, step: Step, prompt: list[int], previous_prompt: list[int] | None) -> None:
        """Append ``step`` with its full ``prompt`` stored against the previous step's."""
        step.prompt_shared, step.prompt_delta = encode_prompt(previous_prompt, prompt)
        self.steps.append(step)

    def prompt_ids(self) -> list[list[int]]:
        """Every step's prompt token ids, whole."""
        out: list[list[int]] = []
        prev: list[int] | None = None
        for s in self.steps:
            prev = decode_prompt(prev, s.prompt_shared, s.prompt_delta)
            out.append(prev)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        d = dict(d)
        d["status"] = Status(d["status"])
        d["steps"] = [Step.from_dict(s) for s in d.get("steps") or []]
        return cls(**d)


@dataclass
class Group:
    """All ``rollout_n`` samples of one task: the unit a GRPO-style trainer consumes."""

    task_id: str
    trajectories: list[Trajectory]
    stale: bool = False

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    @property
    def min_policy_version(self) -> int | None:
        """The oldest policy that produced a step of this group; None when it has no steps."""
        versions = [v for t in self.trajectories for v in t.policy_versions]
        return min(versions) if versions else None
