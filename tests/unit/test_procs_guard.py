"""The process-group guard (agentenv/procs.py) that starts the vLLM server: whatever ends the
server, or the guard, nothing of the server's process group is left. Real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_for

from agentenv import procs
from agentenv.procs import alive, descendants

GUARD = [sys.executable, "-I", str(Path(procs.__file__))]


def test_a_signalled_guard_ends_a_server_that_ignores_sigterm_and_its_children():
    # The "server" ignores SIGTERM and has a child of its own, as vLLM's engine process is.
    server = "trap '' TERM; sleep 300 & sleep 300; wait"
    g = subprocess.Popen(GUARD + ["--grace", "1", "--", "bash", "-c", server], start_new_session=True)
    assert wait_for(lambda: len(descendants(g.pid)) >= 3), descendants(g.pid)
    tree = descendants(g.pid)
    g.send_signal(signal.SIGTERM)
    assert g.wait(20) == 128 + signal.SIGKILL  # the server never exited by itself: it was killed
    assert wait_for(lambda: not any(alive(p) for p in tree)), [p for p in tree if alive(p)]


def test_a_server_that_exits_leaves_no_orphan_and_its_status_is_passed_on():
    g = subprocess.Popen(GUARD + ["--", "bash", "-c", "sleep 300 & echo $! ; exit 3"], start_new_session=True,
                         stdout=subprocess.PIPE, text=True)
    orphan = int(g.stdout.readline())
    assert g.wait(20) == 3
    assert wait_for(lambda: not alive(orphan))
