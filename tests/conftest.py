"""Session fixtures: the real tiny model on vLLM and a real env service with 4 desktops.

Both are started once per test session on loopback ports of their own, and stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_PORT = int(os.environ.get("AGENTENV_TEST_VLLM_PORT", "18000"))
ENV_PORT = int(os.environ.get("AGENTENV_TEST_ENV_PORT", "18100"))


def wait_for(pred: Callable[[], object], timeout: float = 10.0, every: float = 0.2) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def vllm_server(run_dir):
    """The tiny UI-TARS-shaped model served by scripts/start_vllm_service.sh (with the
    tokens-in/tokens-out route that verl's server manager uses)."""
    from agentenv.services import VLLMService

    svc = VLLMService(port=VLLM_PORT, run_dir=run_dir, extra=["--tokens-api"]).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def env_service(run_dir):
    from agentenv.services import EnvService

    svc = EnvService(num=4, port=ENV_PORT, log=run_dir / "env-service.log").start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from agentenv.config import TINY_MODEL

    if not (TINY_MODEL / "agentenv_tiny.json").exists():
        subprocess.run(["python", str(ROOT / "scripts" / "make_tiny_model.py")], check=True)
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_pixels():
    from agentenv.config import tiny_model_pixels

    return tiny_model_pixels()


def pytest_collection_modifyitems(config, items):
    if not shutil.which("Xvfb"):
        raise pytest.UsageError("Xvfb is not installed: run scripts/install.sh first")


def shutdown_engine(engine) -> None:
    """End an in-process vllm.LLM's engine process now, not at interpreter exit (when logging is gone)."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
