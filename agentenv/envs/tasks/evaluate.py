"""OSWorld-style evaluators: ``{func, result, expected, options, conj}`` -> a score in [0, 1].

Result getters (what the desktop holds): vm_file, file_exists, vm_command_line, window_title,
window_titles, clipboard, spreadsheet_cell. Expected: ``{"type": "rule", "rules": {...}}`` or
``{"type": "literal", "value": ...}``. Metrics: exact_match, fuzzy_match, check_include_exclude,
is_true, number_match. ``func``/``result``/``expected`` may be lists (combined by ``conj``).
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import subprocess
import zipfile
from typing import Any
from xml.etree import ElementTree

from agentenv.types import Task


class EvaluatorError(RuntimeError):
    """The evaluator spec is malformed or names an unsupported getter or metric."""


# ----------------------------------------------------------------------------- getters

# The desktop user writes the files evaluators read: a file it made huge (``truncate -s 100G``)
# must not be read whole into the service's memory.
MAX_READ_BYTES = 16 * 2**20


def _vm_file(desktop: Any, spec: dict) -> str | None:
    path = desktop.resolve_path(spec["path"])
    try:  # O_NONBLOCK: a FIFO the agent left there must not hang the evaluator
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, IsADirectoryError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_READ_BYTES + 1)
    if len(data) > MAX_READ_BYTES:
        raise EvaluatorError(f"{spec['path']!r} is over {MAX_READ_BYTES} bytes: not read")
    return data.decode("utf-8", "replace")


def _file_exists(desktop: Any, spec: dict) -> bool:
    return desktop.resolve_path(spec["path"]).exists()


def _vm_command_line(desktop: Any, spec: dict) -> str:
    cmd = spec["command"]
    try:
        r = desktop.run(cmd, shell=isinstance(cmd, str), timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    return r.stdout


def _window_title(desktop: Any, spec: dict) -> str:
    return desktop.active_window_title()


def _window_titles(desktop: Any, spec: dict) -> str:
    return "\n".join(desktop.window_titles())


def _clipboard(desktop: Any, spec: dict) -> str:
    return desktop.clipboard()


_ODS_NS = {"table": "urn:oasis:names:tc:opendocument:xmlns:table:1.0",
           "office": "urn:oasis:names:tc:opendocument:xmlns:office:1.0",
           "text": "urn:oasis:names:tc:opendocument:xmlns:text:1.0"}


def read_ods_cells(path) -> dict[str, dict[str, str]]:
    """Read an .ods file (no LibreOffice needed): {sheet: {"A1": value}}, values as text."""
    T = "{%s}" % _ODS_NS["table"]
    O = "{%s}" % _ODS_NS["office"]
    with zipfile.ZipFile(path) as z:
        if z.getinfo("content.xml").file_size > MAX_READ_BYTES:  # a zip bomb stays packed
            raise EvaluatorError(f"{path}: content.xml is over {MAX_READ_BYTES} bytes unpacked")
        root = ElementTree.fromstring(z.read("content.xml"))
    out: dict[str, dict[str, str]] = {}
    for sheet in root.iter(T + "table"):
        cells: dict[str, str] = {}
        r = 0
        for row in sheet.iter(T + "table-row"):
            rrep = int(row.get(T + "number-rows-repeated", "1"))
            c = 0
            for cell in row:
                if cell.tag not in (T + "table-cell", T + "covered-table-cell"):
                    continue
                crep = int(cell.get(T + "number-columns-repeated", "1"))
                value = cell.get(O + "value")
                text = "\n".join("".join(p.itertext()) for p in cell.findall("{%s}p" % _ODS_NS["text"]))
                v = value if value is not None else text
                if v != "" and crep < 1000:
                    for k in range(crep):
                        cells[f"{_col_name(c + k)}{r + 1}"] = v
                c += crep
            r += rrep if rrep < 100000 else 1
        out[sheet.get(T + "name", "")] = cells
    return out


def _col_name(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        s = chr(65 + rem) + s
    return s


def _spreadsheet_cell(desktop: Any, spec: dict) -> str | None:
    path = desktop.resolve_path(spec["path"])
    if not path.is_file():
        return None
    try:
        sheets = read_ods_cells(path)
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError, OSError, ValueError):
        return None
    sheet = sheets.get(spec["sheet"]) if spec.get("sheet") else next(iter(sheets.values()), {})
    return (sheet or {}).get(spec["cell"].upper())


GETTERS = {
    "vm_file": _vm_file, "file_exists": _file_exists, "vm_command_line": _vm_command_line,
    "window_title": _window_title, "window_titles": _window_titles, "clipboard": _clipboard,
    "spreadsheet_cell": _spreadsheet_cell,
}


# ----------------------------------------------------------------------------- metrics

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


METRICS = {"exact_match": exact_match, "fuzzy_match": fuzzy_match,
           "check_include_exclude": check_include_exclude, "is_true": is_true, "number_match": number_match}


def _expected_value(spec: Any) -> Any:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return spec
    kind = spec.get("type")
    if kind == "rule":
        rules = spec.get("rules", {})
        return rules["expected"] if isinstance(rules, dict) and "expected" in rules else rules
    if kind == "literal":
        return spec.get("value")
    raise EvaluatorError(f"unsupported expected type {kind!r} (supported: rule, literal)")


def validate_evaluator(ev: dict) -> None:
    """Check the spec names only known getters and metrics; raise EvaluatorError otherwise."""
    if not isinstance(ev, dict):
        raise EvaluatorError(f"evaluator must be an object, got {type(ev).__name__}")
    funcs = ev.get("func")
    if funcs is None:
        raise EvaluatorError("evaluator has no 'func'")
    for f in funcs if isinstance(funcs, list) else [funcs]:
        if not isinstance(f, str) or (f not in METRICS and f != "infeasible"):
            raise EvaluatorError(f"unsupported metric {f!r} (supported: {sorted(METRICS)}, infeasible)")
    results = ev.get("result")
    for r in results if isinstance(results, list) else [results]:
        if r is None:
            continue
        if not isinstance(r, dict) or not isinstance(r.get("type"), str) or r["type"] not in GETTERS:
            what = r.get("type") if isinstance(r, dict) else r
            raise EvaluatorError(f"unsupported result getter {what!r} (supported: {sorted(GETTERS)})")


def evaluate(desktop: Any, task: Task, last_action: str | None = None) -> float:
    ev = task.evaluator
    validate_evaluator(ev)
    funcs = ev["func"] if isinstance(ev["func"], list) else [ev["func"]]
    if funcs == ["infeasible"]:
        return float(last_action == "call_user")  # the agent must give up on infeasible tasks
    results = ev.get("result") if isinstance(ev.get("result"), list) else [ev.get("result")]
    expecteds = ev.get("expected") if isinstance(ev.get("expected"), list) else [ev.get("expected")]
    options = ev.get("options") if isinstance(ev.get("options"), list) else [ev.get("options") or {}] * len(funcs)
    if not (len(funcs) == len(results) == len(expecteds) == len(options)):
        raise EvaluatorError("func, result, expected and options must have the same length")
    scores = []
    for f, r, e, o in zip(funcs, results, expecteds, options):
        if r is None or not isinstance(o or {}, dict):
            raise EvaluatorError("each metric needs a result getter, and options must be objects")
        try:
            value = GETTERS[r["type"]](desktop, r)
            scores.append(METRICS[f](value, _expected_value(e), o or {}))
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as err:  # a malformed spec
            raise EvaluatorError(f"{f} on {r.get('type')}: {type(err).__name__}: {err}") from err
    conj = ev.get("conj", "and")
    return max(scores) if conj == "or" else min(scores)
