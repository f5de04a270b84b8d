"""`agentenv run --ray local`: the main job on a Ray cluster of its own (loopback), its desktops an
env-service actor and its model server (the real tiny model on vLLM, with an API key it made) a
vLLM actor, both found by the run; nothing of it left after it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from agentenv.procs import descendants  # noqa: E402
from tests.ray.pids import all_loopback, idents, listening_addresses, wait_gone  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_agentenv_run_with_ray_local(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "agentenv", "run", "--ray", "local",
           "--set", "ray.vllm_actors=1", "--set", "ray.vllm_resources={}",
           "--set", "env.local_desktops=2", "--set", "env.width=1280", "--set", "env.height=720",
           "--set", "tasks.ids=[terminal-mkdir, calc-add]", "--set", "loop.max_steps=2",
           "--set", f"output.dir={out}", "--set", "progress=false", "--set", "ray.local_cpus=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_SERVER_URL", "VLLM_MODEL_NAME", "ENV_SERVER_URL")}
    env["PYTHONPATH"] = str(ROOT)
    log_out, log_err = tmp_path / "stdout", tmp_path / "stderr"
    with log_out.open("w") as o, log_err.open("w") as e:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    seen: set[tuple[int, str]] = set()
    addresses: set[str] = set()
    deadline = time.monotonic() + 600
    try:
        while p.poll() is None and time.monotonic() < deadline:
            now = descendants(p.pid)
            seen |= idents(now)
            addresses |= listening_addresses(now)
            time.sleep(1.0)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stdout, stderr = log_out.read_text(), log_err.read_text()
    assert p.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["trajectories"] == 4 and summary["groups"] == 2, summary
    assert summary["ray"] == {"env_services": 1, "lost": 0, "returned": 0, "vllm_actors": 1}
    assert summary["env_pool"]["desktops"] == 2
    # Ray's servers, the vLLM server and the env service listened on loopback only
    assert all_loopback(addresses), addresses
    assert len(seen) >= 8, "the run started too few processes to have used Ray (raylet, workers, vLLM, service, X)"
    # the cluster, the actors, the vLLM server, the env service and its X servers all ended with the run
    assert not wait_gone(seen, 30.0)
