"""Pure logic of the viewer and replay: markers, summaries, timelines, the perceptual distance,
replay records. Data here is made up (unit tests of pure functions); the real-run tests are in
tests/view/."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agentenv.types import Status, Step, Trajectory
from agentenv.view import model
from agentenv.view.compare import THRESHOLD, compare
from agentenv.view.runinfo import load_run_info, load_tasks, public_config, write_run_info


def test_markers_and_summaries_for_every_action_kind():
    assert model.action_markers({"type": "click", "x": 10.5, "y": 20}) == [model.Marker("point", 10.5, 20.0, label="click")]
    (d,) = model.action_markers({"type": "drag", "x": 1, "y": 2, "x2": 3, "y2": 4})
    assert (d.kind, d.x, d.y, d.x2, d.y2) == ("drag", 1, 2, 3, 4)
    assert [m.kind for m in model.action_markers({"type": "type", "text": "hi\nthere"})] == ["text"]
    assert model.action_markers({"type": "type", "text": "hi\nthere"})[0].label == "hi\\nthere"
    assert model.action_markers({"type": "hotkey", "keys": ["ctrl", "s"]})[0].label == "ctrl+s"
    seq = {"type": "sequence", "actions": [{"type": "click", "x": 1, "y": 1}, {"type": "key", "keys": ["Return"]}]}
    assert [m.kind for m in model.action_markers(seq)] == ["point", "keys"]
    assert model.action_summary(seq) == "click (1, 1); key Return"
    assert model.action_summary({"type": "drag", "x": 1, "y": 2, "x2": 30, "y2": 40}) == "drag (1, 2) → (30, 40)"
    assert model.action_summary({"type": "scroll", "x": 5, "y": 6, "direction": "down"}) == "scroll down (5, 6)"
    assert model.action_summary(None) == "(no action)"
    assert model.action_markers({"type": "click"}) == []          # no coordinates: nothing to draw
    assert model.action_markers({"type": "click", "x": True, "y": 1}) == []


def test_slugs_are_distinct_file_names_and_epochs_map_to_their_task():
    a, b = model.slug("a/b"), model.slug("a_b")
    assert a != b and "/" not in a and a.startswith("a_b-")
    assert model.base_task_id("calc-add@e3") == "calc-add" and model.base_task_id("x@ey") == "x@ey"


def test_screen_size_by_desktop_then_service_then_default():
    screens = {"http://h:1/envs/d1": [800, 600], "http://h:1": [1024, 768]}
    assert model.screen_of("http://h:1/envs/d1", screens) == (800, 600)
    assert model.screen_of("http://h:1/envs/d9", screens) == (1024, 768)
    assert model.screen_of("http://other/envs/d1", screens, (1920, 1080)) == (1920, 1080)


def _traj(task: str, sample: int, start: float, lat: list[float], status=Status.FINISHED, reward=1.0, env="e1"):
    t = Trajectory(task_id=task, sample=sample, status=status, reward=reward, env_id=env, started_at=start,
                   ended_at=start + sum(lat) + 1.0)
    t.steps = [Step(index=i, llm_latency_s=x * 0.75, env_latency_s=x * 0.25) for i, x in enumerate(lat)]
    return t


def test_step_times_use_screenshot_times_when_they_fit_else_latencies():
    t = _traj("a", 0, 100.0, [1.0, 2.0])           # ends at 104
    assert model.step_times(t, [100.5, 101.7, 103.9]) == [101.7, 103.9]
    assert model.step_times(t, [100.5, 50.0, 103.9]) == pytest.approx([101.5, 103.5])  # a copied file: estimate
    assert model.step_times(t) == pytest.approx([101.5, 103.5])   # 1 s unaccounted, half before
    squeezed = _traj("a", 1, 100.0, [4.0, 4.0])
    squeezed.ended_at = 104.0                      # latencies add up to more than the span
    assert model.step_times(squeezed) == pytest.approx([102.0, 104.0])


def test_throughput_and_busy_series():
    trajs = [_traj("a", 0, 0.0 + 1, [1.0] * 10, env="e1"), _traj("a", 1, 1.0, [1.0] * 10, env="e2"),
             _traj("b", 0, 12.0, [1.0] * 5, env="e1")]
    xs, ys = model.throughput(trajs, bins=6)
    width = (18.0 - 1.0) / 6
    assert sum(y * width for y in ys) == pytest.approx(25)   # every step counted once
    bx, by = model.busy_series(trajs)
    assert bx[0] == 0.0 and by[0] == 2 and max(by) == 2 and by[-1] == 0
    assert model.busy_at(bx, by, 5.0) == 2 and model.busy_at(bx, by, 11.5) == 1 and model.busy_at(bx, by, 17.5) == 0
    lanes, t0 = model.lanes(trajs)
    assert t0 == 1.0 and [lane.env_id for lane in lanes] == ["e1", "e2"] and len(lanes[0].spans) == 2
    assert 0 < model.mean_busy(bx, by) <= 2


def test_overview_rows_and_failures():
    trajs = [_traj("a", 0, 0, [1, 1]), _traj("a", 1, 0, [1], Status.INVALID, 0.0),
             _traj("b", 0, 0, [1, 1, 1], Status.MAX_STEPS, 0.0), _traj("b", 1, 0, [], Status.ENV_ERROR, 0.0)]
    ov = model.overview(trajs)
    assert ov["trajectories"] == 4 and ov["tasks"] == 2 and ov["steps"] == 6
    assert ov["success_rate"] == 0.25 and ov["statuses"]["finished"] == 1 and ov["infrastructure"] == 1
    rows = {r.task_id: r for r in model.task_rows(trajs)}
    assert rows["a"].success == 0.5 and rows["a"].rewards == [1.0, 0.0] and rows["b"].mean_steps == 1.5
    assert {(t.task_id, t.sample) for t in model.failures(trajs)} == {("a", 1), ("b", 1)}


def test_replay_record_round_trip_verdicts_and_table():
    r = model.ReplayResult("t", 0, THRESHOLD, "recorded", 1.0, "finished", reward=1.0,
                           steps=[model.ReplayStep(0), model.ReplayStep(1, distance=0.9, diverged=True,
                                                                       region=[0.1, 0.1, 0.2, 0.2]),
                                  model.ReplayStep(2, final=True, distance=0.5, diverged=True)])
    back = model.ReplayResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.verdict == "diverged" and back.where() == "step 1"
    assert back.row()["first_divergence"] == "step 1" and back.row()["steps"] == 2
    same = model.ReplayResult("u", 1, THRESHOLD, "fast", 1.0, "finished", reward=0.0, steps=[model.ReplayStep(0)])
    assert same.verdict == "reward differs"
    assert model.ReplayResult("v", 0, THRESHOLD, "fast", 0.0, "max_steps", error="setup failed").verdict == "error"
    table = model.determinism_table([r, same])
    assert "step 1" in table and "reward differs" in table and table.count("\n") == 3


def _screen(seed: int = 0) -> np.ndarray:
    img = np.full((200, 320), 245.0)
    img[:12, :] = 90.0                                            # a title bar
    rng = np.random.default_rng(seed)
    for k in range(6):                                            # text-like marks
        y = 30 + 20 * k
        img[y:y + 7, 10:10 + int(rng.integers(60, 280))] = 30.0
    return img


def test_distance_is_zero_for_identical_screens_small_for_noise_and_large_for_a_change():
    a = _screen()
    assert compare(a, a.copy()).distance == 0.0 and compare(a, a.copy()).region is None
    noisy = np.clip(a + np.random.default_rng(1).integers(-2, 3, a.shape), 0, 255)
    assert compare(a, noisy).distance < THRESHOLD / 2
    changed = a.copy()
    changed[150:160, 200:230] = 30.0                              # a new word, lower right
    c = compare(a, changed)
    assert c.distance > THRESHOLD
    x0, y0, x1, y1 = c.region
    assert 0.55 < x0 < x1 < 0.8 and 0.65 < y0 < y1 < 0.9          # around the change
    with pytest.raises(ValueError):
        compare(a, a[:100])


def test_run_info_round_trip_without_tokens(tmp_path):
    from agentenv.config import load_config
    from agentenv.types import Task

    cfg = load_config(overrides=["env.services=[{url: 'http://h:1', token: 'SECRET'}]"])
    assert "SECRET" not in json.dumps(public_config(cfg))
    t = Task.from_dict({"id": "x", "instruction": "do", "snapshot": "s", "config": []})
    write_run_info(tmp_path, screens={"http://h:1/envs/a": [800, 600], "http://h:1/envs/b": [800, 600],
                                      "http://g:2/envs/c": [1920, 1080]}, config=public_config(cfg), tasks=[t])
    info = load_run_info(tmp_path)
    assert info.known and info.screen == [800, 600] and info.config["env"]["services"][0]["url"] == "http://h:1"
    assert load_tasks(tmp_path)["x"].extra == {"snapshot": "s"}  # extra keys back where they were
    write_run_info(tmp_path, screens={}, tasks=[Task(id="y", instruction="more")])   # a resumed run adds tasks
    assert sorted(load_tasks(tmp_path)) == ["x", "y"]
    assert not load_run_info(tmp_path / "nothing").known
