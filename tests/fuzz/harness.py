"""Fuzz targets, shared by the test suite (a few thousand inputs each) and scripts/bench_faults.py
(100,000+ each): hypothesis strategies that build hostile inputs, and checks that sort each
outcome into one of:

- ``ok``: accepted, and what came out is within bounds (types known, coordinates on screen...);
- ``refused``: rejected with a reason (an ActionError, TaskLoadError, or a 4xx with a detail);
- ``escape``: the allow-list ran something outside it, or a file outside the desktop's HOME was
  read or written;
- ``crash``: an exception other than the documented refusal, or a 5xx from the service;
- ``hang``: no answer within the request's timeout.

The properties: no escape, no crash, no hang, and every refusal says why.
"""

from __future__ import annotations

import json
import math
import string
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from agentenv.envs.actions import ActionError, check_action, parse_pyautogui
from agentenv.envs.tasks import TaskLoadError, load_task_file
from agentenv.rollout.uitars import parse_reply
from agentenv.types import ACTION_TYPES

OUTCOMES = ("ok", "refused", "escape", "crash", "hang")


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    transient: int = 0  # connections dropped once, the request then answered (counted by its answer)

    def add(self, outcome: str, example: Any = None) -> str:
        self.counts[outcome] += 1
        if outcome in ("escape", "crash", "hang"):
            self.examples.setdefault(outcome, [])
            if len(self.examples[outcome]) < 5:
                self.examples[outcome].append(repr(example)[:500])
        return outcome

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def bad(self) -> int:
        return self.counts["escape"] + self.counts["crash"] + self.counts["hang"]


# ----------------------------------------------------------------------------- building blocks

_junk_text = st.text(st.characters(codec="utf-8"), max_size=40)
_names = st.sampled_from(["pyautogui", "time", "os", "subprocess", "sys", "builtins", "__builtins__", "open",
                          "eval", "exec", "__import__", "x", "self", "globals", "getattr"])
_attrs = st.sampled_from(["click", "doubleClick", "rightClick", "middleClick", "tripleClick", "moveTo", "dragTo",
                          "mouseDown", "mouseUp", "scroll", "hscroll", "vscroll", "typewrite", "write", "press",
                          "hotkey", "keyDown", "keyUp", "sleep", "system", "popen", "run", "__class__",
                          "__subclasses__", "__globals__", "FAILSAFE", "PAUSE", "screenshot", "locateOnScreen",
                          "position", "size", "alert", "prompt"])
