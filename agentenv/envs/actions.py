"""Actions: their bounds, key names, and the pyautogui allow-list (they are executed on an X display
by agentenv/envs/xinput.py).

pyautogui code strings (OSWorld configs and OSWorld-style agents) are parsed, never executed:
the AST must be a sequence of calls to allowed ``pyautogui`` functions or ``time.sleep`` with
literal arguments, and each call is translated into our own Action.
"""

from __future__ import annotations

import ast
from typing import Any

from agentenv.types import Action


class ActionError(ValueError):
    """The action cannot be executed as given (bad coordinates, unknown key, refused code)."""


# Bounds on one action: a model reply or a request body must not tie a desktop up for minutes.
MAX_TEXT = 10_000          # characters typed by one action (a few ms each)
MAX_KEYS = 16              # keys in one hotkey
MAX_PRESSES = 100          # pyautogui press(..., presses=N)
MAX_CODE = 100_000         # characters of one pyautogui snippet
MAX_CODE_ACTIONS = 200     # actions one pyautogui snippet may expand to


def check_action(a: Action) -> None:
    """Refuse an action whose size is over the bounds above (ActionError says which)."""
    if a.text is not None and (not isinstance(a.text, str) or len(a.text) > MAX_TEXT):
        raise ActionError(f"text must be a string of at most {MAX_TEXT} characters")
    if a.keys is not None and (not isinstance(a.keys, list) or len(a.keys) > MAX_KEYS
                               or not all(isinstance(k, str) and len(k) <= 64 for k in a.keys)):
        raise ActionError(f"keys must be a list of at most {MAX_KEYS} key names")
    if a.code is not None and (not isinstance(a.code, str) or len(a.code) > MAX_CODE):
        raise ActionError(f"code must be a string of at most {MAX_CODE} characters")
    for name in ("x", "y", "x2", "y2", "seconds"):
        v = getattr(a, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v
                              or abs(v) > 1e9):
            raise ActionError(f"{name} must be a finite number, got {v!r}")
    if isinstance(a.amount, bool) or not isinstance(a.amount, int) or abs(a.amount) > 10_000:
        raise ActionError(f"amount must be an integer, got {a.amount!r}")


# UI-TARS / pyautogui key names -> X keysym names.
KEY_ALIASES = {
    "ctrl": "Control_L", "control": "Control_L", "ctrlleft": "Control_L", "ctrlright": "Control_R",
    "alt": "Alt_L", "altleft": "Alt_L", "altright": "Alt_R", "shift": "Shift_L",
    "shiftleft": "Shift_L", "shiftright": "Shift_R", "win": "Super_L", "super": "Super_L",
    "cmd": "Super_L", "command": "Super_L", "meta": "Super_L",
    "enter": "Return", "return": "Return", "esc": "Escape", "escape": "Escape",
    "backspace": "BackSpace", "tab": "Tab", "space": "space", "delete": "Delete", "del": "Delete",
    "insert": "Insert", "home": "Home", "end": "End", "pageup": "Prior", "pgup": "Prior",
    "pagedown": "Next", "pgdn": "Next", "up": "Up", "down": "Down", "left": "Left", "right": "Right",
    "arrowup": "Up", "arrowdown": "Down", "arrowleft": "Left", "arrowright": "Right",
    "capslock": "Caps_Lock", "printscreen": "Print", "menu": "Menu",
    "-": "minus", "=": "equal", "+": "plus", ",": "comma", ".": "period", "/": "slash",
    ";": "semicolon", "'": "apostrophe", "[": "bracketleft", "]": "bracketright", "\\": "backslash",
    "`": "grave",
}
for _i in range(1, 13):
    KEY_ALIASES[f"f{_i}"] = f"F{_i}"


def keysym_name(key: str) -> str:
    """Map a key name to an X keysym name; raises ActionError for names X does not know."""
    from Xlib import XK

    k = key.strip()
    name = KEY_ALIASES.get(k.lower(), k)
    if len(name) == 1:
        name = name.lower() if name.isalpha() else name
    if XK.string_to_keysym(name) == 0:
        raise ActionError(f"unknown key {key!r}")
    return name


# ----------------------------------------------------------------------------- pyautogui allow-list

_PYAUTOGUI_ALLOWED = {
    "click", "doubleClick", "rightClick", "middleClick", "tripleClick", "moveTo", "dragTo",
    "mouseDown", "mouseUp", "scroll", "hscroll", "vscroll", "typewrite", "write", "press",
    "hotkey", "keyDown", "keyUp", "sleep",
}


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as e:
        raise ActionError(f"refused pyautogui code: argument {ast.unparse(node)!r} is not a literal") from e


