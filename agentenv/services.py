"""Start and stop the local services a run needs when none are given: the tiny model on vLLM
(through scripts/start_vllm_service.sh) and an env service with N desktops.

Each is ended by the PID it was started with; nothing is looked up by name.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from loguru import logger

from agentenv.config import AGENTENV_HOME

ROOT = Path(__file__).resolve().parent.parent
START_VLLM = ROOT / "scripts" / "start_vllm_service.sh"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class VLLMService:
    """The tiny UI-TARS model served by vLLM on loopback; a context manager."""

    def __init__(self, port: int = 8000, extra: list[str] | None = None, run_dir: Path | None = None):
        self.port = port
        self.extra = extra or []
        self.run_dir = run_dir or AGENTENV_HOME / "run"
        self.url = f"http://127.0.0.1:{port}/v1"
        self.model = "tiny-uitars"

    def start(self) -> "VLLMService":
        pidfile = self.run_dir / f"vllm-{self.port}.pid"
        if pidfile.exists() and _healthy(f"http://127.0.0.1:{self.port}/health"):
            # Started earlier by start_vllm_service.sh (by the user): use it, and leave it running.
            logger.info("using the vLLM server already running on port {}", self.port)
            self.owned = False
            return self
        self.owned = True
        cmd = ["bash", str(START_VLLM), "--port", str(self.port), "--run-dir", str(self.run_dir), *self.extra]
        logger.info("starting the tiny model on vLLM (about a minute on a CPU)")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"start_vllm_service.sh failed:\n{r.stderr[-3000:]}")
        for line in r.stdout.splitlines():
            if line.startswith("export "):
                for kv in line[len("export "):].split():
                    k, v = kv.split("=", 1)
                    if k == "VLLM_SERVER_URL":
                        self.url = v
                    elif k == "VLLM_MODEL_NAME":
                        self.model = v
        return self

    def stop(self) -> None:
        if not getattr(self, "owned", True):
            return
        subprocess.run(["bash", str(START_VLLM), "--stop", "--port", str(self.port), "--run-dir", str(self.run_dir)],
                       capture_output=True)

    def __enter__(self) -> "VLLMService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EnvService:
    """``agentenv serve-envs`` as a child process on loopback; a context manager."""

    def __init__(self, num: int = 4, port: int = 8100, width: int = 1920, height: int = 1080,
                 token: str | None = None, log: Path | None = None):
        self.num, self.port, self.width, self.height = num, port, width, height
        self.token = token or secrets.token_urlsafe(16)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "EnvService":
        env = {**os.environ, "ENV_TOKEN": self.token, "PYTHONPATH": str(ROOT)}
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentenv", "serve-envs", "--num", str(self.num), "--port", str(self.port),
             "--width", str(self.width), "--height", str(self.height)],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"env service exited with {self.proc.returncode} (log: {self.log})")
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("desktops") == self.num:
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"env service not ready after {timeout}s (log: {self.log})")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # graceful: it closes its desktops
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> "EnvService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
