"""Evaluator metrics: (result, expected, **options) -> a score in [0, 1].

OSWorld's task files are scored by OSWorld's own functions (``osworld_lib``: desktop-env's
table.py, general.py, vscode.py, basic_os.py, libreoffice.py), plus ours written from their rules
where their module does not load here (``compare_docx_files``, ``compare_docx_tables``,
``compare_line_spacing``, ``compare_docx_files_and_ignore_new_lines``: desktop-env's docs.py imports
easyocr and torch). The built-in suite's metrics (agentenv's dialect) strip and normalise text.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable

from agentenv.envs.tasks import osworld_lib


# ----------------------------------------------------------------------------- ours, OSWorld's rules

def _docx_paragraphs(path: str) -> list[str] | None:
    if path.endswith(".docx"):
        from docx import Document

        return [p.text for p in Document(path).paragraphs]
    if path.endswith(".odt"):
        from odf import teletype
        from odf.opendocument import load
        from odf.text import P

        return [teletype.extractText(p) for p in load(path).getElementsByType(P)]
    return None


def compare_docx_files(file1: Any, file2: Any, **options: Any) -> float:
    """desktop-env's docs.compare_docx_files: the paragraphs' text of two .docx (or two .odt)
    files; options ignore_blanks (default true), ignore_case, ignore_order, content_only,
    fuzzy_match, delete_empty_lines. (Their .odt reader drops some nested text; odfpy's teletype
    reads all of it, <text:s/> spaces included.)"""
    from rapidfuzz import fuzz

    if not file1 or not file2 or file1.rsplit(".", 1)[-1] != file2.rsplit(".", 1)[-1]:
        return 0.0
    try:
        p1, p2 = _docx_paragraphs(file1), _docx_paragraphs(file2)
    except Exception:  # not a document: the task is not done
        return 0.0
    if p1 is None or p2 is None:
        return 0.0
    if options.get("ignore_order", False):
        p1, p2 = sorted(p1), sorted(p2)
    if options.get("delete_empty_lines", False):
        p1, p2 = [p for p in p1 if p.strip()], [p for p in p2 if p.strip()]
    ignore_case = options.get("ignore_case", False)
    if options.get("content_only", False) or options.get("ignore_blanks", True):
        t1 = re.sub(r"\s+", " ", "\n".join(p1)).strip()
        t2 = re.sub(r"\s+", " ", "\n".join(p2)).strip()
        if ignore_case:
            t1, t2 = t1.lower(), t2.lower()
        if options.get("content_only", False) or options.get("fuzzy_match", False):
            return fuzz.ratio(t1, t2) / 100.0
        return float(t1 == t2)
    if len(p1) != len(p2):
        return 0.0
    if ignore_case:
        p1, p2 = [p.lower() for p in p1], [p.lower() for p in p2]
    if options.get("fuzzy_match", False):
        return sum(fuzz.ratio(a, b) / 100.0 for a, b in zip(p1, p2)) / len(p1) if p1 else 1.0
    return float(p1 == p2)


def _docx(path: Any):
    from docx import Document

    if not path or not str(path).endswith(".docx"):
        return None
    try:
        return Document(path)
    except Exception:  # not a document (anymore): the task is not done
        return None


def compare_docx_tables(file1: Any, file2: Any) -> float:
    """desktop-env's docs.compare_docx_tables: same number of tables, of the same shape, with the
    same text in each cell (stripped)."""
    d1, d2 = _docx(file1), _docx(file2)
    if d1 is None or d2 is None or len(d1.tables) != len(d2.tables):
        return 0.0
    for t1, t2 in zip(d1.tables, d2.tables):
        if len(t1.rows) != len(t2.rows) or len(t1.columns) != len(t2.columns):
            return 0.0
        for i in range(len(t1.rows)):
            for j in range(len(t1.columns)):
                if t1.cell(i, j).text.strip() != t2.cell(i, j).text.strip():
                    return 0.0
    return 1.0


def compare_line_spacing(file1: Any, file2: Any) -> float:
    """desktop-env's docs.compare_line_spacing: the same text (compare_docx_files) and the same line
    spacing, paragraph by paragraph."""
    if not compare_docx_files(file1, file2):
        return 0.0
    d1, d2 = _docx(file1), _docx(file2)
    if d1 is None or d2 is None or len(d1.paragraphs) != len(d2.paragraphs):
        return 0.0
    return float(all(a.paragraph_format.line_spacing == b.paragraph_format.line_spacing
                     for a, b in zip(d1.paragraphs, d2.paragraphs)))


def compare_docx_files_and_ignore_new_lines(file1: Any, file2: Any, **options: Any) -> float:
    """desktop-env's docs.compare_docx_files_and_ignore_new_lines: empty paragraphs dropped, then the
    text compared (whitespace collapsed unless ``ignore_blanks`` is false)."""
    d1, d2 = _docx(file1), _docx(file2)
    if d1 is None or d2 is None:
        return 0.0
    p1 = [p.text for p in d1.paragraphs if p.text != ""]
    p2 = [p.text for p in d2.paragraphs if p.text != ""]
    if options.get("ignore_blanks", True):
        return float(re.sub(r"\s+", " ", "\n".join(p1)).strip() == re.sub(r"\s+", " ", "\n".join(p2)).strip())
    return float(p1 == p2)


OURS: dict[str, Callable[..., float]] = {
    "compare_docx_files": compare_docx_files, "compare_docx_tables": compare_docx_tables,
    "compare_line_spacing": compare_line_spacing,
    "compare_docx_files_and_ignore_new_lines": compare_docx_files_and_ignore_new_lines}


def osworld_metric(name: str) -> Callable[..., float]:
    """OSWorld's metric ``name``; EvaluatorError naming what is missing when it cannot run here."""
    from agentenv.envs.tasks.getters import EvaluatorError

    if name in OURS:
        return OURS[name]
    fn = osworld_lib.load().get(name)
    if fn is not None:
        return fn
    why = osworld_lib.why_missing(name)
    if why:
        raise EvaluatorError(f"metric {name!r} cannot run here: needs {why}")
    raise EvaluatorError(f"unknown metric {name!r}")


def osworld_metric_names() -> set[str]:
    return set(OURS) | set(osworld_lib.load())


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
