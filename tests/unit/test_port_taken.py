"""A port that is already taken is a clear error naming it: `agentenv run` never starts its own env
service or model server on a port where another one answers (whose readiness check would pass, and
whose token is not ours: the run would end in HTTP 401)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentenv.services import EnvService, PortTakenError, VLLMService


class _Health(BaseHTTPRequestHandler):
    """Answers /health as an env service with one desktop does; everything else 401."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        ok = self.path == "/health"
        body = json.dumps({"status": "ok", "desktops": 1} if ok else {"detail": "unauthorized"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def someone_elses_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    t.join(5)


def test_an_env_service_is_not_started_on_a_taken_port(someone_elses_service, tmp_path):
    port = someone_elses_service
    svc = EnvService(num=1, port=port, log=tmp_path / "env.log")
    with pytest.raises(PortTakenError) as e:
        svc.start()
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "already taken" in msg and "ENV_SERVER_URL" in msg
    assert svc.proc is None  # nothing was started, nothing attached to


def test_a_vllm_server_is_not_started_on_a_taken_port(tmp_path):
    with socket.socket() as s:  # a listener that is no model server
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        svc = VLLMService(port=port, run_dir=tmp_path)
        with pytest.raises(PortTakenError) as e:
            svc.start(timeout=5)
    assert f"127.0.0.1:{port}" in str(e.value) and "llm.port" in str(e.value)
    assert svc.proc is None


def test_a_free_port_passes(tmp_path):
    from agentenv.services import ensure_port_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ensure_port_free("127.0.0.1", port, "a test service", "")  # closed again: free
