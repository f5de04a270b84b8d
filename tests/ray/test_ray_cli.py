"""`agentenv run --ray local`: the main job on a Ray cluster of its own (loopback), its desktops an
env-service actor and its model server (the real tiny model on vLLM, with an API key it made) a
vLLM actor, both found by the run. Mid-run the vLLM server is killed (SIGKILL, by PID): Ray
restarts the actor, the new server (new port, new key) is taken in by the run's ServiceLLM, the
calls that had no server wait for it, and the run ends with every trajectory ended once, none of
them by the model service's failure; nothing of it is left after it exits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from agentenv.procs import descendants  # noqa: E402
from agentenv.rollout.buffer import read_trajectories  # noqa: E402
from agentenv.types import Status  # noqa: E402
from tests.osworld.test_streaming_task_sampling import CLICK_ONLY  # noqa: E402
from tests.ray.pids import all_loopback, idents, listening_addresses, wait_gone  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.starts_vllm]  # a vLLM actor of its own
ROOT = Path(__file__).resolve().parents[2]
TASKS = ["terminal-mkdir", "calc-add"]


def _vllm_server(pids: list[int], port: int) -> int | None:
    """The vLLM API server among ``pids``: the process started with ``--port PORT`` (the port of the
    URL the run logged)."""
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and b"--port" in argv \
                and argv[argv.index(b"--port") + 1] == str(port).encode():
            return pid
    return None


def test_agentenv_run_with_ray_local_survives_its_vllm_server_killed(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"  # clicks only: every trajectory runs its 4 steps, so the kill is mid-run
    config.write_text(yaml.safe_dump({"sampling": {"regex": CLICK_ONLY}}))
    cmd = [sys.executable, "-m", "agentenv", "run", "--ray", "local", "--config", str(config),
           "--set", "ray.vllm_actors=1", "--set", "ray.vllm_resources={}", "--set", "ray.watch_s=0.5",
           "--set", "env.local_desktops=2", "--set", "env.serve.width=1280", "--set", "env.serve.height=720",
           "--set", f"tasks.ids=[{', '.join(TASKS)}]", "--set", "loop.max_steps=4",
           "--set", f"output.dir={out}", "--set", "progress=false", "--set", "ray.local_cpus=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_SERVER_URL", "VLLM_MODEL_NAME", "ENV_SERVER_URL")}
    env["PYTHONPATH"] = str(ROOT)
    log_out, log_err = tmp_path / "stdout", tmp_path / "stderr"
    with log_out.open("w") as o, log_err.open("w") as e:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    seen: set[tuple[int, str]] = set()
    addresses: set[str] = set()
    killed: dict = {}
    deadline = time.monotonic() + 600
    try:
        while p.poll() is None and time.monotonic() < deadline:
            now = descendants(p.pid)
            seen |= idents(now)
            addresses |= listening_addresses(now)
            # mid-run: a trajectory has had its first reply and acted; its next call needs the server
            if not killed and any(out.glob("screenshots/*/*/a*-step-001.png")):
                m = re.search(r"ray: 1 vLLM servers: (http://127\.0\.0\.1:(\d+)/v1)", log_err.read_text())
                assert m, "the run did not log its vLLM actor's URL"
                pid = _vllm_server(now, int(m.group(2)))
                assert pid, f"no vLLM server on port {m.group(2)} among the run's processes"
                os.kill(pid, signal.SIGKILL)
                killed.update(url=m.group(1), pid=pid)
            time.sleep(0.5 if killed else 0.2)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stdout, stderr = log_out.read_text(), log_err.read_text()
    assert p.returncode == 0, stderr[-3000:]
    assert killed, "the run ended before a trajectory reached its second step"
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["trajectories"] == 4 and summary["groups"] == 2, summary
    # Ray restarted the vLLM actor; the run took its new server in, in place of the killed one
    ray = summary["ray"]
    assert (ray["env_services"], ray["lost"], ray["returned"]) == (1, 0, 0)
    assert (ray["vllm_actors"], ray["vllm_lost"], ray["vllm_returned"]) == (1, 1, 1), ray
    [swap] = ray["replaced"]
    assert swap["kind"] == "vllm" and swap["old_url"] == killed["url"] and swap["new_url"] != killed["url"]
    assert list(summary["llm_endpoints"]) == [swap["new_url"]]
    served_new = summary["llm_endpoints"][swap["new_url"]]["served"]
    assert 0 < served_new < summary["steps"]  # the run's calls went to the old server, then to the new one
    assert summary["env_pool"]["desktops"] == 2
    # every trajectory ended exactly once, none by the model service's failure
    trajs = read_trajectories(out)
    keys = [t.key for t in trajs]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted((i, s) for i in TASKS for s in range(2))
    for t in trajs:  # a policy outcome; or an app that did not open its window in 45 s on this loaded machine
        assert t.status in (Status.MAX_STEPS, Status.FINISHED, Status.CALL_USER, Status.INVALID) or (
            t.status == Status.TASK_ERROR and "no window appeared" in t.reason), (t.key, t.status, t.reason)
    # Ray's servers, the vLLM servers and the env service listened on loopback only
    assert all_loopback(addresses), addresses
    assert len(seen) >= 8, "the run started too few processes to have used Ray (raylet, workers, vLLM, service, X)"
    # the cluster, the actors, both vLLM servers, the env service and its X servers all ended with the run
    assert not wait_gone(seen, 30.0)
