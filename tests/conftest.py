"""Session fixtures: the real tiny model on vLLM and a real env service with 4 desktops.

Both are started once per test session on loopback ports of their own, and stopped by PID.
The vLLM server takes a minute or more to start: when a collected test needs it, it starts in the background
as the first test starts, and the modules that need no vLLM server run first (each module's tests
stay together and in their order), so its start overlaps them.

Side by side (``AGENTENV_TEST_WORKERS=2 scripts/test.sh``: pytest-xdist): each module goes whole to
one worker (``pytest_xdist_make_scheduler``). Worker gw0 takes the modules that use the session's
vLLM server (the Ray modules among them: one Ray cluster at a time) and starts that server as its
first test starts; the other worker takes the modules that need none, and stops when they are
done. So one vLLM server serves the whole run, as in one process, and no other test's model calls
share it or see it killed. Each worker has ports of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
# a pytest-xdist worker ("gw1") takes the ports 50 above the previous one's
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
VLLM_PORT = int(os.environ.get("AGENTENV_TEST_VLLM_PORT", "18000")) + 50 * WORKER
ENV_PORT = int(os.environ.get("AGENTENV_TEST_ENV_PORT", "18100")) + 50 * WORKER
# Side by side: the folder where the workers tell the scheduler which modules use the session's vLLM server
PLAN = "AGENTENV_TEST_PLAN"


@contextlib.contextmanager
def started_desktop(name: str, **spec: Any) -> Iterator[Any]:
    """A real desktop of ``DesktopSpec(**spec)``, closed at the end (a module's shared desktop)."""
    from agentenv.envs.desktop import make_desktop
    from agentenv.envs.desktop_types import DesktopSpec

    d = make_desktop(f"{name}-{os.getpid()}", DesktopSpec(**spec)).start()
    try:
        yield d
    finally:
        d.close()


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


VLLM_USERS = pytest.StashKey[bool]()


class EarlyStart:
    """``svc.start()`` in a thread of its own; ``result()`` waits for it and raises what it raised."""

    def __init__(self, svc):
        self.svc, self.error = svc, None
        self.thread = threading.Thread(target=self._run, name=f"start-{type(svc).__name__}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.svc.start()
        except BaseException as e:  # noqa: BLE001 - handed to the test that waits for it
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.svc

    def stop(self) -> None:
        """Stop it, even mid-start: the starting thread then sees its process gone and ends."""
        while self.thread.is_alive():
            if self.svc.proc is not None:
                self.svc.stop()
            self.thread.join(0.5)
        self.svc.stop()


@pytest.fixture(scope="session", autouse=True)
def early_vllm(request, run_dir):
    """The session's vLLM server, starting in the background from the first test on when a
    collected test uses ``vllm_server``."""
    from agentenv.services import VLLMService

    if not request.config.stash.get(VLLM_USERS, False) or WORKER != 0:  # side by side: gw0's only
        yield None
        return
    early = EarlyStart(VLLMService(port=VLLM_PORT, run_dir=run_dir, extra=["--tokens-api"]))
    yield early
    early.stop()


@pytest.fixture(scope="session")
def vllm_server(early_vllm, run_dir):
    """The tiny UI-TARS-shaped model served by scripts/start_vllm_service.sh (with the
    tokens-in/tokens-out route that verl's server manager uses)."""
    from agentenv.services import VLLMService

    svc = early_vllm.result() if early_vllm else VLLMService(port=VLLM_PORT, run_dir=run_dir,
                                                             extra=["--tokens-api"]).start()
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


def cpu_engine_env() -> None:
    """The settings agentenv/start_vllm_service.sh gives a CPU server (why: there), for an engine
    made in this process: no AOT cache, one worker inside the engine, a small KV cache."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def in_process_engine(tiny_model_path, tiny_pixels):
    """One ``vllm.LLM`` of the tiny model in this process, shared by every test that needs one: an
    engine's start costs 1-3 minutes on this machine. Tests must not change its state."""
    cpu_engine_env()
    from vllm import LLM

    engine = LLM(model=str(tiny_model_path), max_model_len=8192, limit_mm_per_prompt={"image": 5, "video": 0},
                 mm_processor_kwargs={"min_pixels": tiny_pixels[0], "max_pixels": tiny_pixels[1]},
                 enable_prefix_caching=True)
    yield engine
    shutdown_engine(engine)


# Seconds the longest modules took (2026-12-07): side by side, a worker that takes one of them last
# would run it alone at the end, so they are handed out first. Only the order depends on it.
LONGEST = {"tests/faults/test_fault_suite.py": 455, "tests/ray": 370, "tests/osworld/test_streaming_task_sampling.py": 214,
           "tests/osworld/test_weight_updates.py": 209, "tests/faults/test_rollout_faults.py": 167,
           "tests/osworld/test_llm.py": 115}


def needs_vllm(item) -> int:
    """0: no vLLM server; 1: the session's; 2: servers of its own as well (run once the
    session's is up, not beside its start)."""
    if item.get_closest_marker("starts_vllm"):
        return 2
    return int("vllm_server" in item.fixturenames)


def _scope(nodeid: str) -> str:
    """The unit one worker runs whole: a module, or all of tests/ray (one Ray cluster at a time)."""
    path = nodeid.split("::", 1)[0]
    return "tests/ray" if path.startswith("tests/ray/") else path


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        import tempfile

        os.environ[PLAN] = tempfile.mkdtemp(prefix="agentenv-test-plan-")


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.get(PLAN):
        shutil.rmtree(os.environ.pop(PLAN), ignore_errors=True)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Side by side: each scope whole on one worker; gw0 takes the scopes that use the session's
    vLLM server, the others those that need none and stop when none is left (the plan: written by
    the workers as they collect, read when scheduling starts)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        plan: dict[str, int] | None = None

        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

        def _pick(self, node) -> str | None:
            if self.plan is None:
                self.plan = {}  # every worker collected the same: any one's plan will do
                for f in Path(os.environ.get(PLAN, "/nonexistent")).glob("plan-*.json"):
                    self.plan.update(json.loads(f.read_text()))
            # gw0: the session server's users, then servers of their own, then the rest;
            # the others: no server, then servers of their own, then they stop
            wants = (1, 2, 0) if node.gateway.id == "gw0" else (0, 2)
            for rank in wants:
                for scope in self.workqueue:
                    if self.plan.get(scope, 1) == rank:
                        return scope
            return None

        def _assign_work_unit(self, node) -> None:
            scope = self._pick(node)
            if scope is None:  # nothing left for this worker: it ends once its tests are done
                if not node.shutting_down:
                    node.shutdown()
                return
            self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return ByModule(config, log)


@pytest.hookimpl(trylast=True)  # after -k/-m have deselected
def pytest_collection_modifyitems(config, items):
    if not shutil.which("Xvfb"):
        raise pytest.UsageError("Xvfb is not installed: run scripts/install.sh first")
    modules: dict[Path, list] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    rank = {path: max(needs_vllm(i) for i in its) for path, its in modules.items()}
    def side_by_side(path: Path) -> tuple:  # the modules with no vLLM server first, then the longest
        name = "tests/ray" if path.parent.name == "ray" else str(path.relative_to(ROOT))
        return rank[path] > 0, -LONGEST.get(name, 0)

    order = side_by_side if hasattr(config, "workerinput") else rank.__getitem__
    items[:] = [i for path in sorted(modules, key=order) for i in modules[path]]  # stable
    config.stash[VLLM_USERS] = any("vllm_server" in i.fixturenames for i in items)
    if hasattr(config, "workerinput") and os.environ.get(PLAN):  # for the scheduler: see above
        from agentenv.atomic import write_atomic

        plan: dict[str, int] = {}  # 1: uses the session's server; 2: servers of its own only; 0: none
        for i in items:
            rank = 1 if "vllm_server" in i.fixturenames else 2 * (needs_vllm(i) > 0)
            k = _scope(i.nodeid)
            plan[k] = max(plan.get(k, 0), rank, key=(0, 2, 1).index)  # a scope is its strongest need
        write_atomic(Path(os.environ[PLAN]) / f"plan-{os.environ['PYTEST_XDIST_WORKER']}.json", json.dumps(plan).encode())


def shutdown_engine(engine) -> None:
    """End an in-process vllm.LLM's engine process now, not at interpreter exit (when logging is gone)."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