_numbers = st.one_of(st.integers(-10**6, 10**6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(["1e400", "-0", "0x10", "1_000", "10**9", "9" * 50]))


def _literal_src(n: Any) -> str:
    return n if isinstance(n, str) else repr(n)


_arg = st.deferred(lambda: st.one_of(
    _numbers.map(_literal_src),
    _junk_text.map(repr),
    st.sampled_from(["None", "True", "[]", "()", "{}", "'a' * 10**6", "x", "os.system('id')", "lambda: 1",
                     "[i for i in range(10**9)]", "f'{1}'", "*args", "**kw", "(1, 2)", "[1, 2, 3]", "{'a': 1}",
                     "b'bytes'", "...", "__import__('os')", "(y := 1)", "a[0]", "-(-1)", "1 if x else 2"]),
    st.lists(_numbers.map(_literal_src), max_size=4).map(lambda xs: "(" + ", ".join(xs) + ",)"),
))
_kwarg = st.tuples(st.sampled_from(["x", "y", "clicks", "presses", "button", "interval", "duration", "keys",
                                    "message", "secs", "amount", "_", "logScreenshot"]), _arg)


@st.composite
def _call(draw) -> str:
    mod, fn = draw(_names), draw(_attrs)
    args = draw(st.lists(_arg, max_size=4))
    kws = draw(st.lists(_kwarg, max_size=3))
    target = draw(st.sampled_from([f"{mod}.{fn}", f"{mod}.{fn}", fn, f"{mod}.{fn}.{fn}", f"({mod}).{fn}",
                                   f"getattr({mod}, '{fn}')", f"{mod}['{fn}']"]))
    return f"{target}({', '.join(args + [f'{k}={v}' for k, v in kws])})"


_statement = st.one_of(
    _call(), _call(), _call(),
    st.sampled_from(["import pyautogui", "import time", "import os", "import pyautogui as p", "from os import system",
                     "pyautogui.FAILSAFE = False", "pyautogui.PAUSE = 0.1", "pyautogui.FAILSAFE = os", "x = 1",
                     "del x", "pass", "global x", "with open('/etc/passwd') as f: pass", "for i in range(3): pass",
                     "while True: pass", "def f(): pass", "class A: pass", "raise SystemExit", "assert False",
                     "try:\n  pass\nexcept: pass", "lambda: 0", "async def f(): pass", "__import__('os')",
                     "pyautogui.click(); import os", "if True: pyautogui.click(1, 1)"]),
    _junk_text,
)

pyautogui_code = st.one_of(
    st.lists(_statement, min_size=1, max_size=6).map("\n".join),
    st.lists(_statement, min_size=1, max_size=4).map("; ".join),
    st.text(max_size=200),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    st.integers(1, 3000).map(lambda n: "pyautogui.click(" + "(" * n + ")" * n + ")"),
)


# ----------------------------------------------------------------------------- the allow-list

class _Audit:
    """Records audit events (PEP 578) raised while armed: exec, import, open, subprocess... Only
    the compiler's own may happen while the allow-list reads code: 'compile' (ast.parse) and, on a
    syntax error, its look for the source line ('open' of the pseudo-file '<unknown>') and its
    import of unicodedata (to normalize identifiers)."""

    _installed = False

    def __init__(self) -> None:
        self.armed_in: int | None = None
        self.events: list[str] = []

    @staticmethod
    def _compiler_own(event: str, args: tuple) -> bool:
        return event == "compile" or (event == "open" and str(args[0]).startswith("<")) or \
            (event == "import" and args[0] == "unicodedata")

    def hook(self, event: str, args: tuple) -> None:
        if self.armed_in == threading.get_ident() and not self._compiler_own(event, args):
            self.events.append(f"{event} {str(args)[:100]}")

    def install(self) -> "_Audit":
        if not _Audit._installed:  # an audit hook cannot be removed: one for the process
            sys.addaudithook(self.hook)
            _Audit._installed = True
        return self


AUDIT = _Audit()


def check_allowlist(code: str, tally: Tally, width: int = 1920, height: int = 1080) -> str:
    AUDIT.install()
    AUDIT.events.clear()
    AUDIT.armed_in = threading.get_ident()
    try:
        actions = parse_pyautogui(code, width, height)
    except ActionError as e:
        outcome = "refused" if str(e) else "crash"
    except BaseException as e:  # noqa: BLE001 - anything else is a crash of the service
        return tally.add("crash", (code, f"{type(e).__name__}: {e}"))
    else:
        outcome = "ok"
        for a in actions:
            if a.type not in ACTION_TYPES:
                return tally.add("escape", (code, a))
            try:
                check_action(a)
            except ActionError:
                return tally.add("crash", (code, a, "an accepted action is out of bounds"))
    finally:
        AUDIT.armed_in = None
    if AUDIT.events:
        return tally.add("escape", (code, AUDIT.events[:5]))
    return tally.add(outcome, code)


# ----------------------------------------------------------------------------- UI-TARS replies

_box_num = st.one_of(st.integers(-100, 3000), st.floats(allow_nan=True, allow_infinity=True).map(str),
                     st.sampled_from(["", "x", "1e9", "-0", "nan", "inf", "1,2", "((1", "0x1f"]))


@st.composite
def _box(draw) -> str:
    nums = draw(st.lists(_box_num, min_size=0, max_size=5))
    inner = ",".join(str(n) for n in nums)
    return draw(st.sampled_from([f"({inner})", f"<|box_start|>({inner})<|box_end|>", f"[{inner}]",
                                 f"<point>{inner.replace(',', ' ')}</point>", inner]))


_action_names = st.sampled_from(["click", "left_single", "left_double", "right_single", "hover", "drag", "select",
                                 "scroll", "type", "hotkey", "press", "keydown", "keyup", "wait", "finished",
                                 "call_user", "exec", "eval", "__import__", "open", "os.system", "pyautogui.click",
                                 "", "click.click", "Click"])
_param = st.one_of(
    st.tuples(st.sampled_from(["start_box", "end_box", "start_point", "end_point", "point"]), _box()),
    st.tuples(st.sampled_from(["direction"]), st.sampled_from(["up", "down", "left", "right", "", "sideways"])),
    st.tuples(st.sampled_from(["content", "key", "hotkey"]), _junk_text),
    st.tuples(st.text(string.ascii_letters + "_", max_size=10), _junk_text),
)


@st.composite
def _uitars_action(draw) -> str:
    params = draw(st.lists(_param, max_size=3))
    quote = draw(st.sampled_from(["'", '"', "", "'''"]))
    body = ", ".join(f"{k}={quote}{v}{quote}" for k, v in params)
    return f"{draw(_action_names)}({body})" + draw(st.sampled_from(["", "", ")", "(", "\n", " # comment"]))


uitars_reply = st.one_of(
    st.builds(lambda t, acts, sep: f"Thought: {t}\nAction: " + sep.join(acts),
              _junk_text, st.lists(_uitars_action(), min_size=1, max_size=3), st.sampled_from(["\n\n", "\n", " "])),
    st.builds(lambda t, a: f"Reflection: {t}\nAction_Summary: {t}\nAction: {a}", _junk_text, _uitars_action()),
    st.text(max_size=300),
    st.sampled_from(["", "Action:", "Action: ", "Thought:\nAction: click()", "x" * 10_000,
                     "Thought: " + " " * 5000 + "Action: click(start_box='(1,1)')"]),
)
screens = st.tuples(st.integers(64, 7680), st.integers(64, 4320))


def check_reply(text: str, screen: tuple[int, int], tally: Tally) -> str:
    try:
        r = parse_reply(text, screen, 28 * 28 * 4, 28 * 28 * 256)
    except BaseException as e:  # noqa: BLE001 - parse_reply promises never to raise
        return tally.add("crash", (text, screen, f"{type(e).__name__}: {e}"))
    if not r.valid:
        return tally.add("refused" if r.error else "crash", (text, "invalid without a reason"))
    w, h = screen
    for a in r.actions:
        if a.type not in ACTION_TYPES:
            return tally.add("escape", (text, a))
        for x, y in ((a.x, a.y), (a.x2, a.y2)):
            if x is None and y is None:
                continue
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)) \
                    or not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                return tally.add("crash", (text, screen, a, "a point off the screen was accepted"))
    return tally.add("ok", text)


