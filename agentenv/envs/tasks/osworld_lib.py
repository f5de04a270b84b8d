"""OSWorld's own metric functions, from the ``desktop-env`` package (Apache-2.0), module by module.

``desktop-env`` pins an old stack (torch 2.5, numpy<2, transformers 4.35) and its
``evaluators/metrics/__init__.py`` imports every domain (Chrome, GIMP, OCR with torch...), so it is
installed with ``--no-deps`` and never imported as a package: the parent packages are registered as
empty namespaces pointing at its folders, and only the metric modules below are imported, each with
its own imports (openpyxl, pandas, rapidfuzz, lxml, formulas... in requirements/base.txt). Using
their functions makes our scores OSWorld's by construction.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any, Callable

PACKAGE = "desktop_env.evaluators.metrics"

# Modules that load without the pinned stack, and functions of theirs we do not offer: they import
# and run a task's Python test file inside the env service.
LOADABLE = ("table", "general", "vscode", "basic_os", "libreoffice", "docs",
            "slides", "gimp", "vlc", "thunderbird", "pdf", "others", "chrome")
NOT_OFFERED = {
    "compare_image_text": "OCR with easyocr and torch (not installed here)",
    "check_python_file_by_test_suite": "runs a task's Python code inside the env service",
    "check_python_file_by_gold_file": "runs a task's Python code inside the env service",
}
# What a loaded module needs beyond the usual, named in the refusal when its import fails here.
MODULE_NEEDS = {
    "chrome": "beautifulsoup4, PyMuPDF, borb and imagehash (requirements/base.txt)",
}

_lock = threading.Lock()
_loaded: dict[str, Callable[..., Any]] | None = None
_errors: dict[str, str] = {}
_root_dir: list[Path | None] = []


def _root() -> Path | None:
    if not _root_dir:  # found once, before our namespaces stand in for the package
        spec = importlib.util.find_spec("desktop_env")  # the folder, without running its __init__
        ok = spec is not None and spec.submodule_search_locations
        _root_dir.append(Path(list(spec.submodule_search_locations)[0]) if ok else None)
    return _root_dir[0]


def _register_namespaces(root: Path) -> None:
    for name, sub in (("desktop_env", ""), ("desktop_env.evaluators", "evaluators"),
                      ("desktop_env.evaluators.metrics", "evaluators/metrics")):
        mod = sys.modules.get(name)
        if mod is None or getattr(mod, "__file__", None):  # never run the real __init__
            mod = types.ModuleType(name)
            mod.__path__ = [str(root / sub)]
            sys.modules[name] = mod


@contextlib.contextmanager
def _without_easyocr():
    """docs.py imports easyocr (OCR on torch) at the top for one function, compare_image_text, which
    we do not offer: while it loads, a stand-in module takes the name if the real one is absent."""
    if "easyocr" in sys.modules or importlib.util.find_spec("easyocr") is not None:
        yield
        return
    stub = types.ModuleType("easyocr")

    def reader(*_a: Any, **_k: Any) -> None:
        raise ImportError("easyocr is not installed here (compare_image_text is not offered)")

    stub.Reader = reader  # type: ignore[attr-defined]
    sys.modules["easyocr"] = stub
    try:
        yield
    finally:
        sys.modules.pop("easyocr", None)


def metric_modules() -> dict[str, list[str]]:
    """{module: [metric names]} as desktop-env's metrics/__init__.py lists them (read, not run)."""
    root = _root()
    if root is None:
        return {}
    tree = ast.parse((root / "evaluators" / "metrics" / "__init__.py").read_text())
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.setdefault(node.module, []).extend(a.name for a in node.names)
    return out


