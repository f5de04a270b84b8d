"""LocalDesktop: one Xvfb display, a window manager, apps, and a HOME of its own.

Reset closes the session's apps, restores HOME from a template and runs the task's setup
steps: a second or so, instead of a VM snapshot revert. Apps run as an unprivileged user
(``agentenv-desk``, created by scripts/install.sh) when the service runs as root.

Every process a desktop starts carries ``AGENTENV_DESKTOP=<id>`` in its environment and lives
in a session of its own; closing apps ends exactly those processes (found through /proc), never
processes picked by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from loguru import logger

from agentenv.config import EnvServiceConfig
from agentenv.envs.actions import ActionError, XInput
from agentenv.procs import spawn_tied

DESKTOP_USER = "agentenv-desk"
OSWORLD_HOME = "/home/user"  # HOME in OSWorld's VM; task files name paths under it

# App aliases usable in task setup steps (`launch`), expanded to real commands.
APPS: dict[str, list[str]] = {
    "editor": ["mousepad"],
    "terminal": ["xfce4-terminal", "--disable-server"],
    "calculator": ["galculator"],
    "files": ["pcmanfm"],
    "spreadsheet": ["libreoffice", "--calc", "--norestore", "--nologo"],
    "browser": ["chromium", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--renderer-process-limit=1", "--disable-quic",
                "--password-store=basic"],
}
# Files opened by the `open` setup step go to the app for their extension.
OPENERS = {
    ".txt": "editor", ".md": "editor", ".py": "editor", ".csv": "editor", ".json": "editor",
    ".ods": "spreadsheet", ".xlsx": "spreadsheet", ".html": "browser", ".htm": "browser",
}

# Openbox: every window maximized and undecorated, so the layout is the same on every reset
# and coordinates in a task's oracle stay valid.
OPENBOX_RC = """<?xml version="1.0" encoding="UTF-8"?>
<openbox_config xmlns="http://openbox.org/3.4/rc">
  <focus><focusNew>yes</focusNew><followMouse>no</followMouse></focus>
  <menu><file>{menu}</file></menu>
  <keyboard>
    <keybind key="C-A-t"><action name="Execute"><command>{terminal}</command></action></keybind>
    <keybind key="A-F1"><action name="ShowMenu"><menu>root-menu</menu></action></keybind>
    <keybind key="A-F4"><action name="Close"/></keybind>
  </keyboard>
  <mouse>
    <context name="Root">
      <mousebind button="Right" action="Press"><action name="ShowMenu"><menu>root-menu</menu></action></mousebind>
    </context>
  </mouse>
  <placement><policy>Smart</policy></placement>
  <desktops><number>1</number></desktops>
  <applications>
    <application class="*" type="normal"><maximized>yes</maximized><focus>yes</focus></application>
  </applications>
</openbox_config>
"""

# The launcher an agent opens with Alt+F1 or a right click on the desktop (OSWorld's Ubuntu has
# its dock and Activities; this is our equivalent). Ctrl+Alt+T opens a terminal, as on Ubuntu.
OPENBOX_MENU = """<?xml version="1.0" encoding="UTF-8"?>
<openbox_menu xmlns="http://openbox.org/3.4/menu">
  <menu id="root-menu" label="Applications">
""" + "".join(f"""    <item label="{label}"><action name="Execute"><command>{cmd}</command></action></item>
""" for label, cmd in (("Terminal", "{terminal}"), ("Text Editor", "mousepad"),
                       ("Files", "pcmanfm"), ("Calculator", "galculator"),
                       ("Spreadsheet", "libreoffice --calc --norestore --nologo"),
                       ("Browser", "chromium --disable-gpu --no-first-run --password-store=basic"))) + """  </menu>
