"""Child processes that cannot outlive their parent, and process trees found through /proc.

``spawn_tied(argv, ...)`` starts a child that gets ``sig`` when the process that started it
dies, whatever ends it (SIGKILL included): Linux's PR_SET_PDEATHSIG. The kernel ties the child
to the *thread* that forked it, not the process, so every tied child is forked from one
long-lived thread of ours: a worker thread that ends (a request handler, a thread pool shut
down after start-up) must not take its children with it.

``guard(argv, grace)`` (``python agentenv/procs.py --grace S -- argv``) runs a server whose own
children must not outlive it: tied in its place, it ends the server's whole process group.

``descendants(pid)`` is the process tree under a PID, read from /proc: tests and benchmarks use
it to prove that nothing we started is left, without ever looking processes up by name.
``marked(name, value)`` finds the processes that carry an environment variable (a desktop marks
every process it starts), ``kill_all`` ends a list of them, ``pss_kb`` sums their memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

_PR_SET_PDEATHSIG = 1
_libc: Any = None
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _set_pdeathsig(sig: int) -> None:
    """In the child, between fork and exec: die with ``sig`` when the parent thread does."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _thread() -> ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:  # never shut down: it lives as long as the process
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentenv-spawner")
        return _spawner


def spawn_tied(argv: list[str], sig: int = signal.SIGTERM, **popen_kw: Any) -> subprocess.Popen:
    """``subprocess.Popen(argv, **popen_kw)``, tied to this process's life (see the module doc).

    The child's own children are not tied; the processes this is used for either end theirs when
    they get ``sig`` (the vLLM server, the env service) or take them with them (an X server: its
    clients lose their display and exit).
    """
    if "preexec_fn" in popen_kw:
        raise ValueError("spawn_tied sets preexec_fn itself")

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, preexec_fn=lambda: _set_pdeathsig(sig), **popen_kw)

    return _thread().submit(start).result()


def _stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name: state, ppid, pgrp, ...) for every
    process now; one that ends while we read is skipped."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                yield int(d.name), (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue


def children() -> dict[int, list[int]]:
    """Every process's children now: ppid -> [pid, ...]."""
    out: dict[int, list[int]] = {}
    for pid, fields in _stats():
        out.setdefault(int(fields[1]), []).append(pid)
    return out


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` now (children, their children...), from /proc."""
    kids = children()
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_name(pid: int) -> str | None:
    """The command name of ``pid`` (/proc/PID/comm), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def marked(name: str, value: str) -> list[int]:
    """Every process but this one whose environment holds ``name=value``."""
    marker = f"{name}={value}".encode() + b"\0"
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


def kill_all(pids: list[int], grace: float = 1.0) -> None:
    """SIGTERM each of ``pids``, SIGKILL those left after ``grace`` seconds, reap what is ours."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        if left:
            time.sleep(0.02)
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    for p in left:  # reap so no zombie holds the pid
        _wait_gone(p, 1.0)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)


def terminate(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM a child of ours, SIGKILL it after ``grace`` seconds, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2)


def pss_kb(pids: list[int]) -> int:
    """The proportional set size of ``pids`` together, in KiB (smaps_rollup); gone ones count 0."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def _group_members(pgid: int) -> list[int]:
    """Every process in process group ``pgid`` but this one."""
    return [pid for pid, fields in _stats() if int(fields[2]) == pgid and pid != os.getpid()]


def guard(argv: list[str], grace: float) -> int:
    """Run ``argv`` as a child in this process's group and leave nothing of that group behind.

    A server that forks helpers (vLLM's engine processes) may leave them orphaned when it is
    signalled while it starts: PR_SET_PDEATHSIG reaches only the server. Started by ``spawn_tied``
    in a session of its own, this guard is what gets the signal; it passes SIGTERM on to the
    server, waits ``grace`` seconds, then SIGKILLs whatever is left in the group. It does the same
    when the server exits on its own. Returns the server's exit status.
    """
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)
    got: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda signum, _frame: got.append(signum))
    child = subprocess.Popen(argv)
    while child.poll() is None and not got:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(0.5)
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(grace)
    for _ in range(3):  # a process that forked while we looked is caught on the next pass
        for pid in _group_members(os.getpgrp()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(1)
    rc = child.returncode
    return 128 + signal.SIGKILL if rc is None else (128 - rc if rc < 0 else rc)


if __name__ == "__main__":  # python -I agentenv/procs.py --grace SECONDS -- argv...
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python agentenv/procs.py", description=guard.__doc__.split("\n")[0])
    ap.add_argument("--grace", type=float, default=20.0)
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not argv:
        ap.error("no command given")
    sys.exit(guard(argv, a.grace))