# ----------------------------------------------------------------------------- task JSON

_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _junk_text),
                     lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(_junk_text, kids, max_size=4)),
                     max_leaves=12)
_task_keys = st.sampled_from(["id", "instruction", "config", "evaluator", "oracle", "related_apps", "source",
                              "snapshot", "proxy"])


@st.composite
def _task_dict(draw) -> dict:
    d = draw(st.dictionaries(_task_keys, _json, max_size=7))
    if draw(st.booleans()):
        d.setdefault("id", draw(_junk_text))
        d.setdefault("instruction", draw(_junk_text))
    return d


task_file_bytes = st.one_of(
    _task_dict().map(lambda d: json.dumps(d).encode()),
    st.lists(_task_dict(), max_size=3).map(lambda d: json.dumps(d).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[" * 100_000, b'{"id": "x", "instruction": "y", "config": 5}',
                     b'{"id": "x", "instruction": "y", "evaluator": [1]}', b"\xef\xbb\xbf{}", b"null"]),
)


def check_task_file(path: Path, data: bytes, tally: Tally) -> str:
    path.write_bytes(data)
    try:
        tasks = load_task_file(path)
    except TaskLoadError as e:
        return tally.add("refused" if str(path) in str(e) else "crash", (data[:200], "refusal without the file"))
    except BaseException as e:  # noqa: BLE001
        return tally.add("crash", (data[:200], f"{type(e).__name__}: {e}"))
    for t in tasks:
        if not (isinstance(t.id, str) and t.id and isinstance(t.config, list) and isinstance(t.evaluator, dict)):
            return tally.add("crash", (data[:200], "a task with fields of the wrong kind was accepted"))
    return tally.add("ok", data[:200])


# ----------------------------------------------------------------------------- the env service over HTTP

@dataclass
class Req:
    method: str
    path: str
    json: Any = None
    form: dict[str, str] | None = None
    file: bytes | None = None