</openbox_menu>
"""


LIBREOFFICE_SETTINGS = """<?xml version="1.0" encoding="UTF-8"?>
<oor:items xmlns:oor="http://openoffice.org/2001/registry" xmlns:xs="http://www.w3.org/2001/XMLSchema" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<item oor:path="/org.openoffice.Office.Common/Misc"><prop oor:name="ShowTipOfTheDay" oor:op="fuse">\
<value>false</value></prop></item>
</oor:items>
"""


class DesktopError(RuntimeError):
    """The desktop itself failed (X server gone, app would not start, setup step failed)."""


def _desktop_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(DESKTOP_USER)
    except KeyError:
        logger.warning("user {} not found; apps run as root (run scripts/install.sh)", DESKTOP_USER)
        return None


def _service_xauthority(scratch: Path) -> Path:
    """This process's Xauthority (every desktop's cookie, readable by us only); $XAUTHORITY names it."""
    path = scratch / f"service-{os.geteuid()}.xauth"
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            path.unlink()  # not ours: never read or write through it
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)
    os.environ["XAUTHORITY"] = str(path)
    return path


def _free_display(start: int = 20) -> int:
    for n in range(start, start + 1000):
        sock, lock = Path(f"/tmp/.X11-unix/X{n}"), Path(f"/tmp/.X{n}-lock")
        if lock.exists():
            try:
                pid = int(lock.read_text().strip())
                os.kill(pid, 0)
                continue  # a live X server owns it
            except (ValueError, ProcessLookupError, PermissionError):
                pass
            lock.unlink(missing_ok=True)  # stale: its server is gone
            sock.unlink(missing_ok=True)
        if not sock.exists():
            return n
    raise DesktopError("no free X display number")


_display_lock = threading.Lock()


@contextlib.contextmanager
def _display_allocation() -> Iterator[None]:
    """Held while a display number is picked and its X server starts: by the threads of this
    process and, through a lock file, by every other process (env services started side by side
    would otherwise pick the same free number)."""
    with _display_lock:
        fd = os.open(Path(tempfile.gettempdir()) / ".agentenv-display.lock", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


_SETTINGS = EnvServiceConfig()  # the defaults, declared there once


@dataclass
class DesktopSpec:
    """One desktop's make-up. A service's desktops get theirs from its settings (``from_settings``)."""

    width: int = _SETTINGS.width
    height: int = _SETTINGS.height
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "agentenv-desktops")
    template: Path | None = None       # extra files copied into every fresh HOME
    # Host folders an ``upload_file`` setup step may read from (besides the built-in tasks' folder);
    # a task names files of its own folder, never an arbitrary host path.
    upload_roots: tuple[Path, ...] = ()
    sandbox: bool = _SETTINGS.sandbox  # a SandboxDesktop (agentenv/envs/sandbox.py) instead
    network: bool = _SETTINGS.sandbox_network  # a sandbox shares the host's network (tasks that need it)

    @classmethod
    def from_settings(cls, s: EnvServiceConfig) -> "DesktopSpec":
        return cls(width=s.width, height=s.height, sandbox=s.sandbox, network=s.sandbox_network,
                   upload_roots=tuple(Path(r) for r in s.upload_roots))


class LocalDesktop:
    """A real X desktop. Thread-safe: every public method takes the desktop's lock."""

    sandboxed = False  # SandboxDesktop: every process in namespaces of its own

    def __init__(self, desktop_id: str, spec: DesktopSpec | None = None):
        self.id = desktop_id
        self.spec = spec or DesktopSpec()
        self.width, self.height = self.spec.width, self.spec.height
        self.root = self.spec.scratch / desktop_id
        self.home = self.root / "user"  # named as OSWorld's HOME: apps title windows after it (pcmanfm)
        self.user = _desktop_user()
        self.display_num = -1
        self._xvfb: subprocess.Popen | None = None
        self._wm: subprocess.Popen | None = None
        self._input: XInput | None = None
        self._lock = threading.RLock()
        self.task_id: str | None = None
        self.resets = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def display(self) -> str:
        return f":{self.display_num}"

    def start(self) -> "LocalDesktop":
        try:
            return self._start()
        except BaseException:
            self._close()  # a desktop that did not come up leaves no process or folder behind
            raise

    def _start(self) -> "LocalDesktop":
        with self._lock:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True)
            os.chmod(self.spec.scratch, 0o755)
            # Each desktop's apps read an Xauthority holding their own cookie only; this process,
            # which connects to every desktop (libX11 reads $XAUTHORITY per connection), keeps all
            # cookies in a file of its own that no desktop can read.
            self.xauth = self.root / "Xauthority"
            service_xauth = _service_xauthority(self.spec.scratch)
            cookie = secrets.token_hex(16)
            with _display_allocation():  # two desktops must not pick the same display number
                self.display_num = _free_display()
                for f in (self.xauth, service_xauth):
                    subprocess.run(["xauth", "-q", "-f", str(f), "add", self.display, ".", cookie],
                                   check=True, capture_output=True)
                self._chown(self.root)
                self._chown(self.xauth)
                self._xvfb = self._start_x_server()
                deadline = time.monotonic() + 15
                while not Path(f"/tmp/.X11-unix/X{self.display_num}").exists():
                    if self._xvfb.poll() is not None or time.monotonic() > deadline:
                        raise DesktopError(f"X server {self.display} did not start: {self._server_log()}")
                    time.sleep(0.02)
            self._input = self._connect(time.monotonic() + 10)
            self._restore_home()
            self._start_wm()
            self._input.wait_for_wm(5.0)
            logger.debug("desktop {} up on {}", self.id, self.display)
            return self

    def _start_x_server(self) -> subprocess.Popen:
        # Tied to this service's life (its apps exit with their display), and with an
        # environment of its own: nothing of the service's (its token) reaches it.
        return spawn_tied(
            ["Xvfb", self.display, "-screen", "0", f"{self.width}x{self.height}x24",
             "-nolisten", "tcp", "-auth", str(self.xauth), "-noreset"],
            sig=signal.SIGKILL, env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=open(self.root / "xvfb.log", "wb"),
            start_new_session=True,
        )

    def _server_log(self) -> str:
        try:
            return (self.root / "xvfb.log").read_text(errors="replace")[-500:]
        except OSError:
            return "(no log)"

    terminal = "xfce4-terminal --disable-server"  # what Ctrl+Alt+T and the menu start

    def _openbox_files(self, folder: Path, seen_as: str) -> None:
        """Write openbox's config and menu in ``folder``, which openbox sees as ``seen_as``."""
        (folder / "openbox-menu.xml").write_text(OPENBOX_MENU.replace("{terminal}", self.terminal))
        (folder / "openbox-rc.xml").write_text(OPENBOX_RC.replace("{menu}", f"{seen_as}/openbox-menu.xml")
                                               .replace("{terminal}", self.terminal))

    def _start_wm(self) -> None:
        self._openbox_files(self.root, str(self.root))
        self._wm = self._spawn(["openbox", "--config-file", str(self.root / "openbox-rc.xml")], log="openbox.log")

    def _connect(self, deadline: float) -> XInput:
        # The socket file appears when Xvfb binds it, a moment before it listens: under load a
        # first connection can be refused (python-xlib reports it as DisplayConnectionError when it
        # connects by the socket's path, as it does for a sandboxed desktop).
        from Xlib.error import DisplayConnectionError

        while True:
            try:
                return XInput(self.display, str(self.xauth), self.width, self.height)
            except (ConnectionRefusedError, DisplayConnectionError):  # python-xlib wraps the refusal
                if time.monotonic() > deadline or self._xvfb.poll() is not None:
                    raise DesktopError(f"Xvfb {self.display} refuses connections") from None
                time.sleep(0.05)

    def close(self, wedged_after_s: float = 10.0) -> None:
        # A call stuck in the X server (one stopped with SIGSTOP never answers) holds our locks;
        # past ``wedged_after_s`` the server is killed, which fails that call and frees them.
        xvfb, done = self._xvfb, threading.Event()

        def watchdog() -> None:
            if not done.wait(wedged_after_s) and xvfb is not None and xvfb.poll() is None:
                logger.warning("desktop {}: X server {} does not answer; killing it", self.id, self.display)
                xvfb.kill()

        threading.Thread(target=watchdog, name=f"close-{self.id}", daemon=True).start()
        try:
            self._close()
        finally:
            done.set()

    def _close(self) -> None:
        with self._lock:
            self.close_apps(include_wm=True)
            if self._input is not None:
                self._input.close()
                self._input = None
            if self._xvfb is not None:
                _terminate(self._xvfb)
                self._xvfb = None
            shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        return self._xvfb is not None and self._xvfb.poll() is None and self._input is not None \
            and self._input.ping()

    @property
    def xvfb_pid(self) -> int | None:
        return self._xvfb.pid if self._xvfb else None

    def pids(self) -> list[int]:
        """Every process of this desktop: Xvfb plus everything it launched."""
        out = [self._xvfb.pid] if self._xvfb and self._xvfb.poll() is None else []
        return out + _marked_pids(self.id)

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        user = self.user
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "SHELL": "/bin/bash",  # the desktop user's login shell is nologin
            "HOME": str(self.home),
            "USER": user.pw_name if user else os.environ.get("USER", "root"),
            "LOGNAME": user.pw_name if user else os.environ.get("USER", "root"),
            "DISPLAY": self.display,
            "XAUTHORITY": str(self.xauth),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "NO_AT_BRIDGE": "1",
            "XDG_RUNTIME_DIR": str(self.root / "xdg-runtime"),
            "AGENTENV_DESKTOP": self.id,
        }

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _as_user(self) -> dict[str, Any]:
        """subprocess arguments that drop to the desktop user (when we run as root)."""
        if self.user is None:
            return {}
        return dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])

    def _spawn(self, argv: list[str], log: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
        kw = self._as_user()
        if argv and argv[0] == "chromium" and self.user is None and os.geteuid() == 0:
            argv = argv + ["--no-sandbox"]  # Chromium refuses root with its sandbox on
        out = open(self.root / log, "ab") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(argv, env=self.env(), cwd=str(cwd or self.home), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True, **kw)
        except FileNotFoundError as e:
            raise DesktopError(f"cannot start {argv[0]!r}: not installed (run scripts/install.sh)") from e

    def run(self, argv: list[str] | str, timeout: float = 60.0, shell: bool = False) -> subprocess.CompletedProcess:
        """Run a command in the desktop session (as its user, in its HOME) and wait for it."""
        return subprocess.run(argv, env=self.env(), cwd=str(self.home), shell=shell, capture_output=True,
                              text=True, errors="replace", timeout=timeout, start_new_session=True,
                              **self._as_user())

    def run_bounded(self, argv: list[str] | str, *, shell: bool, timeout: float, max_output: int) -> dict[str, Any]:
        """Run a command in the desktop session; keep at most ``max_output`` bytes of each stream.
        The streams go to files capped by RLIMIT_FSIZE, so a command that prints without end is
        stopped (SIGXFSZ) instead of filling the service's memory or disk. OSWorld's /execute answer."""
        import resource

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_output + 1, max_output + 1))

        with tempfile.TemporaryFile(dir=self.root) as out, tempfile.TemporaryFile(dir=self.root) as err:
            try:
                p = subprocess.Popen(argv, env=self.env(), cwd=str(self.home), shell=shell, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=err, start_new_session=True, preexec_fn=cap,
                                     **self._as_user())
            except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
                return {"status": "error", "output": "", "error": str(e), "returncode": 127}
            try:
                rc = p.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc, timed_out = p.wait(), True

            def read(f: Any) -> str:
                f.seek(0)
                data = f.read(max_output + 1)
                text = data[:max_output].decode("utf-8", "replace")
                return text + (f"\n[output cut at {max_output} bytes]" if len(data) > max_output else "")

            if timed_out:
                return {"status": "error", "output": read(out), "error": f"timed out after {timeout}s",
                        "returncode": -1}
            return {"status": "success", "output": read(out), "error": read(err), "returncode": rc}

    def launch(self, argv: list[str]) -> subprocess.Popen:
        if argv and argv[0] in APPS:
            argv = APPS[argv[0]] + argv[1:]
        if argv and argv[0] in ("chromium", "google-chrome"):  # OSWorld configs say google-chrome
            argv = ["chromium", f"--user-data-dir={self.home}/.config/chromium"] + \
                [a for a in APPS["browser"][1:] if a not in argv] + argv[1:]
        return self._spawn(argv, log="apps.log")

    def close_apps(self, include_wm: bool = False) -> None:
        wm = self._wm.pid if self._wm and not include_wm else None
        victims = [p for p in _marked_pids(self.id) if p != wm]
        _kill_all(victims)
        if include_wm:
            self._wm = None

    # ------------------------------------------------------------------ reset
    def _restore_home(self) -> None:
        if self.home.exists():
            # Rename first: a process that was still dying cannot write into the fresh HOME.
            trash = self.root / f"trash-{secrets.token_hex(4)}"  # unique: an earlier failed reset may have left one
            self.home.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        if self.spec.template and self.spec.template.exists():
            shutil.copytree(self.spec.template, self.home, symlinks=True)
        else:
            self.home.mkdir(parents=True, exist_ok=True)
        for sub in ("Documents", "Desktop", "Downloads", ".config"):
            (self.home / sub).mkdir(exist_ok=True)
        # A blinking caret makes two screenshots of one state differ at random (replay compares them).
        gtk = self.home / ".config" / "gtk-3.0" / "settings.ini"
        if not gtk.exists():
            gtk.parent.mkdir(exist_ok=True)
            gtk.write_text("[Settings]\ngtk-cursor-blink=false\n")
        # HOME is fresh at every reset, so LibreOffice starts as for the first time: its "Tip of the
        # Day" dialog would take the keyboard from the document on every task (OSWorld's VM has a
        # used profile).
        office = self.home / ".config" / "libreoffice" / "4" / "user" / "registrymodifications.xcu"
        if not office.exists():
            office.parent.mkdir(parents=True, exist_ok=True)
            office.write_text(LIBREOFFICE_SETTINGS)
        runtime = self.root / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        if self.user is not None:
            for p in [runtime, *self.home.rglob("*"), self.home]:
                os.lchown(p, self.user.pw_uid, self.user.pw_gid)

    def reset(self, task: Any = None) -> None:
        """Close the apps, restore HOME, run the task's setup. Raises on a failed setup step."""
        from agentenv.envs.tasks.setup import run_setup

        with self._lock:
            if not self.alive():
                raise DesktopError(f"desktop {self.id}: X server {self.display} is not running")
            self.close_apps()
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
        if self._xvfb is None or self._xvfb.poll() is not None:
            raise DesktopError(f"desktop {self.id}: X server {self.display} is not running")
        return self._input.grab()

    def execute(self, action) -> dict[str, Any]:
        """Execute one structured Action. Returns info; bad actions are errors in it, not raises."""
        with self._lock:
            if self._input is None:
                raise DesktopError(f"desktop {self.id} is closed")
            try:
                self._input.execute(action)
                return {}
            except ActionError as e:
                return {"error": str(e)}
            except Exception as e:  # the X connection broke: the desktop is dead
                if not self.alive():
                    raise DesktopError(f"desktop {self.id}: X server died during the action ({e})") from e
                return {"error": f"{type(e).__name__}: {e}"}

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

    def resolve_path(self, path: str) -> Path:
        """A path inside this desktop's HOME ('~/x', relative, '/home/user/x' as OSWorld writes it,
        or absolute under HOME). Checks where the path leads now; to read or write through it use
        ``read_file``/``write_file``, which also refuse a link swapped in after this check."""
        if not isinstance(path, str) or "\0" in path:
            raise PermissionError(f"path {path!r} is not a valid path")
        if path == OSWORLD_HOME or path.startswith(OSWORLD_HOME + "/"):
            path = str(self.home) + path[len(OSWORLD_HOME):]
        p = Path(path.replace("~", str(self.home), 1) if path.startswith("~") else path)
        if not p.is_absolute():
            p = self.home / p
        # realpath: a symlink the desktop user made in HOME must not lead the service (root) out of it
        p = self._realpath(p)
        home = Path(os.path.realpath(self.home))
        if p != home and home not in p.parents:
            raise PermissionError(f"path {path!r} is outside the desktop's HOME")
        return p

    def _realpath(self, p: Path) -> Path:
        """Where ``p`` leads, links followed as the desktop's apps see them."""
        return Path(os.path.realpath(p))

    def _open_in_home(self, path: str, flags: int, make_parents: bool = False) -> int:
        """A file descriptor of the regular file ``path`` in HOME, opened one component at a time
        with O_NOFOLLOW from HOME's own descriptor: no symlink (planted before or after
        ``resolve_path`` looked), no hard link to a file outside, no FIFO leads this process,
        which may be root, anywhere else."""
        home = Path(os.path.realpath(self.home))
        parts = self.resolve_path(path).relative_to(home).parts
        if not parts:
            raise IsADirectoryError(f"{path!r} is the HOME folder, not a file")
        dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(home, dir_flags)
        try:
            for name in parts[:-1]:
                try:
                    nxt = os.open(name, dir_flags, dir_fd=fd)
                except FileNotFoundError:
                    if not make_parents:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fd)
                    nxt = os.open(name, dir_flags, dir_fd=fd)
                    self._fchown(nxt)
                os.close(fd)
                fd = nxt
            out = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=fd)
        finally:
            os.close(fd)
        st = os.fstat(out)
        problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
                   else "has other hard links" if st.st_nlink > 1 else None)
        if problem:
            os.close(out)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(f"{path!r} {problem}")
            raise PermissionError(f"{path!r} {problem}: refused")
        return out

    def read_file(self, path: str, max_bytes: int) -> bytes:
        """The bytes of a file in HOME (at most ``max_bytes + 1``, so a caller sees it is over)."""
        fd = self._open_in_home(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            return f.read(max_bytes + 1)

    def write_file(self, path: str, data: bytes) -> None:
        """Write a file in HOME (its folders made as needed), owned by the desktop user."""
        fd = self._open_in_home(path, os.O_WRONLY | os.O_CREAT, make_parents=True)
        with os.fdopen(fd, "wb") as f:
            self._fchown(fd)
            os.ftruncate(fd, 0)
            f.write(data)

    def _fchown(self, fd: int) -> None:
        if self.user is not None:
            os.fchown(fd, self.user.pw_uid, self.user.pw_gid)

    def terminal_output(self) -> str | None:
        """The text of the terminal, or None where it cannot be read (plain desktops: no AT-SPI)."""
        return None

    def accessibility_tree(self) -> str | None:
        """The AT-SPI tree as OSWorld's server gives it (XML), or None where there is none: plain
        desktops run their apps with the bridge off (NO_AT_BRIDGE), the sandboxed one has it."""
        return None

    def upload_roots(self) -> list[Path]:
        """Host folders whose files an ``upload_file`` step may copy in: the built-in tasks' folder
        and the operator's ``upload_roots``."""
        from agentenv.envs.tasks import BUILTIN_DIR

        return [Path(os.path.realpath(r)) for r in (BUILTIN_DIR, *self.spec.upload_roots)]

    def memory_pss_kb(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        return total


def make_desktop(desktop_id: str, spec: DesktopSpec) -> LocalDesktop:
    """The desktop ``spec`` asks for: sandboxed or on the host."""
    if spec.sandbox:
        from agentenv.envs.sandbox import SandboxDesktop

        return SandboxDesktop(desktop_id, spec)
    return LocalDesktop(desktop_id, spec)


def _marked_pids(desktop_id: str) -> list[int]:
    marker = f"AGENTENV_DESKTOP={desktop_id}".encode() + b"\0"
    pids = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if (b"\0" + env).find(b"\0" + marker) >= 0:
            pids.append(int(d))
    return pids


def _kill_all(pids: list[int], grace: float = 1.0) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in alive:  # reap so no zombie holds the pid
        _wait_gone(p, 1.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.01)


def _terminate(proc: subprocess.Popen, grace: float = 2.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2)
