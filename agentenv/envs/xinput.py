"""Executing structured actions on an X display: one X connection per desktop.

Pointer, key and text events all go through XTest in-process (python-xlib): a subprocess per
action costs ~100 ms, XTest ~0.2 ms. Characters missing from the keymap get a spare keycode
remapped to them. Screenshots are grabbed with ``mss`` (raw XGetImage).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from agentenv.envs.actions import ActionError, keysym_name, parse_pyautogui
from agentenv.types import SCROLL_DIRECTIONS, Action


class XInput:
    """One X connection to a display: XTest input, window queries, screen grabs."""

    def __init__(self, display: str, xauthority: str, width: int, height: int):
        from Xlib import display as xdisplay

        self.display_name, self.xauthority = display, xauthority
        self.width, self.height = width, height
        self._d = xdisplay.Display(display)
        self._root = self._d.screen().root
        self._lock = threading.Lock()
        self._grabber: Any = None
        self._held_buttons: set[int] = set()

    def close(self) -> None:
        with self._lock:
            try:
                self._d.close()
            except Exception:
                pass
            if self._grabber is not None:
                try:
                    self._grabber.close()
                except Exception:
                    pass
                self._grabber = None

    def ping(self) -> bool:
        try:
            with self._lock:
                self._d.get_input_focus()
            return True
        except Exception:
            return False

    # ---------------------------------------------------------------- screen
    def grab(self):
        from PIL import Image
        import mss

        with self._lock:
            if self._grabber is None:
                self._grabber = mss.mss(display=self.display_name)
            shot = self._grabber.grab({"left": 0, "top": 0, "width": self.width, "height": self.height})
        return Image.frombuffer("RGB", shot.size, shot.bgra, "raw", "BGRX", 0, 1)

    # ---------------------------------------------------------------- windows
    def _atom(self, name: str) -> int:
        return self._d.intern_atom(name)

    def window_titles(self) -> list[str]:
        with self._lock:
            prop = self._root.get_full_property(self._atom("_NET_CLIENT_LIST"), 0)
            titles = []
            for wid in (prop.value if prop else []):
                titles.append(self._title(wid))
            return titles

    def _title(self, wid: int) -> str:
        from Xlib import X

        w = self._d.create_resource_object("window", wid)
        try:
            p = w.get_full_property(self._atom("_NET_WM_NAME"), self._atom("UTF8_STRING"))
            if p and p.value:
                v = p.value
                return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            p = w.get_full_property(X.XA_WM_NAME, X.AnyPropertyType)
            if p and p.value:
                v = p.value
                return v.decode("latin-1") if isinstance(v, bytes) else str(v)
        except Exception:
            pass
        return ""

    def active_window_title(self) -> str:
        with self._lock:
            p = self._root.get_full_property(self._atom("_NET_ACTIVE_WINDOW"), 0)
            if not p or not p.value or not p.value[0]:
                return ""
            return self._title(p.value[0])

    def close_windows(self, name: str, strict: bool = False, by_class: bool = False) -> int:
        """Ask the window manager to close (``_NET_CLOSE_WINDOW``, as a click on the close button)
        every top-level window whose title (or WM_CLASS) is ``name`` (``strict``) or contains it.
        The number of windows asked."""
        from Xlib import X
        from Xlib.protocol import event

        with self._lock:
            prop = self._root.get_full_property(self._atom("_NET_CLIENT_LIST"), 0)
            asked = 0
            for wid in (prop.value if prop else []):
                w = self._d.create_resource_object("window", wid)
                if by_class:
                    try:
                        names = list(w.get_wm_class() or ())
                    except Exception:
                        names = []
                else:
                    names = [self._title(wid)]
                if not any((n == name) if strict else (name.lower() in n.lower()) for n in names):
                    continue
                ev = event.ClientMessage(window=w, client_type=self._atom("_NET_CLOSE_WINDOW"),
                                         data=(32, [X.CurrentTime, 2, 0, 0, 0]))
                self._root.send_event(ev, event_mask=X.SubstructureRedirectMask | X.SubstructureNotifyMask)
                asked += 1
            self._d.sync()
            return asked

    def wait_for_wm(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._root.get_full_property(self._atom("_NET_SUPPORTING_WM_CHECK"), 0):
                    return
            time.sleep(0.02)

    def clear_state(self) -> None:
        """What a previous task left in the input, undone (called once its apps are closed): buttons
        held; a window manager's menu (a right click on the desktop opens one; it is no app's
        window, so it outlived the apps and took the next task's clicks and keys); the pointer, put
        back where a new X server has it (hover effects must not carry over)."""
        from Xlib import X
        from Xlib.ext import xtest

        with self._lock:
            for b in list(self._held_buttons):
                xtest.fake_input(self._d, X.ButtonRelease, b)
            self._held_buttons.clear()
            esc = self._keycode("Escape")  # closes an open menu; with no window open it does nothing else
            xtest.fake_input(self._d, X.KeyPress, esc)
            xtest.fake_input(self._d, X.KeyRelease, esc)
            self._move(self.width // 2, self.height // 2)
            self._d.sync()

    # ---------------------------------------------------------------- input
    def _check_xy(self, x: float | None, y: float | None) -> tuple[int, int]:
        if x is None or y is None:
            raise ActionError("this action needs x and y")
        xi, yi = int(round(x)), int(round(y))
        if not (0 <= xi < self.width and 0 <= yi < self.height):
            raise ActionError(f"point ({x}, {y}) is outside the {self.width}x{self.height} screen")
        return xi, yi

    def _move(self, x: int, y: int) -> None:
        from Xlib import X
        from Xlib.ext import xtest

        xtest.fake_input(self._d, X.MotionNotify, x=x, y=y)

    def _click(self, button: int, n: int = 1) -> None:
        from Xlib import X
        from Xlib.ext import xtest

        # Apps (Chromium) ignore a press that arrives in the same instant as the motion before
        # it, and need a gap between the clicks of a double click.
        self._d.sync()
        time.sleep(0.01)
        for i in range(n):
            if i:
                time.sleep(0.03)
            xtest.fake_input(self._d, X.ButtonPress, button)
            self._d.sync()
            xtest.fake_input(self._d, X.ButtonRelease, button)
            self._d.sync()

    def _keycode(self, name: str) -> int:
        from Xlib import XK

        code = self._d.keysym_to_keycode(XK.string_to_keysym(name))
        if not code:
            raise ActionError(f"key {name!r} has no keycode on this keyboard")
        return code

    def pointer(self) -> tuple[int, int]:
        with self._lock:
            p = self._root.query_pointer()
            return p.root_x, p.root_y

    def execute(self, a: Action) -> None:
        from Xlib import X
        from Xlib.ext import xtest

        t = a.type
        if t in ("wait",):
            time.sleep(max(0.0, min(float(a.seconds), 10.0)))
            return
        if t in ("finished", "call_user"):
            return
        if t == "pyautogui":
            for sub in parse_pyautogui(a.code or "", self.width, self.height):
                self.execute(sub)
            return
        if t == "type":
            if a.text is None:
                raise ActionError("type needs text")
            self._type(a.text)
            return
        if t in ("hotkey", "key"):
            if not a.keys:
                raise ActionError(f"{t} needs keys")
            names = [keysym_name(k) for k in a.keys]
            with self._lock:
                codes = [self._keycode(n) for n in names]
                for c in codes:
                    xtest.fake_input(self._d, X.KeyPress, c)
                for c in reversed(codes):
                    xtest.fake_input(self._d, X.KeyRelease, c)
                self._d.sync()
            return
        if t == "scroll":
            if a.direction not in SCROLL_DIRECTIONS:
                raise ActionError(f"scroll direction must be one of {SCROLL_DIRECTIONS}, got {a.direction!r}")
            button = {"up": 4, "down": 5, "left": 6, "right": 7}[a.direction]
            with self._lock:
                if a.x is not None and a.y is not None:
                    self._move(*self._check_xy(a.x, a.y))
                self._click(button, max(1, min(int(a.amount), 50)))
                self._d.sync()
            return
        if t in ("click", "double_click", "right_click", "middle_click", "move"):
            x, y = self._check_xy(a.x, a.y)
            with self._lock:
                self._move(x, y)
                if t == "click":
                    self._click(1)
                elif t == "double_click":
                    self._click(1, 2)
                elif t == "right_click":
                    self._click(3)
                elif t == "middle_click":
                    self._click(2)
                self._d.sync()
            return
        if t == "drag":
            x, y = self._check_xy(a.x, a.y)
            x2, y2 = self._check_xy(a.x2, a.y2)
            with self._lock:
                self._move(x, y)
                xtest.fake_input(self._d, X.ButtonPress, 1)
                self._d.sync()
                for i in range(1, 11):  # intermediate motion so apps see a real drag
                    self._move(x + (x2 - x) * i // 10, y + (y2 - y) * i // 10)
                    self._d.sync()
                    time.sleep(0.005)
                xtest.fake_input(self._d, X.ButtonRelease, 1)
                self._d.sync()
            return
        raise ActionError(f"unknown action type {t!r}")

    def _type(self, text: str) -> None:
        """Type any Unicode text with XTest, one key event pair per character.

        Characters missing from the keymap get a spare keycode remapped to their keysym (like
        xdotool does), but the mapping is kept and reused, and apps get a moment to see the
        MappingNotify before the key arrives; xdotool's remap-and-revert drops such characters.
        """
        from Xlib import X
        from Xlib.ext import xtest

        with self._lock:
            shift = self._d.keysym_to_keycode(0xFFE1)  # Shift_L
            for ch in text:
                if ch == "\r":
                    continue
                keysym = _char_keysym(ch)
                code, index = self._find_keysym(keysym)
                if code is None:
                    code, index = self._remap_spare(keysym), 0
                    time.sleep(0.03)
                if index == 1:
                    xtest.fake_input(self._d, X.KeyPress, shift)
                    self._d.sync()
                    time.sleep(0.005)  # some apps read the modifier state a moment later
                xtest.fake_input(self._d, X.KeyPress, code)
                xtest.fake_input(self._d, X.KeyRelease, code)
                if index == 1:
                    xtest.fake_input(self._d, X.KeyRelease, shift)
                self._d.sync()
                time.sleep(0.002)  # slow apps (LibreOffice) drop keys that arrive in one burst

    def _find_keysym(self, keysym: int) -> tuple[int | None, int]:
        for code, index in self._d.keysym_to_keycodes(keysym):
            if index in (0, 1):
                return code, index
        return None, 0

    def _remap_spare(self, keysym: int) -> int:
        if not hasattr(self, "_spare"):
            first = self._d.display.info.min_keycode
            count = self._d.display.info.max_keycode - first + 1
            mapping = self._d.get_keyboard_mapping(first, count)
            self._spare = [first + i for i, syms in enumerate(mapping) if not any(syms)][-16:]
            self._spare_next = 0
            if not self._spare:
                raise ActionError("no spare keycode to type this character")
        code = self._spare[self._spare_next % len(self._spare)]
        self._spare_next += 1
        self._d.change_keyboard_mapping(code, [(keysym, keysym)])
        self._d.sync()
        return code


_CONTROL_KEYSYMS = {"\n": 0xFF0D, "\t": 0xFF09, "\b": 0xFF08}


def _char_keysym(ch: str) -> int:
    if ch in _CONTROL_KEYSYMS:
        return _CONTROL_KEYSYMS[ch]
    o = ord(ch)
    if 0x20 <= o <= 0x7E or 0xA0 <= o <= 0xFF:
        return o  # Latin-1 keysyms equal their code points
    return 0x01000000 | o  # X's Unicode keysym range
