"""Evaluators: ``{func, result, expected, options, conj, postconfig}`` -> a score in [0, 1].

As OSWorld scores: ``evaluator.postconfig`` runs first (a step that fails is logged and scoring
goes on, as OSWorld's does; a step type we cannot run is an error); ``infeasible`` scores 1 only
when the last action gave up (FAIL / ``call_user``), and in OSWorld's dialect a feasible task the
agent gave up on scores 0; ``func``/``result``/``expected``/``options`` may be lists, combined by
``conj`` ("and": 0 as soon as one is 0, else the mean; "or": 1 as soon as one is 1, else the max).

Which dialect (getters.py says how they differ): ``evaluator.dialect`` when given, else OSWorld's
for a task with a ``snapshot`` field (every OSWorld task file names its VM snapshot: "os",
"libreoffice_calc", ...) other than our own "agentenv-*", else agentenv's.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import threading
from pathlib import Path
from typing import Any

from loguru import logger

from agentenv.envs.tasks import chrome_getters, getters, metrics
from agentenv.envs.tasks.app_getters import APP_GETTERS
from agentenv.envs.tasks.getters import EvaluatorError, EvalContext
from agentenv.types import Task

# What the last action is when the agent gave up: OSWorld's FAIL, UI-TARS's call_user.
GAVE_UP = {"FAIL", "fail", "call_user"}

__all__ = ["EvaluatorError", "dialect", "evaluate", "validate_evaluator", "GAVE_UP"]


def dialect(task: Task) -> str:
    ev = task.evaluator if isinstance(task.evaluator, dict) else {}
    d = ev.get("dialect")
    if d in ("osworld", "agentenv"):
        return d
    snapshot = task.extra.get("snapshot")
    return "osworld" if isinstance(snapshot, str) and not snapshot.startswith("agentenv") else "agentenv"


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _funcs(ev: dict) -> list[Any]:
    funcs = ev.get("func")
    if funcs is None or funcs == "" or funcs == []:  # drafts in OSWorld's folders have an empty func
        raise EvaluatorError("evaluator has no 'func'")
    return _as_list(funcs)


def getter_for(kind: Any, dia: str, role: str):
    table = {**getters.OSWORLD_GETTERS, **APP_GETTERS} if dia == "osworld" else getters.AGENTENV_GETTERS
    if isinstance(kind, str) and kind in table:
        return table[kind]
    if dia == "osworld" and isinstance(kind, str) and kind in chrome_getters.getter_names():
        return chrome_getters.getter(kind)  # desktop-env's own, through the desktop's network
    if dia == "osworld" and isinstance(kind, str) and kind in getters.GETTER_NEEDS:
        raise EvaluatorError(f"{role} getter {kind!r} cannot run here: needs {getters.GETTER_NEEDS[kind]}")
    raise EvaluatorError(f"unsupported {role} getter {kind!r} (supported: {sorted(table)})")


def validate_evaluator(ev: Any, dia: str = "agentenv") -> None:
    """Check the spec names only getters and metrics that run here; EvaluatorError says what not."""
    if not isinstance(ev, dict):
        raise EvaluatorError(f"evaluator must be an object, got {type(ev).__name__}")
    funcs = _funcs(ev)
    if funcs == ["infeasible"]:
        return
    for f in funcs:
        if not isinstance(f, str):
            raise EvaluatorError(f"unsupported metric {f!r}")
        if dia == "osworld":
            metrics.osworld_metric(f)
        elif f not in metrics.AGENTENV_METRICS:
            raise EvaluatorError(f"unsupported metric {f!r} (supported: {sorted(metrics.AGENTENV_METRICS)}, "
                                 "infeasible)")
    for role in ("result", "expected"):
        for r in _as_list(ev.get(role)):
            if r is None:
                continue
            if not isinstance(r, dict):
                raise EvaluatorError(f"{role} must be an object, got {r!r}")
            if dia == "agentenv" and role == "expected" and r.get("type") in ("rule", "literal"):
                continue
            getter_for(r.get("type"), dia, role)


def _expected_value_agentenv(spec: Any) -> Any:
    if spec is None or not isinstance(spec, dict):
        return spec
    kind = spec.get("type")
    if kind == "rule":
        rules = spec.get("rules", {})
        return rules["expected"] if isinstance(rules, dict) and "expected" in rules else rules
    if kind == "literal":
        return spec.get("value")
    raise EvaluatorError(f"unsupported expected type {kind!r} (supported: rule, literal)")


def _run_postconfig(desktop: Any, task: Task) -> None:
    from agentenv.envs.tasks.setup import SETUP_STEPS, TaskSetupError, run_postconfig

    steps = task.evaluator.get("postconfig") or []
    for s in steps if isinstance(steps, list) else []:
        kind = s.get("type") if isinstance(s, dict) else None
        if not isinstance(kind, str) or kind not in SETUP_STEPS:
            raise EvaluatorError(f"postconfig step {kind!r} cannot run here")
    try:
        run_postconfig(desktop, task)
    except TaskSetupError as e:  # OSWorld logs a failed step and scores what is there
        logger.warning("task {}: postconfig: {}", task.id, e)


def evaluate(desktop: Any, task: Task, last_action: str | None = None) -> float:
    ev = task.evaluator
    dia = dialect(task)
    validate_evaluator(ev, dia)
    _run_postconfig(desktop, task)
    funcs = _funcs(ev)
    if funcs == ["infeasible"]:
        return float(last_action in GAVE_UP)  # the agent must give up on infeasible tasks
    if dia == "osworld" and last_action in GAVE_UP:
        return 0.0  # OSWorld: giving up on a feasible task scores 0
    n = len(funcs)
    results = _as_list(ev.get("result"))
    has_expected = bool(ev.get("expected"))
    expecteds = _as_list(ev.get("expected")) if has_expected else [None] * n
    raw_opts = ev.get("options")
    options = raw_opts if isinstance(raw_opts, list) else [raw_opts or {}] * n
    if not (n == len(results) == len(expecteds) == len(options)):
        raise EvaluatorError("func, result, expected and options must have the same length")
    conj = ev.get("conj", "and")
    scores: list[float] = []
    with tempfile.TemporaryDirectory(prefix="agentenv-eval-") as tmp:
        ctx = EvalContext(desktop, task, Path(tmp), last_action)
        for f, r, e, o in zip(funcs, results, expecteds, options):
            if r is None or not isinstance(o or {}, dict):
                raise EvaluatorError("each metric needs a result getter, and options must be objects")
            score = _score(ctx, dia, f, r, e, o or {}, has_expected)
            if conj == "and" and score == 0.0:
                return 0.0
            if conj == "or" and score == 1.0:
                return 1.0
            scores.append(score)
    return sum(scores) / len(scores) if conj == "and" else max(scores)


_UNSET = object()
_PRINTS = threading.Lock()


def _score(ctx: EvalContext, dia: str, f: str, r: dict, e: Any, o: dict, has_expected: bool) -> float:
    value: Any = _UNSET
    try:
        value = getter_for(r.get("type"), dia, "result")(ctx, r)
        if dia == "agentenv":
            return float(metrics.AGENTENV_METRICS[f](value, _expected_value_agentenv(e), o))
        fn = metrics.osworld_metric(f)
        expected = getter_for(e.get("type"), dia, "expected")(ctx, e) if has_expected and e is not None else _UNSET
        printed = io.StringIO()
        # OSWorld's metrics print what they compare: into the debug log. sys.stdout is one for the
        # process, so desktops scoring at once take turns (a metric takes milliseconds to a second).
        with _PRINTS, contextlib.redirect_stdout(printed):
            out = fn(value, **o) if expected is _UNSET else fn(value, expected, **o)
        if printed.getvalue():
            logger.debug("task {}: {} printed: {}", ctx.task.id, f, printed.getvalue()[:2000])
        return float(out or 0.0)
    except EvaluatorError:
        raise
    except Exception as err:
        if value is not _UNSET and value_missing(value):
            return 0.0  # the file or output the metric reads is not there: the task is not done
        raise EvaluatorError(f"{f} on {r.get('type')}: {type(err).__name__}: {err}") from err


def value_missing(value: Any) -> bool:
    return value is None or (isinstance(value, list) and any(v is None for v in value))
