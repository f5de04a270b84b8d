"""Start and stop the local services a run needs when none are given: the tiny model on vLLM
(through start_vllm_service.sh, shipped in the package) and an env service with N desktops.

Each is ended by the process group it was started in; nothing is looked up by name. Both are
tied to the life of the process that starts them (``spawn_tied``): if it dies, SIGKILL included,
they get SIGTERM and end too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from loguru import logger

from agentenv import procs
from agentenv.config import AGENTENV_HOME, EnvServiceConfig
from agentenv.procs import spawn_tied

ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the package (repo or site-packages)
START_VLLM = Path(__file__).resolve().parent / "start_vllm_service.sh"  # package data: no scripts/ folder needed


def private_log(path: Path) -> int:
    """A log file only its owner can read (a log may hold what a secret-bearing process printed):
    an fd to append to, mode 600 even if the file existed with another mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """End a child started in a session of its own, and everything in its process group:
    SIGTERM, ``grace`` seconds, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (engine processes, stragglers)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _vllm_env() -> dict[str, str]:
    """The script's environment: vLLM from this Python when it has it (an installed agentenv), else
    the script's default ($AGENTENV_HOME/venv)."""
    import importlib.util

    env = dict(os.environ)
    if "AGENTENV_PYTHON" not in env and importlib.util.find_spec("vllm") is not None:
        env["AGENTENV_PYTHON"] = sys.executable
    return env


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class PortTakenError(RuntimeError):
    """The port a service was to listen on is already taken (by a server of someone else's)."""


def ensure_port_free(host: str, port: int, what: str, hint: str) -> None:
    """Refuse to start ``what`` on a port another process listens on: its readiness check would be
    answered by that process, and the run would talk to a service that is not ours."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
    try:
        s.bind((host, port))
    except OSError as e:
        raise PortTakenError(f"cannot start {what} on {host}:{port}: the port is already taken ({e.strerror}); "
                             f"{hint}") from None
    finally:
        s.close()


class VLLMService:
    """A vLLM server through start_vllm_service.sh (by default the tiny UI-TARS model on loopback);
    a context manager. ``extra``: the script's options (``--model``, ``--tokens-api``...); ``host``
    other than loopback (a Ray node's address) wants an ``api_key`` (given in the environment)."""

    def __init__(self, port: int = 8000, extra: list[str] | None = None, run_dir: Path | None = None,
                 host: str = "127.0.0.1", model: str = "tiny-uitars", api_key: str | None = None):
        self.port, self.host, self.api_key = port, host, api_key
        self.extra = extra or []
        self.run_dir = run_dir or AGENTENV_HOME / "run"
        self.url = f"http://{host}:{port}/v1"
        self.model = model
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 420.0) -> "VLLMService":
        pidfile = self.run_dir / f"vllm-{self.port}.pid"
        health = f"http://{self.host}:{self.port}/health"
        if pidfile.exists() and _healthy(health):
            # Started earlier by start_vllm_service.sh (by the user): use it, and leave it running.
            logger.info("using the vLLM server already running on port {}", self.port)
            self.owned = False
            return self
        if _healthy(health):
            raise RuntimeError(f"port {self.port} already serves a model server we did not start: use it "
                               f"(llm.url={self.url}) or choose another llm.port")
        ensure_port_free(self.host, self.port, "the vLLM server", "choose another llm.port, or give a running "
                         "server as llm.url (VLLM_SERVER_URL)")
        self.owned = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.run_dir / f"vllm-{self.port}.log"
        # In the foreground, as our child, tied to our life: whatever ends us (SIGKILL included)
        # ends the server too. Its own session: stop() ends its whole process group.
        # Through the guard: a signal while the server starts must not orphan its engine process.
        cmd = [sys.executable, "-I", str(Path(procs.__file__)), "--grace", "20", "--",
               "bash", str(START_VLLM), "--foreground", "--host", self.host, "--port", str(self.port),
               "--run-dir", str(self.run_dir), *self.extra]
        env = _vllm_env()
        if self.api_key:  # in the environment, never on the command line
            env["VLLM_API_KEY"] = self.api_key
        logger.info("starting the tiny model on vLLM (about a minute on a CPU; log: {})", self.log)
        out = private_log(self.log)
        try:
            self.proc = spawn_tied(cmd, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        finally:
            os.close(out)
        deadline = time.monotonic() + timeout
        try:
            while not _healthy(health):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the vLLM server exited with {self.proc.returncode} during start-up; "
                                       f"last lines of {self.log}:\n{_tail(self.log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server was not healthy after {timeout:.0f}s; "
                                       f"last lines of {self.log}:\n{_tail(self.log)}")
                time.sleep(0.5)
        except BaseException:  # a failed start, or a signal while starting: leave nothing behind
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if not getattr(self, "owned", True) or self.proc is None:
            return
        stop_group(self.proc, grace=60.0)

    def __enter__(self) -> "VLLMService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EnvService:
    """``agentenv serve-envs`` as a child process (on loopback unless ``host`` says otherwise: a Ray
    node serves its desktops on its own address), with ``settings`` given whole (as JSON); a
    context manager."""

    def __init__(self, num: int = 4, port: int = 8100, settings: EnvServiceConfig | None = None,
                 token: str | None = None, log: Path | None = None, osworld_port: int | None = None,
                 host: str = "127.0.0.1"):
        self.num, self.port, self.host, self.osworld_port = num, port, host, osworld_port
        self.settings = settings or EnvServiceConfig()
        self.token = token or secrets.token_urlsafe(16)
        self.url = f"http://{host}:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "EnvService":
        ensure_port_free(self.host, self.port, "an env service", "to use a service already running there, set "
                         "ENV_SERVER_URL and ENV_TOKEN (or env.services); else choose another env.local_port")
        # The token goes in the environment (readable by root only), never on the command line.
        env = {**os.environ, "ENV_TOKEN": self.token, "PYTHONPATH": str(ROOT)}
        out = private_log(self.log) if self.log else subprocess.DEVNULL
        try:
            self.proc = spawn_tied(
                [sys.executable, "-m", "agentenv", "serve-envs", "--num", str(self.num), "--host", self.host,
                 "--port", str(self.port), "--settings", self.settings.model_dump_json(),
                 *(["--osworld-port", str(self.osworld_port)] if self.osworld_port else [])],
                env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if self.log:
                os.close(out)
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
        if self.proc is not None:
            stop_group(self.proc, grace=30.0)  # SIGTERM first: it closes its desktops

    def __enter__(self) -> "EnvService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