@dataclass
class Outside:
    """Files outside the desktop's HOME that no request may read or write: a root-only canary,
    and paths an upload might try to create. ``links`` are symlinks the desktop user made in HOME
    pointing at them."""

    canary: Path
    secret: str
    targets: list[Path]
    links: list[str] = field(default_factory=lambda: ["~/leak", "~/leakdir/canary", "~/leakdir/new.txt"])

    def untouched(self) -> bool:
        return self.canary.read_text() == self.secret and not any(t.exists() for t in self.targets)


def _paths(outside: Outside) -> st.SearchStrategy[str]:
    inside = ["~/Documents/a.txt", "Documents/b.txt", "~/x.txt", "~", ".", "", "~/Documents", "a/../b.txt"]
    hostile = ["../" * k + rest for k in (1, 3, 8) for rest in ("etc/passwd", "root/.bashrc", "outside.txt")]
    hostile += [str(outside.canary), "/etc/shadow", "/proc/self/environ", "~/../../root/.bashrc", "~root/.bashrc",
                "~/../outside.txt", "/dev/zero", "/dev/urandom", "~/\0x", "\0", "~/" + "a" * 5000,
                *[str(t) for t in outside.targets], *outside.links]
    return st.one_of(st.sampled_from(inside + hostile), _junk_text,
                     st.lists(st.sampled_from(["..", ".", "~", "a", "leak", "leakdir", "", "/"]), max_size=6)
                     .map("/".join))


def _via_allowlist(code: str) -> bool:
    # no sleeps (a valid one sleeps up to 10 s), no NUL (not a valid argv)
    return "sleep" not in code and "\0" not in code


_safe_argv0 = st.sampled_from(["true", "false", "echo", "printf", "ls", "cat", "id", "pwd", "env", "no-such-binary",
                               "/bin/no/such", "", " ", "./x", "~/x"])
_command = st.one_of(
    st.lists(_junk_text, max_size=4).flatmap(lambda rest: _safe_argv0.map(lambda a: [a, *rest])),
    st.builds(lambda a, rest: " ".join([a, *rest]), _safe_argv0, st.lists(_junk_text, max_size=3)),
    # OSWorld's `python -c "import pyautogui; ..."`: the allow-list reads it, nothing runs it
    pyautogui_code.filter(_via_allowlist).map(lambda c: ["python3", "-c", "import pyautogui\n" + c]),
    st.sampled_from(["cat /dev/zero", "yes", "head -c 3000000 /dev/urandom", "echo $ENV_TOKEN", "cat /proc/1/environ",
                     "printf '\\xff\\xfe'", "'unterminated", "\"", "ls -la /root", "cat /etc/shadow", "\0", "",
                     "python3 -c 'print(1)'"]),
    _json,
)
_action_types = st.sampled_from([*ACTION_TYPES, "", "exec", "CLICK", "click ", None, 1])
_action_value = st.one_of(_numbers, _junk_text, st.none(), st.booleans(), st.lists(_junk_text, max_size=20),
                          st.sampled_from(["ctrl", "alt", "Return", "notakey", "F13", "super", "x" * 20_000]),
                          st.floats(0, 0.02))


@st.composite
def _action_dict(draw) -> Any:
    d: dict[str, Any] = {"type": draw(_action_types)}
    for k in draw(st.lists(st.sampled_from(["x", "y", "x2", "y2", "text", "keys", "direction", "amount",
                                            "seconds", "code", "extra", "button"]), max_size=5, unique=True)):
        if k == "code":
            d[k] = draw(pyautogui_code.filter(lambda c: "sleep" not in c))
        elif k == "seconds":
            d[k] = draw(st.one_of(st.floats(0, 0.02), _junk_text, st.none()))
        else:
            d[k] = draw(_action_value)
    if d["type"] == "wait" and not isinstance(d.get("seconds"), float):
        d["seconds"] = 0.0  # a valid wait sleeps what it is told (10 s at most): keep the fuzz quick
    if d["type"] == "pyautogui" and not isinstance(d.get("code"), str):
        d["code"] = "pyautogui.FAILSAFE = False"
    return draw(st.one_of(st.just(d), _json))


_image_size = st.one_of(st.none(), st.tuples(st.integers(-5, 10**6), st.integers(-5, 10**6)),
                        st.sampled_from([(0, 0), (1, 1), (10**9, 10**9), (4097, 4097), (28, 28)]), _json)
