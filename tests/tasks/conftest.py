"""Fixtures for OSWorld-format tasks: a real HTTP server on 127.0.0.1 serving task files (never the
internet), a download cache of the test's own, and the sample tasks with their URLs pointed at it."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_BASE = "http://127.0.0.1:8766"  # what the sample files say; tests point it at their server


@dataclass
class FileServer:
    base: str
    root: Path
    hits: list[str] = field(default_factory=list)


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "served"
    shutil.copytree(SAMPLES / "files", root)
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield FileServer(f"http://127.0.0.1:{srv.server_address[1]}", root, hits)
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.fixture
def agentenv_home(tmp_path, monkeypatch):
    """The download cache lives under $AGENTENV_HOME/cache: a fresh one per test."""
    home = tmp_path / "agentenv-home"
    home.mkdir()
    monkeypatch.setenv("AGENTENV_HOME", str(home))
    monkeypatch.delenv("AGENTENV_OFFLINE", raising=False)
    return home


@pytest.fixture
def samples(tmp_path, file_server):
    """The sample task folder, its URLs on the test's server."""
    out = tmp_path / "samples"
    for f in SAMPLES.rglob("*.json"):
        dest = out / f.relative_to(SAMPLES)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(f.read_text().replace(SAMPLE_BASE, file_server.base))
    return out


def load_sample(samples: Path, task_id: str):
    from agentenv.envs.tasks import load_task_file

    f = next(samples.rglob(f"{task_id}.json"))
    return load_task_file(f)[0]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
