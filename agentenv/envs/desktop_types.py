"""What every desktop module shares: a desktop's spec, its errors, where it lives on the host
(``Seat``) and the interface of the strategy that starts its processes (``Processes``: on the
host, agentenv/envs/host.py, or in a sandbox, agentenv/envs/sandbox.py). A leaf: it imports no
other desktop module, so the desktop, its strategies and the task setup steps all import it.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from agentenv.config import EnvServiceConfig

DESKTOP_USER = "agentenv-desk"
OSWORLD_HOME = "/home/user"  # HOME in OSWorld's VM; task files name paths under it


class DesktopError(RuntimeError):
    """The desktop itself failed (X server gone, app would not start, setup step failed)."""


class A11yError(RuntimeError):
    """The accessibility tree or the terminal's text could not be read; the message says why."""


@dataclass(frozen=True)
class A11yLimits:
    """Bounds on one accessibility tree (OSWorld's server has the first three); a tree past one is cut
    there and says so (the root's ``truncated`` attribute)."""

    max_nodes: int = 5000          # OSWorld: MAX_CALLS
    max_depth: int = 50            # OSWorld: MAX_DEPTH
    max_children: int = 1024       # OSWorld: MAX_WIDTH
    max_text_chars: int = 100_000  # one node's text
    max_bytes: int = 8 << 20       # the whole tree, roughly; the runner ends the reader a little past it
    seconds: float = 10.0          # the reader's own deadline; it is killed 5 s after


A11Y_LIMITS = A11yLimits()


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
    sandbox: bool = _SETTINGS.sandbox  # apps in a bubblewrap sandbox (agentenv/envs/sandbox.py)
    network: bool = _SETTINGS.sandbox_network  # a sandbox shares the host's network (tasks that need it)

    @classmethod
    def from_settings(cls, s: EnvServiceConfig) -> "DesktopSpec":
        return cls(width=s.width, height=s.height, sandbox=s.sandbox, network=s.sandbox_network,
                   upload_roots=tuple(Path(r) for r in s.upload_roots))


def desktop_user() -> pwd.struct_passwd | None:
    """The unprivileged user apps run as when this service runs as root; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(DESKTOP_USER)
    except KeyError:
        logger.warning("user {} not found; apps run as root (run scripts/install.sh)", DESKTOP_USER)
        return None


def as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess arguments that drop to ``user`` (none when there is no user to drop to)."""
    return {} if user is None else dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])


@dataclass
class Seat:
    """Where one desktop lives on the host: its id, its folder, its X display and the user its apps
    run as. The desktop and its ``Processes`` strategy share it."""

    id: str
    spec: DesktopSpec
    root: Path                              # the desktop's own folder under spec.scratch
    user: pwd.struct_passwd | None
    display_num: int = -1

    @property
    def display(self) -> str:
        return f":{self.display_num}"

    @property
    def xauth(self) -> Path:
        """The Xauthority file holding this display's cookie only (the desktop's apps read it)."""
        return self.root / "Xauthority"

    def chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def fchown(self, fd: int) -> None:
        if self.user is not None:
            os.fchown(fd, self.user.pw_uid, self.user.pw_gid)


class Started(Protocol):
    """A process a desktop started (a ``subprocess.Popen`` on the host; a pid in the sandbox)."""

    pid: int


class Processes(ABC):
    """How a desktop's processes are started and reached: the X server and window manager, apps,
    commands, a path inside the desktop, the processes it owns. The one thing that differs between
    a desktop on the host and a sandboxed one; the desktop (agentenv/envs/desktop.py) holds the rest."""

    sandboxed = False     # every process in namespaces of its own
    osworld_like = False  # task commands run as written: python, sudo -S, /home/user (tasks/commands.py)
    terminal = ""         # the command Ctrl+Alt+T and the menu start

    def __init__(self, seat: Seat):
        self.seat = seat
        self.home = seat.root / "user"  # named as OSWorld's HOME: apps title windows after it (pcmanfm)
        self.server: subprocess.Popen | None = None  # the process that holds the X server

    def server_running(self) -> bool:
        return self.server is not None and self.server.poll() is None

    @abstractmethod
    def start_server(self) -> None:
        """Start the X server on ``seat.display`` (``self.server``); its socket appears on the host."""

    @abstractmethod
    def server_log(self) -> str:
        """The end of the X server's log (for an error saying why it did not start)."""

    @abstractmethod
    def start_wm(self) -> None:
        """Start the window manager, once the X server answers."""

    @abstractmethod
    def env(self) -> dict[str, str]:
        """The environment of every process the desktop starts."""

    @abstractmethod
    def spawn(self, argv: list[str], log: str | None = None) -> Started:
        """Start ``argv`` in the desktop's session, its output appended to ``log``."""

    @abstractmethod
    def launch(self, argv: list[str]) -> Started:
        """Start an app (``argv[0]`` may be an alias of agentenv/envs/apps.py's APPS)."""

    @abstractmethod
    def run(self, argv: list[str] | str, timeout: float, shell: bool) -> subprocess.CompletedProcess:
        """Run a command in the desktop's session (as its user, in its HOME) and wait for it."""

    @abstractmethod
    def run_bounded(self, argv: list[str] | str, *, shell: bool, timeout: float, max_output: int) -> dict[str, Any]:
        """Run a command; keep at most ``max_output`` bytes of each stream. OSWorld's /execute answer."""

    @abstractmethod
    def close_apps(self, include_wm: bool = False) -> None:
        """End the apps (and the window manager with ``include_wm``, when the desktop closes)."""

    @abstractmethod
    def stop(self) -> None:
        """End the X server and everything left of the desktop's processes."""

    @abstractmethod
    def pids(self) -> list[int]:
        """Every process of this desktop (host pids)."""

    def alive(self) -> bool:
        """The strategy's own check, beyond the X server answering."""
        return True

    def realpath(self, p: Path) -> Path:
        """Where ``p`` leads, links followed as the desktop's apps see them."""
        return Path(os.path.realpath(p))

    def clear_homes(self) -> None:
        """Before HOME is restored: remove what else a task left where homes live."""

    def seed_home(self, home: Path) -> None:
        """After HOME is restored: what this kind of desktop adds to a fresh HOME."""

    def terminal_output(self) -> str | None:
        """The text of the terminal, or None where it cannot be read (plain desktops: no AT-SPI)."""
        return None

    def accessibility_tree(self, limits: A11yLimits) -> str | None:
        """The AT-SPI tree as OSWorld's server gives it (XML), or None where there is none: plain
        desktops run their apps with the bridge off (NO_AT_BRIDGE), the sandboxed one has it."""
        return None