def parse_pyautogui(code: str, width: int = 1920, height: int = 1080) -> list[Action]:
    """Translate a pyautogui snippet into Actions, or raise ActionError if the allow-list refuses it.

    Accepted: ``import pyautogui``/``import time`` lines, ``pyautogui.FAILSAFE = False``, and calls
    ``pyautogui.<allowed>(literals...)`` / ``time.sleep(literal)``. Anything else (other imports,
    names, attributes, subscripts, ``eval``/``exec``/``__import__``) is refused before any runs.
    """
    if not isinstance(code, str) or len(code) > MAX_CODE:
        raise ActionError(f"refused pyautogui code: not a string of at most {MAX_CODE} characters")
    try:
        tree = ast.parse(code, mode="exec")
    except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes
        raise ActionError(f"refused pyautogui code: syntax error: {getattr(e, 'msg', e)}") from e
    except (RecursionError, MemoryError) as e:
        raise ActionError("refused pyautogui code: nested too deeply") from e
    actions: list[Action] = []
    pos: list[float | None] = [None, None]
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            bad = [a.name for a in stmt.names if a.name not in ("pyautogui", "time") or a.asname]
            if bad:
                raise ActionError(f"refused pyautogui code: import of {bad}")
            continue
        if isinstance(stmt, ast.Assign):
            if (len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Attribute)
                    and isinstance(stmt.targets[0].value, ast.Name) and stmt.targets[0].value.id == "pyautogui"
                    and stmt.targets[0].attr in ("FAILSAFE", "PAUSE") and isinstance(stmt.value, ast.Constant)):
                continue
            raise ActionError("refused pyautogui code: only pyautogui.FAILSAFE/PAUSE may be assigned")
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            raise ActionError(f"refused pyautogui code: statement {type(stmt).__name__} is not allowed")
        call = stmt.value
        f = call.func
        if not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)):
            raise ActionError(f"refused pyautogui code: call {ast.unparse(f)!r} is not pyautogui.<fn>")
        mod, fn = f.value.id, f.attr
        if not ((mod == "pyautogui" and fn in _PYAUTOGUI_ALLOWED) or (mod == "time" and fn == "sleep")):
            raise ActionError(f"refused pyautogui code: {mod}.{fn} is not allowed")
        args = [_literal(a) for a in call.args]
        kw = {k.arg: _literal(k.value) for k in call.keywords if k.arg}
        if any(k.arg is None for k in call.keywords):
            raise ActionError("refused pyautogui code: **kwargs are not allowed")
        try:
            actions.extend(_pyautogui_call(fn, args, kw, pos))
        except ActionError:
            raise
        except (TypeError, ValueError, OverflowError, IndexError) as e:  # literals of the wrong kind
            raise ActionError(f"refused pyautogui code: bad arguments to {mod}.{fn}: {type(e).__name__}: {e}") from e
        if len(actions) > MAX_CODE_ACTIONS:
            raise ActionError(f"refused pyautogui code: more than {MAX_CODE_ACTIONS} actions")
    for a in actions:
        check_action(a)
    return actions


def _xy(args: list, kw: dict, pos: list) -> tuple[Any, Any]:
    x = kw.get("x", args[0] if len(args) > 0 else None)
    y = kw.get("y", args[1] if len(args) > 1 else None)
    if isinstance(x, (tuple, list)) and len(x) == 2:
        x, y = x
    if x is None or y is None:
        x, y = pos
    if x is not None:
        pos[0], pos[1] = x, y
    return x, y


def _pyautogui_call(fn: str, args: list, kw: dict, pos: list) -> list[Action]:
    if fn == "sleep":
        return [Action("wait", seconds=float(args[0] if args else kw.get("secs", 1)))]
    if fn in ("click", "doubleClick", "rightClick", "middleClick", "tripleClick"):
        x, y = _xy(args, kw, pos)
        button = kw.get("button", "left")
        clicks = int(kw.get("clicks", 1))
        kind = {"doubleClick": "double_click", "rightClick": "right_click",
                "middleClick": "middle_click"}.get(fn, "click")
        if fn == "click" and button == "right":
            kind = "right_click"
        elif fn == "click" and button == "middle":
            kind = "middle_click"
        if fn == "tripleClick":
            clicks = 3
        if not 1 <= clicks <= 3:
            raise ActionError(f"clicks must be 1, 2 or 3, got {clicks}")
        if fn == "click" and clicks == 2:
            return [Action("double_click", x=x, y=y)]
        return [Action(kind, x=x, y=y)] * max(1, clicks if kind == "click" else 1)
    if fn == "moveTo":
        x, y = _xy(args, kw, pos)
        return [Action("move", x=x, y=y)]
    if fn == "dragTo":
        sx, sy = pos
        x, y = _xy(args, kw, pos)
        if sx is None:
            raise ActionError("dragTo needs a start position (moveTo first)")
        return [Action("drag", x=sx, y=sy, x2=x, y2=y)]
    if fn in ("mouseDown", "mouseUp"):
        return []  # paired down/up without motion is a click; the drag form is dragTo
    if fn in ("scroll", "vscroll", "hscroll"):
        clicks = int(args[0] if args else kw.get("clicks", 0))
        x, y = kw.get("x"), kw.get("y")
        if fn == "hscroll":
            d = "right" if clicks > 0 else "left"
        else:
            d = "up" if clicks > 0 else "down"
        return [Action("scroll", x=x, y=y, direction=d, amount=max(1, abs(clicks)))]
    if fn in ("typewrite", "write"):
        msg = args[0] if args else kw.get("message", "")
        if isinstance(msg, (list, tuple)):
            return [Action("key", keys=[k]) for k in msg]
        return [Action("type", text=str(msg))]
    if fn in ("press", "keyDown", "keyUp"):
        keys = args[0] if args else kw.get("keys")
        presses = int(kw.get("presses", 1))
        if not 0 <= presses <= MAX_PRESSES:
            raise ActionError(f"presses must be within 0..{MAX_PRESSES}, got {presses}")
        if fn == "keyUp":
            return []
        keys = keys if isinstance(keys, (list, tuple)) else [keys]
        return [Action("key", keys=[str(k)]) for k in keys for _ in range(max(1, presses))]
    if fn == "hotkey":
        return [Action("hotkey", keys=[str(k) for k in args])]
    raise ActionError(f"pyautogui.{fn} is not supported")
