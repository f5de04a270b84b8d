"""A desktop's HOME on the host: made fresh from a template at every reset, and the paths in it
that the service (which may be root) reads and writes for a task, never led out of it by a link."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

from agentenv.envs import app_defaults
from agentenv.envs.apps import LIBREOFFICE_SETTINGS
from agentenv.envs.desktop_types import OSWORLD_HOME, Seat


def restore_home(home: Path, seat: Seat) -> None:
    """HOME as a task starts with it: the template's files (``seat.spec.template``) or nothing, the
    usual folders, and the settings apps need; everything owned by the desktop user."""
    if home.exists():
        # Rename first: a process that was still dying cannot write into the fresh HOME.
        trash = seat.root / f"trash-{secrets.token_hex(4)}"  # unique: an earlier failed reset may have left one
        home.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    template = seat.spec.template
    if template and template.exists():
        shutil.copytree(template, home, symlinks=True)
    else:
        home.mkdir(parents=True, exist_ok=True)
    for sub in ("Documents", "Desktop", "Downloads", ".config"):
        (home / sub).mkdir(exist_ok=True)
    # A blinking caret makes two screenshots of one state differ at random (replay compares them).
    gtk = home / ".config" / "gtk-3.0" / "settings.ini"
    if not gtk.exists():
        gtk.parent.mkdir(exist_ok=True)
        gtk.write_text("[Settings]\ngtk-cursor-blink=false\n")
    # HOME is fresh at every reset, so LibreOffice starts as for the first time: its "Tip of the
    # Day" dialog would take the keyboard from the document on every task (OSWorld's VM has a
    # used profile).
    office = home / ".config" / "libreoffice" / "4" / "user" / "registrymodifications.xcu"
    if not office.exists():
        office.parent.mkdir(parents=True, exist_ok=True)
        office.write_text(LIBREOFFICE_SETTINGS)
    app_defaults.write(home)  # VLC's HTTP interface, Thunderbird's offline profile
    runtime = seat.root / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    if seat.user is not None:
        for p in [runtime, *home.rglob("*"), home]:
            os.lchown(p, seat.user.pw_uid, seat.user.pw_gid)


def resolve_in_home(path: str, home: Path, realpath: Callable[[Path], Path]) -> Path:
    """``path`` ('~/x', relative, '/home/user/x' as OSWorld writes it, or absolute under HOME) as a
    host path under ``home``, links followed by ``realpath``; PermissionError if it leads out."""
    if not isinstance(path, str) or "\0" in path:
        raise PermissionError(f"path {path!r} is not a valid path")
    if path == OSWORLD_HOME or path.startswith(OSWORLD_HOME + "/"):
        path = str(home) + path[len(OSWORLD_HOME):]
    p = Path(path.replace("~", str(home), 1) if path.startswith("~") else path)
    if not p.is_absolute():
        p = home / p
    # realpath: a symlink the desktop user made in HOME must not lead the service (root) out of it
    p = realpath(p)
    real_home = Path(os.path.realpath(home))
    if p != real_home and real_home not in p.parents:
        raise PermissionError(f"path {path!r} is outside the desktop's HOME")
    return p


def open_in_home(home: Path, resolved: Path, path: str, flags: int, fchown: Callable[[int], None],
                 make_parents: bool = False) -> int:
    """A file descriptor of the regular file ``resolved`` (what ``path`` resolved to) in HOME, opened
    one component at a time with O_NOFOLLOW from HOME's own descriptor: no symlink (planted before
    or after the path was resolved), no hard link to a file outside, no FIFO leads this process,
    which may be root, anywhere else. Folders it makes are given to the desktop user (``fchown``)."""
    real_home = Path(os.path.realpath(home))
    parts = resolved.relative_to(real_home).parts
    if not parts:
        raise IsADirectoryError(f"{path!r} is the HOME folder, not a file")
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(real_home, dir_flags)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, dir_flags, dir_fd=fd)
            except FileNotFoundError:
                if not make_parents:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                nxt = os.open(name, dir_flags, dir_fd=fd)
                fchown(nxt)
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