_bad_image_size = st.one_of(st.tuples(st.integers(-10**9, 0), st.integers(-5, 100)),
                            st.tuples(st.integers(5000, 10**9), st.integers(5000, 10**9)), _json.filter(
                                lambda v: not isinstance(v, (list, type(None)))))


@st.composite
def _reset_body(draw) -> Any:
    """Reset bodies that must be refused before the desktop is touched: a bad image size, or a
    task whose fields are of the wrong kind (a real reset costs half a second: not fuzz material)."""
    task = draw(_task_dict())
    bad_task = draw(st.sampled_from(["config", "evaluator", "oracle", "related_apps", "id", "instruction"]))
    task[bad_task] = draw(st.sampled_from([5, "x", {"a": 1}, [1], True]) if bad_task not in ("id", "instruction")
                          else st.sampled_from([None, 5, "", [], {}]))
    if bad_task == "config" and isinstance(task[bad_task], list):
        task[bad_task] = {"not": "a list"}
    body = {"task": task, "image_size": draw(st.one_of(st.none(), _bad_image_size))}
    return draw(st.one_of(st.just(body), _json.filter(lambda v: not isinstance(v, dict) or "task" not in v)))


_getter = st.fixed_dictionaries({"type": st.sampled_from(["vm_file", "file_exists", "vm_command_line",
                                                          "window_title", "window_titles", "clipboard",
                                                          "spreadsheet_cell", "nope", 5])},
                                optional={"path": st.none(), "command": _command, "cell": _junk_text,
                                          "sheet": _json})


@st.composite
def _evaluator(draw, outside: Outside) -> Any:
    ev = {"func": draw(st.one_of(st.sampled_from(["exact_match", "fuzzy_match", "check_include_exclude", "is_true",
                                                  "number_match", "infeasible", "nope"]), _json)),
          "result": draw(st.one_of(_getter, _json)),
          "expected": draw(st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["rule", "literal", "x"]),
                                                             "rules": _json, "value": _json}), _json)),
          "options": draw(st.one_of(st.none(), _json))}
    if isinstance(ev["result"], dict) and "path" in ev["result"]:
        ev["result"]["path"] = draw(_paths(outside))
    return draw(st.one_of(st.just(ev), _json))


def requests(did: str, outside: Outside) -> st.SearchStrategy[Req]:
    """Requests to the env service's own routes and its OSWorld in-VM routes for desktop ``did``."""
    e = f"/envs/{did}"
    paths = _paths(outside)
    return st.one_of(
        st.builds(lambda a, i, shot: Req("POST", f"{e}/step", {"action": a, "image_size": i, "screenshot": shot}),
                  _action_dict(), _image_size, st.booleans().map(lambda b: b and False)),
        st.builds(lambda b: Req("POST", f"{e}/reset", b), _reset_body()),
        st.builds(lambda ev, la, tid: Req("POST", f"{e}/evaluate", {"task": {"id": tid, "instruction": "i",
                                                                             "evaluator": ev}, "last_action": la}),
                  _evaluator(outside), st.one_of(st.none(), _junk_text), st.sampled_from(["t", "", "x" * 300])),
        st.builds(lambda c, sh, t: Req("POST", f"{e}/execute", {"command": c, "shell": sh, "timeout": t}),
                  _command, st.booleans(), st.one_of(st.floats(-5, 20), _json)),
        st.builds(lambda c, sh: Req("POST", f"{e}/setup/launch", {"command": c, "shell": sh}),
                  st.one_of(st.lists(st.sampled_from(["no-such-app", "/nonexistent", "", "x\0y"]), max_size=3),
                            st.sampled_from(["no-such-app --x", "'", "", "/bin/no"]), _json),
                  st.booleans().map(lambda b: False)),
        st.builds(lambda b: Req("POST", f"{e}/setup/open_file", b),
                  st.one_of(st.fixed_dictionaries({"path": paths}, optional={"app": _junk_text, "timeout": _json}),
                            _json)),
        st.builds(lambda n: Req("POST", f"{e}/setup/activate_window", {"window_name": n}),
                  st.one_of(_junk_text, _json)),
        st.builds(lambda p, data: Req("POST", f"{e}/setup/upload", form={"file_path": p}, file=data),
                  paths, st.binary(max_size=64)),
        st.builds(lambda p: Req("POST", f"{e}/file", form={"file_path": p}), paths),
        st.sampled_from([Req("GET", f"{e}/screenshot"), Req("POST", f"{e}/screen_size"), Req("GET", f"{e}/platform"),
                         Req("POST", f"{e}/cursor_position"), Req("GET", f"{e}/alive"), Req("GET", "/envs"),
                         Req("GET", "/health"), Req("POST", f"{e}/desktop_path"), Req("POST", f"{e}/wallpaper"),
                         Req("POST", f"{e}/end_recording"), Req("POST", f"{e}/no_such_route")]),
        st.builds(lambda w, h: Req("POST", "/envs", {"width": w, "height": h}),
                  st.one_of(st.integers(-10, 63), st.integers(7681, 10**9), _junk_text), _json),
        st.builds(lambda seg, tail: Req("POST", f"/envs/{seg}/{tail}", {}),
                  st.sampled_from(["..", "%2e%2e", "x", "d0", "", "..%2f..", did + "x"]),
                  st.sampled_from(["step", "reset", "file", "execute", "../../health", "screenshot"])),
        st.builds(lambda seg: Req("DELETE", f"/envs/{seg}"), st.sampled_from(["nope", "..", "%00"])),
    )


