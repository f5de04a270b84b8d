"""``agentenv tasks smoke``: our sample tasks (OSWorld's format) set up on real sandboxed desktops side by
side, the first screenshot taken and each scored as a no-op."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def _agentenv(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentenv", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_smoke_sets_up_every_runnable_sample_and_scores_the_no_op_zero(samples, agentenv_home, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fetched = _agentenv("tasks", "fetch", str(samples), env=env, timeout=120)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    out = tmp_path / "smoke.json"
    # two domains keep it short: the apps' own tests cover the rest of the samples
    r = _agentenv("tasks", "smoke", str(samples), "--domain", "os", "--domain", "libreoffice_calc", "--desktops", "2",
                  "--width", "1024", "--height", "768", "--json-out", str(out), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    per_task = json.loads(out.read_text())
    # the samples of those domains: 3 os (one infeasible) and Calc's, which runs after the fetch
    assert s["tasks"] == len(per_task) == 4, r.stderr[-3000:]
    assert s["setup_ok"] == 4, [t for t in per_task if not t["setup_ok"]]
    assert s["noop_zero"] == 4 and s["noop_nonzero"] == [], per_task
    assert set(s["domains"]) == {"os", "libreoffice_calc"}
    assert s["blank_first_screenshots"] == 0, per_task  # the reset waits for a painted screen
    assert s["blank_first_screenshots"] == sum(t["blank"] for t in per_task)
    assert s["unsettled_first_screenshots"] == sum(t["unsettled"] for t in per_task)
    times = sorted(t["reset_to_screenshot_s"] for t in per_task)
    assert 0 < times[0] and s["reset_to_screenshot_p50_s"] in times
    assert "reset to first screenshot" in r.stderr and "OSWorld's harness" in r.stderr


def test_smoke_with_nothing_runnable_is_a_clear_error(tmp_path):
    (tmp_path / "os").mkdir()
    (tmp_path / "os" / "t.json").write_text(json.dumps({
        "id": "needs-an-app", "instruction": "x", "config": [{"type": "launch", "parameters": {
            "command": ["no-such-app-here"]}}], "evaluator": {"func": "infeasible"}}))
    r = _agentenv("tasks", "smoke", str(tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2 and "no task" in r.stderr and "tasks check" in r.stderr