def load() -> dict[str, Callable[..., Any]]:
    """The metric functions we use from desktop-env: {name: function}. Empty when it is not installed."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        _loaded = {}
        root = _root()
        if root is None:
            _errors["*"] = "the desktop-env package is not installed (requirements/nodeps.txt)"
            return _loaded
        _register_namespaces(root)
        listed = metric_modules()
        for mod_name in LOADABLE:
            try:
                # PyMuPDF (pdf.py, chrome.py) prints a deprecation notice on stdout: stdout is our CLI's answer
                with _without_easyocr(), contextlib.redirect_stdout(sys.stderr):
                    mod = importlib.import_module(f"{PACKAGE}.{mod_name}")
            except Exception as e:  # an import of theirs that is missing here: named in the refusal
                _errors[mod_name] = f"{type(e).__name__}: {e}"
                continue
            names = listed.get(mod_name) or [n for n in vars(mod) if not n.startswith("_")]
            for n in names:
                fn = getattr(mod, n, None)
                if callable(fn) and n not in NOT_OFFERED:
                    _loaded[n] = fn
        return _loaded


def why_missing(name: str) -> str | None:
    """Why OSWorld metric ``name`` is not available here, or None if it is not one of OSWorld's."""
    if name in NOT_OFFERED:
        return NOT_OFFERED[name]
    load()
    for mod, names in metric_modules().items():
        if name in names:
            if mod in _errors:
                return f"desktop-env's {mod}.py does not load here ({_errors[mod]})"
            return MODULE_NEEDS.get(mod, f"desktop-env's {mod}.py")
    if "*" in _errors:
        return _errors["*"]
    return None


# ----------------------------------------------------------------------------- getters

GETTERS_PACKAGE = "desktop_env.evaluators.getters"
# What a getter module imports at its top for functions we do not offer: a stand-in takes the name
# while it loads (chrome.py: pydrive, for get_googledrive_file).
GETTER_STUBS = {"chrome": ("pydrive", "pydrive.auth", "pydrive.drive")}
_getter_modules: dict[str, types.ModuleType] = {}


def _missing_class(module: str, attr: str) -> type:
    def refuse(*_a: Any, **_k: Any) -> None:
        raise ImportError(f"{module} is not installed here ({attr} is not offered)")

    return type(attr, (), {"__init__": refuse})


@contextlib.contextmanager
def _stand_ins(names: tuple[str, ...]):
    added: list[str] = []
    tops = {n.split(".")[0] for n in names}
    if any(t in sys.modules or importlib.util.find_spec(t) is not None for t in tops):
        names = ()  # the real package is installed: it is used
    for n in names:
        stub = types.ModuleType(n)
        stub.__getattr__ = functools.partial(_missing_class, n)  # type: ignore[attr-defined]
        sys.modules[n] = stub
        added.append(n)
    try:
        yield
    finally:
        for n in added:
            sys.modules.pop(n, None)


def getter_module(name: str) -> types.ModuleType:
    """desktop-env's ``evaluators/getters/<name>.py`` (OSWorld's own getters), loaded without its
    package ``__init__`` (which imports every domain). ImportError says what is missing."""
    with _lock:
        if name in _getter_modules:
            return _getter_modules[name]
        root = _root()
        if root is None:
            raise ImportError("the desktop-env package is not installed (requirements/nodeps.txt)")
        _register_namespaces(root)
        if GETTERS_PACKAGE not in sys.modules or getattr(sys.modules[GETTERS_PACKAGE], "__file__", None):
            mod = types.ModuleType(GETTERS_PACKAGE)
            mod.__path__ = [str(root / "evaluators" / "getters")]
            sys.modules[GETTERS_PACKAGE] = mod
        with _stand_ins(GETTER_STUBS.get(name, ())):
            mod = importlib.import_module(f"{GETTERS_PACKAGE}.{name}")
        _getter_modules[name] = mod
        return mod


def utils_function(name: str) -> Callable[..., Any]:
    """A helper of desktop-env's ``evaluators/metrics/utils.py`` (compare_urls...)."""
    root = _root()
    if root is None:
        raise ImportError("the desktop-env package is not installed (requirements/nodeps.txt)")
    with _lock:
        _register_namespaces(root)
    return getattr(importlib.import_module(f"{PACKAGE}.utils"), name)