def check_request(http: Any, req: Req, outside: Outside, tally: Tally, timeout: float = 60.0) -> str:
    import httpx

    kw: dict[str, Any] = {"timeout": timeout}
    if req.form is not None:
        kw["data"] = req.form
        if req.file is not None:
            kw["files"] = {"file_data": ("f", req.file)}
    elif req.json is not None or req.method == "POST":
        kw["content"] = json.dumps(req.json, allow_nan=True)
        kw["headers"] = {"content-type": "application/json"}
    r = None
    for attempt in (1, 2):
        try:
            r = http.request(req.method, req.path, **kw)
            break
        except httpx.TimeoutException:
            return tally.add("hang", req)
        except httpx.TransportError as e:
            # A connection reset once under heavy load is the network stack, not this input: the
            # same request again on a fresh connection tells. Dropped twice is a crash.
            if attempt == 2:
                return tally.add("crash", (req, f"the service dropped the connection twice: {e}"))
            tally.transient += 1
            tally.examples.setdefault("transient", []).append(repr((req, str(e)))[:300])
    if not outside.untouched():
        return tally.add("escape", (req, "a file outside HOME was written"))
    if r.status_code == 200 and req.path.endswith("/file") and outside.secret.encode() in r.content:
        return tally.add("escape", (req, "a file outside HOME was read"))
    if r.status_code >= 500:
        return tally.add("crash", (req, r.status_code, r.text[:300]))
    if r.status_code >= 400:
        try:
            body = r.json()
            reason = body.get("detail") or body.get("message") if isinstance(body, dict) else None
        except ValueError:
            reason = None
        return tally.add("refused" if reason else "crash", (req, r.status_code, "refused without a reason"))
    return tally.add("ok", req)


def plant_outside(http: Any, did: str) -> Outside:
    """Files outside desktop ``did``'s HOME (a root-only canary, upload targets) and symlinks to
    them that the desktop user makes in HOME (through the service, as that user)."""
    import os
    import secrets

    outside_dir = Path(f"/tmp/agentenv-fuzz-{secrets.token_hex(4)}")
    outside_dir.mkdir(mode=0o700)
    secret = "canary-" + secrets.token_hex(8)
    canary = outside_dir / "canary"
    canary.write_text(secret)
    os.chmod(canary, 0o600)
    home = Path(f"/tmp/agentenv-desktops/{did}/home")
    outside = Outside(canary, secret, targets=[outside_dir / "new.txt", home.parent / "outside.txt",
                                               Path("/root/outside.txt")])
    r = http.post(f"/envs/{did}/execute", json={"command": f"ln -s {canary} ~/leak && ln -s {outside_dir} ~/leakdir",
                                               "shell": True})
    if r.json().get("returncode") != 0:
        raise RuntimeError(f"could not plant the symlinks: {r.text}")
    return outside


def remove_outside(outside: Outside) -> None:
    d = outside.canary.parent
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink()
    d.rmdir()
