"""Processes remembered by (PID, start time), so a PID the kernel reuses later is not taken for ours."""

from __future__ import annotations

import time
from pathlib import Path

from agentenv.procs import alive


def ident(pid: int) -> tuple[int, str] | None:
    try:
        return pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def idents(pids) -> set[tuple[int, str]]:
    return {i for p in pids if (i := ident(p))}


def still_running(ids: set[tuple[int, str]]) -> list[int]:
    return [pid for pid, start in ids if alive(pid) and ident(pid) == (pid, start)]


def wait_gone(ids: set[tuple[int, str]], timeout_s: float = 30.0) -> list[int]:
    """The ones still running after ``timeout_s`` (empty: all gone)."""
    deadline = time.monotonic() + timeout_s
    while (left := still_running(ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
