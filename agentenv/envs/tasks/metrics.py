"""Evaluator metrics: (result, expected, **options) -> a score in [0, 1].

OSWorld's task files are scored by OSWorld's own functions (``osworld_lib``: desktop-env's
table.py, general.py, vscode.py, basic_os.py, libreoffice.py, docs.py). The built-in suite's metrics
(agentenv's dialect) strip and normalise text.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable

from agentenv.envs.tasks import osworld_lib


def osworld_metric(name: str) -> Callable[..., float]:
    """OSWorld's metric ``name``; EvaluatorError naming what is missing when it cannot run here."""
    from agentenv.envs.tasks.getters import EvaluatorError

    fn = osworld_lib.load().get(name)
    if fn is not None:
        return fn
    why = osworld_lib.why_missing(name)
    if why:
        raise EvaluatorError(f"metric {name!r} cannot run here: needs {why}")
    raise EvaluatorError(f"unknown metric {name!r}")


# ----------------------------------------------------------------------------- agentenv's dialect

def _norm(s: Any, options: dict) -> str:
    s = "" if s is None else str(s)
    if options.get("strip", True):
        s = s.strip()
    if options.get("ignore_case"):
        s = s.lower()
    if options.get("collapse_whitespace"):
        s = re.sub(r"\s+", " ", s)
    return s


def exact_match(result: Any, expected: Any, options: dict) -> float:
    if result is None:
        return 0.0
    return float(_norm(result, options) == _norm(expected, options))


def fuzzy_match(result: Any, expected: Any, options: dict) -> float:
    if result is None:
        return 0.0
    ratio = difflib.SequenceMatcher(None, _norm(result, options), _norm(expected, options)).ratio()
    return float(ratio >= float(options.get("threshold", 0.9)))


def check_include_exclude(result: Any, rules: Any, options: dict) -> float:
    if result is None:
        return 0.0
    text = _norm(result, options)
    inc = rules.get("include", []) if isinstance(rules, dict) else []
    exc = rules.get("exclude", []) if isinstance(rules, dict) else []
    return float(all(_norm(i, options) in text for i in inc) and not any(_norm(e, options) in text for e in exc))


def is_true(result: Any, expected: Any, options: dict) -> float:
    return float(bool(result) == (True if expected is None else bool(expected)))


def number_match(result: Any, expected: Any, options: dict) -> float:
    try:
        return float(abs(float(str(result).strip()) - float(expected)) <= float(options.get("tolerance", 1e-6)))
    except (TypeError, ValueError):
        return 0.0


AGENTENV_METRICS: dict[str, Callable[[Any, Any, dict], float]] = {
    "exact_match": exact_match, "fuzzy_match": fuzzy_match, "check_include_exclude": check_include_exclude,
    "is_true": is_true, "number_match": number_match}
