"""`agentenv run --ray local`: the main job with its desktops as env-service actors on a Ray cluster
of its own (loopback), the real tiny model; nothing of it left after it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from agentenv.procs import descendants  # noqa: E402
from tests.ray.pids import idents, wait_gone  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_agentenv_run_with_ray_local(vllm_server, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "agentenv", "run", "--ray", "local",
           "--set", f"llm.url={vllm_server.url}", "--set", f"llm.model={vllm_server.model}",
           "--set", "env.local_desktops=2", "--set", "env.width=1280", "--set", "env.height=720",
           "--set", "tasks.ids=[terminal-mkdir, calc-add]", "--set", "loop.max_steps=2",
           "--set", f"output.dir={out}", "--set", "progress=false", "--set", "ray.local_cpus=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[int, str]] = set()
    try:
        while p.poll() is None:
            seen |= idents(descendants(p.pid))
            try:
                p.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["trajectories"] == 4 and summary["groups"] == 2, summary
    assert summary["ray"] == {"env_services": 1, "lost": 0, "returned": 0}
    assert summary["env_pool"]["desktops"] == 2
    assert len(seen) >= 5, "the run started too few processes to have used Ray (raylet, worker, service, X)"
    # the cluster, the actor, the env service and its X servers all ended with the run
    assert not wait_gone(seen, 30.0)
