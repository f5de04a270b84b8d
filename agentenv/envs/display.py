"""X displays on this host: a free display number, held while its X server starts, and the
service's own Xauthority (every desktop's cookie, readable by this process only)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from agentenv.envs.desktop_types import DesktopError, Seat


def service_xauthority(scratch: Path) -> Path:
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


def free_display(start: int = 20) -> int:
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
def display_allocation() -> Iterator[None]:
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


def add_cookies(seat: Seat, service_xauth: Path, cookie: str) -> None:
    """Write the display's cookie in the desktop's Xauthority and in the service's."""
    for f in (seat.xauth, service_xauth):
        subprocess.run(["xauth", "-q", "-f", str(f), "add", seat.display, ".", cookie],
                       check=True, capture_output=True)
