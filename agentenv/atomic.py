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


def write_atomic(target: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write ``data`` (bytes, or a function that writes the file it is given) to ``target``."""
    tmp = target.with_name(f".{target.name}.tmp")
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
