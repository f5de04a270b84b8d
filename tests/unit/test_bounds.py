"""Pure logic of issue 16: run directories and resuming, task-source checks, buffer and action
bounds. Real files in a temporary folder; no services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentenv.config import OutputConfig, TaskConfig
from agentenv.envs.actions import ActionError, check_action, parse_pyautogui
from agentenv.preflight import PreflightError, check_output, check_tasks, prepare_run_dir
from agentenv.rollout.buffer import TrajectoryBuffer
from agentenv.types import Action, Status, Task, Trajectory


def test_each_run_gets_a_new_directory_and_latest_points_at_it(tmp_path):
    out = OutputConfig(root=str(tmp_path / "runs"))
    first = prepare_run_dir(out, now=0)
    second = prepare_run_dir(out, now=0)  # the same second: a suffix, not the same folder
    assert first != second and first.is_dir() and second.is_dir()
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == second.resolve()
    resumed = prepare_run_dir(out.model_copy(update={"resume": "latest"}))
    assert resumed == second.resolve()
    with pytest.raises(PreflightError, match="is not a run directory"):
        check_output(out.model_copy(update={"resume": str(tmp_path / "nope")}))


def test_an_explicit_directory_with_trajectories_is_only_continued_on_purpose(tmp_path):
    d = tmp_path / "mine"
    buf = TrajectoryBuffer(d, 1)
    buf.add(Trajectory("t", 0, status=Status.FINISHED, reason="done"))
    with pytest.raises(PreflightError, match="--resume"):
        prepare_run_dir(OutputConfig(dir=str(d)))
    assert prepare_run_dir(OutputConfig(dir=str(d), resume=str(d))) == d.resolve()
    assert prepare_run_dir(OutputConfig(dir=str(tmp_path / "fresh"))).is_dir()


def test_a_task_source_is_checked_before_anything_starts(tmp_path):
    good = {"id": "a", "instruction": "do"}
    (tmp_path / "dup").mkdir()
    for name in ("x.json", "y.json"):
        (tmp_path / "dup" / name).write_text(json.dumps(good))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(PreflightError, match="does not exist"):
        check_tasks(TaskConfig(source=str(tmp_path / "missing.json")))
    # a duplicate id is renamed, deterministically (an id names one group of trajectories on disk)
    assert [i.id for i in check_tasks(TaskConfig(source=str(tmp_path / "dup")))] == ["a", "a~2"]
    with pytest.raises(PreflightError, match="every task"):
        check_tasks(TaskConfig(source=str(tmp_path / "broken.json")))
    with pytest.raises(PreflightError, match="does not have"):
        check_tasks(TaskConfig(source="builtin", ids=["nope"]))
    items = check_tasks(TaskConfig(source=str(tmp_path / "ok.jsonl")))  # one good, one broken line: runs
    assert [type(i).__name__ for i in items] == ["Task", "BrokenTask"]
    assert "RecursionError" in items[1].reason


def test_task_fields_of_the_wrong_kind_are_refused_with_the_field():
    for field, value in (("config", 5), ("evaluator", [1]), ("oracle", "x"), ("related_apps", {})):
        with pytest.raises(ValueError, match=field):
            Task.from_dict({"id": "a", "instruction": "b", field: value})


def test_screenshots_per_trajectory_and_groups_held_are_bounded(tmp_path):
    buf = TrajectoryBuffer(tmp_path, 1, max_screenshots=3, max_ready=2)
    t = Trajectory("t", 0)
    saved = [buf.screenshot_path(t, f"s{i}", b"\x89PNG") for i in range(5)]
    assert saved[:3] == [f"screenshots/t/0/a1-s{i}.png" for i in range(3)] and saved[3:] == ["", ""]
    assert buf.screenshots_skipped == 2 and len(list((tmp_path / "screenshots").rglob("*.png"))) == 3
    t.attempts = 2  # a rerun gets its own allowance
    assert buf.screenshot_path(t, "s0", b"\x89PNG") == "screenshots/t/0/a2-s0.png"
    t.status, t.reason = Status.FINISHED, "done"
    buf.add(t)  # a finished trajectory's counters are let go
    for i in range(5):
        buf.add(Trajectory(f"t{i}", 0, status=Status.FINISHED, reason="done", reward=float(i % 2)))
    assert buf.ready.qsize() == 2 and buf.released_unread == 4  # the oldest were let go (they are on disk)
    assert [g.task_id for g in buf.drain()] == ["t3", "t4"]
    assert buf.reward_sum == 2.0 and buf.successes == 2 and not buf._shots


def test_a_write_that_fails_leaves_nothing_half_written(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    buf = TrajectoryBuffer(tmp_path, 1)

    def full(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OSError):
        buf.add(Trajectory("t", 0, status=Status.FINISHED, reason="done"))
    assert not list(tmp_path.rglob("*.tmp")) and not list((tmp_path / "parts").iterdir())
    assert buf.done_keys() == set()  # not done: a rerun writes it


def test_action_bounds():
    check_action(Action("type", text="a" * 10_000))
    for bad in (Action("type", text="a" * 10_001), Action("hotkey", keys=["a"] * 17), Action("click", x=float("nan"), y=1),
                Action("click", x="1", y=1), Action("scroll", direction="up", amount=10**6), Action("wait", seconds=1e12)):
        with pytest.raises(ActionError):
            check_action(bad)
    for code, why in (("pyautogui.press('a', presses=101)", "presses"), ("pyautogui.click(1, 1, clicks=4)", "clicks"),
                      ("pyautogui.press('a', presses=1e400)", "OverflowError"),
                      ("pyautogui.typewrite(['a'] * 3)", "not a literal"),
                      ("pyautogui.typewrite(" + repr(["a"] * 201) + ")", "more than 200"),
                      ("(" * 100_001, "not a string of at most"), ("(" * 5000, "nested"), ("pyautogui.click('1', 2)", "finite number")):
        with pytest.raises(ActionError, match=why):
            parse_pyautogui(code)
    assert len(parse_pyautogui("pyautogui.press('a', presses=100)")) == 100
