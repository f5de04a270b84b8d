"""Files written whole or not at all: a temp file beside the target, fsynced, renamed over it, then
the directory fsynced, so that after a crash the target is the old file or the new one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def write_atomic(target: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write ``data`` (bytes, or a function that writes the file it is given) to ``target``."""
    tmp = _tmp(target)
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:  # a full disk, say: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def remove_leftovers(directory: Path, pattern: str = "*") -> list[Path]:
    """Delete the temp files that a writer killed mid-``write_atomic`` (SIGKILL, power loss) left for
    targets matching ``pattern`` in ``directory``; their targets were never written. Call it only
    where this process is the directory's one writer (a buffer it opened). Returns what it removed."""
    gone = [p for p in directory.glob(_tmp(directory / pattern).name) if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
