"""Connecting to a sandbox's runner: its socket file appears at bind(), before listen(), so a runner
that has just started refuses for a moment (CI hit it on a loaded machine); a dead one is an error."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from agentenv.envs.sandbox import SandboxProcesses


def _bound(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # not listening yet: a connect is refused
    return s


def test_a_runner_between_bind_and_listen_is_waited_for(tmp_path):
    srv = _bound(tmp_path / "runner.sock")
    timer = threading.Timer(0.3, srv.listen, args=(8,))
    timer.start()
    me = SimpleNamespace(ctl=tmp_path, server_running=lambda: True)
    t0 = time.monotonic()
    try:
        conn = SandboxProcesses._connect_runner(me, 5.0)
        conn.close()
        assert time.monotonic() - t0 >= 0.25  # it did wait for listen()
    finally:
        timer.join()
        srv.close()


def test_a_refusing_runner_whose_sandbox_is_gone_is_an_error_at_once(tmp_path):
    srv = _bound(tmp_path / "runner.sock")
    me = SimpleNamespace(ctl=tmp_path, server_running=lambda: False)
    t0 = time.monotonic()
    try:
        with pytest.raises(ConnectionRefusedError):
            SandboxProcesses._connect_runner(me, 5.0)
        assert time.monotonic() - t0 < 4.0  # not after the 5-s deadline
    finally:
        srv.close()
