"""Replay on real desktops: a built-in task's oracle trajectory replays identically with the same
reward; the same recording replayed against a changed task setup diverges at the right step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentenv.envs.client import AsyncEnvClient
from agentenv.envs.tasks import builtin_tasks
from agentenv.rollout.buffer import read_trajectories
from agentenv.view.replay import ReplayOptions, record_oracles, replay_run
from agentenv.view.report import build_report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TASK_IDS = ["editor-type-hello", "editor-append-line"]


@pytest.fixture(scope="module")
async def oracles(env_service, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracles")
    by_id = {t.id: t for t in builtin_tasks()}
    client = AsyncEnvClient(env_service.url, env_service.token)
    try:
        await record_oracles(out, client, [by_id[i] for i in TASK_IDS], desktops_n=2)
    finally:
        await client.aclose()
    return out


async def test_oracle_trajectories_replay_identically(oracles, env_service):
    recorded = {t.task_id: t for t in read_trajectories(oracles)}
    assert sorted(recorded) == sorted(TASK_IDS)
    for t in recorded.values():   # a run dir like any other: screenshots of every step and the end
        assert t.reward == 1.0 and t.status.value == "finished" and t.final_screenshot
        assert len(t.steps) == len(next(b for b in builtin_tasks() if b.id == t.task_id).oracle)
        assert all((oracles / s.screenshot).is_file() for s in t.steps)
    client = AsyncEnvClient(env_service.url, env_service.token)
    try:
        results = await replay_run(oracles, client, desktops_n=2)
    finally:
        await client.aclose()
    assert [(r.task_id, r.verdict) for r in results] == [(i, "identical") for i in sorted(TASK_IDS)], \
        [r.row() for r in results]
    for r in results:
        assert r.reward == r.recorded_reward == 1.0
        assert len(r.steps) == len(recorded[r.task_id].steps) + 1 and r.steps[-1].final
        assert all(s.distance <= r.threshold and (oracles / s.screenshot).is_file() for s in r.steps)
        assert r.screen == [1920, 1080]
    # a desktop created for the replay is gone again; the service's own desktops are untouched
    c = AsyncEnvClient(env_service.url, env_service.token)
    try:
        assert len(await c.list()) == 4
    finally:
        await c.aclose()


async def test_changed_task_setup_diverges_at_the_step_it_shows(oracles, env_service, tmp_path):
    """The file gets three trailing newlines: invisible before the first action (the caret is at
    the start either way), visible after ctrl+End (the caret goes three lines lower)."""
    task = next(t for t in builtin_tasks() if t.id == "editor-append-line")
    changed = task.to_dict()
    changed["config"][0]["parameters"]["command"] = 'printf "first line\\n\\n\\n" > ~/Documents/notes.txt'
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(changed))
    client = AsyncEnvClient(env_service.url, env_service.token)
    try:
        (r,) = await replay_run(oracles, client, task="editor-append-line", tasks_source=str(path),
                                options=ReplayOptions(settle_s=1.5))
    finally:
        await client.aclose()
    assert r.verdict == "diverged", r.row()
    first = r.first_divergence
    assert first.index == 1 and not first.final, r.row()
    assert not r.steps[0].diverged and r.steps[0].distance == 0.0
    assert r.reward == 0.0 and r.recorded_reward == 1.0
    # the differing region is where the text is: the top-left of the editor, not the whole screen
    x0, y0, x1, y1 = first.region
    assert x1 - x0 < 0.3 and y1 - y0 < 0.3 and y0 > 0.02
    # the viewer shows the replay next to the original
    build_report(oracles)
    page = next((oracles / "report" / "tasks").glob("editor-append-line-*.html")).read_text()
    assert "replay of sample 0" in page and "diverged" in page and "at step 1" in page


def test_replay_cli_on_a_recorded_run(oracles, env_service, tmp_path):
    token = tmp_path / "token"
    token.write_text(env_service.token)
    r = subprocess.run([sys.executable, "-m", "agentenv", "replay", str(oracles), "--task", "editor-type-hello",
                        "--sample", "0", "--env-url", env_service.url, "--env-token-file", str(token),
                        "--pace", "fast"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["replayed"] == 1 and out["verdicts"] == {"identical": 1}
    assert "editor-type-hello" in r.stderr and "identical" in r.stderr   # the determinism table
    assert env_service.token not in r.stdout + r.stderr
