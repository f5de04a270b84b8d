"""Desktop: one X display, a window manager, apps, and a HOME of its own.

Reset closes the session's apps, restores HOME from a template and runs the task's setup
steps: a second or so, instead of a VM snapshot revert. How the desktop's processes start, on
this host (agentenv/envs/host.py) or in a bubblewrap sandbox (agentenv/envs/sandbox.py), is
the one thing that differs: a ``Processes`` strategy the desktop holds. ``make_desktop`` picks it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from loguru import logger

from agentenv import procs
from agentenv.envs import display as xdisplay
from agentenv.envs.actions import ActionError
from agentenv.envs.desktop_types import (A11Y_LIMITS, A11yLimits, DesktopError, DesktopSpec, Processes, Seat,
                                         Started, desktop_user)
from agentenv.envs.home import open_in_home, resolve_in_home, restore_home
from agentenv.envs.host import HostProcesses
from agentenv.envs.sandbox import SandboxProcesses
from agentenv.envs.tasks import BUILTIN_DIR
from agentenv.envs.tasks.setup import run_setup
from agentenv.envs.xinput import XInput

# The screen an agent is shown must be painted and settled, not merely mapped: a reset ends, and an
# action returns, once consecutive frames have stayed the same for ``quiet_s`` (bounded by ``cap_s``)
# and no window is blank. A change within STILL_PX pixels (a caret, a cursor cell) does not count as
# the screen moving. A window is mapped before its app draws in it (LibreOffice, loading, leaves it
# black for seconds on a busy machine): a screen that is one colour below the top TITLE_PX rows (the
# window manager's title bar) while a window is open is not painted yet.
RESET_SETTLE = (0.5, 10.0)    # (quiet_s, cap_s) after a reset's setup: apps paint their first frames
ACTION_SETTLE = (0.15, 2.0)   # after an action: a menu opening, a page scrolling
SETTLE_POLL_S = 0.05
STILL_PX = 400
TITLE_PX = 24


class Desktop:
    """A real X desktop. Thread-safe: every public method that changes it takes the desktop's lock
    (``locked()`` holds it across several calls)."""

    def __init__(self, desktop_id: str, spec: DesktopSpec, processes: type[Processes]):
        self.id = desktop_id
        self.spec = spec
        self.width, self.height = spec.width, spec.height
        self.seat = Seat(desktop_id, spec, spec.scratch / desktop_id, desktop_user())
        self.procs = processes(self.seat)
        self._input: XInput | None = None
        self._lock = threading.RLock()
        self.task_id: str | None = None
        self.resets = 0

    # ------------------------------------------------------------------ what it is
    @property
    def root(self) -> Path:
        return self.seat.root

    @property
    def home(self) -> Path:
        return self.procs.home

    @property
    def user(self) -> pwd.struct_passwd | None:
        return self.seat.user

    @property
    def display(self) -> str:
        return self.seat.display

    @property
    def sandboxed(self) -> bool:
        return self.procs.sandboxed

    @property
    def osworld_like(self) -> bool:
        return self.procs.osworld_like

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the desktop's lock: no reset swaps HOME, no action runs, until the block ends."""
        with self._lock:
            yield

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Desktop":
        try:
            with self._lock:
                self._start()
            logger.debug("desktop {} up on {}", self.id, self.display)
            return self
        except BaseException:
            self._close()  # a desktop that did not come up leaves no process or folder behind
            raise

    def _start(self) -> None:
        seat = self.seat
        shutil.rmtree(seat.root, ignore_errors=True)
        seat.root.mkdir(parents=True)
        os.chmod(self.spec.scratch, 0o755)
        # Each desktop's apps read an Xauthority holding their own cookie only; this process,
        # which connects to every desktop (libX11 reads $XAUTHORITY per connection), keeps all
        # cookies in a file of its own that no desktop can read.
        service_xauth = xdisplay.service_xauthority(self.spec.scratch)
        cookie = secrets.token_hex(16)
        with xdisplay.display_allocation():  # two desktops must not pick the same display number
            seat.display_num = xdisplay.free_display()
            xdisplay.add_cookies(seat, service_xauth, cookie)
            seat.chown(seat.root)
            seat.chown(seat.xauth)
            self.procs.start_server()
            deadline = time.monotonic() + 15
            while not Path(f"/tmp/.X11-unix/X{seat.display_num}").exists():
                if not self.procs.server_running() or time.monotonic() > deadline:
                    raise DesktopError(f"X server {self.display} did not start: {self.procs.server_log()}")
                time.sleep(0.02)
        self._input = self._connect(time.monotonic() + 10)
        self._restore_home()
        self.procs.start_wm()
        self._input.wait_for_wm(5.0)

    def _connect(self, deadline: float) -> XInput:
        # The socket file appears when Xvfb binds it, a moment before it listens: under load a
        # first connection can be refused (python-xlib reports it as DisplayConnectionError when it
        # connects by the socket's path, as it does for a sandboxed desktop).
        from Xlib.error import DisplayConnectionError

        while True:
            try:
                return XInput(self.display, str(self.seat.xauth), self.width, self.height)
            except (ConnectionRefusedError, DisplayConnectionError):  # python-xlib wraps the refusal
                if time.monotonic() > deadline or not self.procs.server_running():
                    raise DesktopError(f"Xvfb {self.display} refuses connections") from None
                time.sleep(0.05)

    def close(self, wedged_after_s: float = 10.0) -> None:
        # A call stuck in the X server (one stopped with SIGSTOP never answers) holds our locks;
        # past ``wedged_after_s`` the server is killed, which fails that call and frees them.
        server, done = self.procs.server, threading.Event()

        def watchdog() -> None:
            if not done.wait(wedged_after_s) and server is not None and server.poll() is None:
                logger.warning("desktop {}: X server {} does not answer; killing it", self.id, self.display)
                server.kill()

        threading.Thread(target=watchdog, name=f"close-{self.id}", daemon=True).start()
        try:
            self._close()
        finally:
            done.set()

    def _close(self) -> None:
        with self._lock:
            self.procs.close_apps(include_wm=True)
            if self._input is not None:
                self._input.close()
                self._input = None
            self.procs.stop()
            shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        return self.procs.server_running() and self._input is not None and self._input.ping() \
            and self.procs.alive()

    def pids(self) -> list[int]:
        """Every process of this desktop: its X server and everything it launched (host pids)."""
        return self.procs.pids()

    def memory_pss_kb(self) -> int:
        return procs.pss_kb(self.pids())

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        """The environment of the desktop's processes."""
        return self.procs.env()

    def run(self, argv: list[str] | str, timeout: float = 60.0, shell: bool = False) -> subprocess.CompletedProcess:
        """Run a command in the desktop session (as its user, in its HOME) and wait for it."""
        return self.procs.run(argv, timeout, shell)

    def run_bounded(self, argv: list[str] | str, *, shell: bool, timeout: float, max_output: int) -> dict[str, Any]:
        """Run a command in the desktop session; keep at most ``max_output`` bytes of each stream
        (a command that prints without end is stopped). OSWorld's /execute answer."""
        return self.procs.run_bounded(argv, shell=shell, timeout=timeout, max_output=max_output)

    def launch(self, argv: list[str]) -> Started:
        """Start an app (``argv[0]`` may be an alias of agentenv/envs/apps.py's APPS)."""
        return self.procs.launch(argv)

    # ------------------------------------------------------------------ reset
    def _restore_home(self) -> None:
        self.procs.clear_homes()
        restore_home(self.home, self.seat)
        self.procs.seed_home(self.home)

    def reset(self, task: Any = None) -> None:
        """Close the apps, restore HOME, run the task's setup. Raises on a failed setup step."""
        with self._lock:
            if not self.alive():
                raise DesktopError(f"desktop {self.id}: X server {self.display} is not running")
            self.procs.close_apps()
            # The window manager drops a dead app's windows from its list a moment after the app
            # is gone; a setup step counting windows must not see them.
            deadline = time.monotonic() + 2.0
            while self.window_titles() and time.monotonic() < deadline:
                time.sleep(0.01)
            self._restore_home()
            self._input.clear_state()
            self.resets += 1
            self.task_id = getattr(task, "id", None)
            if task is not None:
                run_setup(self, task)
            self.wait_settled(*RESET_SETTLE)

    # ------------------------------------------------------------------ observation / action
    def screenshot_png(self, compress_level: int = 1) -> bytes:
        img = self.screenshot()
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=compress_level)
        return buf.getvalue()

    def screenshot(self):
        if self._input is None:
            raise DesktopError(f"desktop {self.id} is closed")
        # libX11 (under mss) exits the whole process on an I/O error: never grab from a dead server.
        if not self.procs.server_running():
            raise DesktopError(f"desktop {self.id}: X server {self.display} is not running")
        return self._input.grab()

    def execute(self, action) -> dict[str, Any]:
        """Execute one structured Action. Returns info; bad actions are errors in it, not raises."""
        with self._lock:
            if self._input is None:
                raise DesktopError(f"desktop {self.id} is closed")
            try:
                self._input.execute(action)
                self.wait_settled(*ACTION_SETTLE)
                return {}
            except ActionError as e:
                return {"error": str(e)}
            except Exception as e:  # the X connection broke: the desktop is dead
                if not self.alive():
                    raise DesktopError(f"desktop {self.id}: X server died during the action ({e})") from e
                return {"error": f"{type(e).__name__}: {e}"}

    def wait_settled(self, quiet_s: float, cap_s: float) -> bool:
        """Wait until the screen has not changed (beyond STILL_PX pixels) for ``quiet_s`` seconds and
        no open window is blank, at most ``cap_s``; whether it settled. A screen still changing at
        the cap is logged and shown."""
        if self._input is None or not self.procs.server_running():
            return False
        t0 = time.monotonic()
        prev, still_since = self._input.grab(), t0
        while True:
            time.sleep(SETTLE_POLL_S)
            cur, now = self._input.grab(), time.monotonic()
            if frames_differ(prev, cur):
                still_since = now
            elif now - still_since >= quiet_s and (not blank_below_title(cur) or not self.window_titles()):
                return True
            if now - t0 >= cap_s:
                logger.info("desktop {}: the screen still changes {:.1f} s on", self.id, cap_s)
                return False
            prev = cur

    def close_windows(self, name: str, strict: bool, by_class: bool) -> int:
        """Close the windows whose title (or class, ``by_class``) holds ``name`` (is ``name``,
        ``strict``); how many were asked to close, 0 when the desktop is not connected."""
        with self._lock:
            return self._input.close_windows(name, strict, by_class) if self._input else 0

    def pointer(self) -> tuple[int, int]:
        """Where the mouse pointer is; (0, 0) when the desktop is not connected."""
        return self._input.pointer() if self._input else (0, 0)

    # ------------------------------------------------------------------ queries for evaluators
    def window_titles(self) -> list[str]:
        return self._input.window_titles() if self._input else []

    def active_window_title(self) -> str:
        return self._input.active_window_title() if self._input else ""

    def wait_for_window(self, title: str | None = None, timeout: float = 30.0, before: int | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            titles = self.window_titles()
            if title is None and before is not None and len(titles) > before:
                return True
            if title is not None and any(title.lower() in t.lower() for t in titles):
                return True
            time.sleep(0.05)
        return False

    def clipboard(self) -> str:
        # Chromium offers only UTF8_STRING, galculator only STRING: ask for one, then the other.
        for target in (["-t", "UTF8_STRING"], []):
            try:
                r = self.run(["xclip", "-o", "-selection", "clipboard", *target], timeout=5)
            except subprocess.TimeoutExpired:
                continue
            if r.returncode == 0:
                return r.stdout
        return ""

    def terminal_output(self) -> str | None:
        """The text of the terminal, or None where it cannot be read (plain desktops: no AT-SPI)."""
        return self.procs.terminal_output()

    def accessibility_tree(self, limits: A11yLimits = A11Y_LIMITS) -> str | None:
        """The AT-SPI tree as OSWorld's server gives it (XML), or None where there is none (plain
        desktops run their apps with the bridge off)."""
        return self.procs.accessibility_tree(limits)

    # ------------------------------------------------------------------ files in HOME
    def resolve_path(self, path: str) -> Path:
        """A path inside this desktop's HOME ('~/x', relative, '/home/user/x' as OSWorld writes it,
        or absolute under HOME). Checks where the path leads now; to read or write through it use
        ``read_file``/``write_file``, which also refuse a link swapped in after this check."""
        return resolve_in_home(path, self.home, self.procs.realpath)

    def read_file(self, path: str, max_bytes: int) -> bytes:
        """The bytes of a file in HOME (at most ``max_bytes + 1``, so a caller sees it is over)."""
        fd = open_in_home(self.home, self.resolve_path(path), path, os.O_RDONLY, self.seat.fchown)
        with os.fdopen(fd, "rb") as f:
            return f.read(max_bytes + 1)

    def write_file(self, path: str, data: bytes) -> None:
        """Write a file in HOME (its folders made as needed), owned by the desktop user."""
        fd = open_in_home(self.home, self.resolve_path(path), path, os.O_WRONLY | os.O_CREAT, self.seat.fchown,
                          make_parents=True)
        with os.fdopen(fd, "wb") as f:
            self.seat.fchown(fd)
            os.ftruncate(fd, 0)
            f.write(data)

    def upload_roots(self) -> list[Path]:
        """Host folders whose files an ``upload_file`` step may copy in: the built-in tasks' folder
        and the operator's ``upload_roots``."""
        return [Path(os.path.realpath(r)) for r in (BUILTIN_DIR, *self.spec.upload_roots)]


def frames_differ(a: Any, b: Any) -> bool:
    """Whether two screen grabs (PIL images) differ in more than a caret's worth of pixels."""
    from PIL import ImageChops

    box = ImageChops.difference(a, b).getbbox()
    return box is not None and (box[2] - box[0]) * (box[3] - box[1]) > STILL_PX


def blank_below_title(img: Any) -> bool:
    """Whether the screen below its top TITLE_PX rows is all one colour (a window not drawn yet)."""
    w, h = img.size
    return img.crop((0, min(TITLE_PX, h - 1), w, h)).getcolors(1) is not None


def make_desktop(desktop_id: str, spec: DesktopSpec | None = None) -> Desktop:
    """The desktop ``spec`` asks for: sandboxed or on the host."""
    spec = spec or DesktopSpec()
    return Desktop(desktop_id, spec, SandboxProcesses if spec.sandbox else HostProcesses)
