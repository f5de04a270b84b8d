"""Pure logic: pyautogui allow-list, config loading, task loading, the buffer on real parquet."""

from __future__ import annotations

import asyncio
import json

import pyarrow.parquet as pq
import pytest

from agentenv.config import load_config
from agentenv.envs.actions import ActionError, parse_pyautogui
from agentenv.envs.tasks import TaskLoadError, builtin_tasks, load_task_file
from agentenv.envs.tasks.evaluate import EvaluatorError, read_ods_cells, validate_evaluator
from agentenv.rollout.buffer import TrajectoryBuffer, read_trajectories
from agentenv.rollout.sources import BrokenTask, TaskSource, load_items
from agentenv.types import Action, Status, Step, Task, Trajectory


def test_pyautogui_allowed_calls_translate():
    acts = parse_pyautogui("import pyautogui\nimport time\npyautogui.FAILSAFE = False\n"
                           "pyautogui.click(10, 20)\npyautogui.doubleClick(x=5, y=6)\n"
                           "pyautogui.click(1, 2, button='right')\npyautogui.moveTo(100, 100)\n"
                           "pyautogui.dragTo(200, 300)\npyautogui.scroll(-3)\npyautogui.hscroll(2)\n"
                           "pyautogui.typewrite('hi')\npyautogui.hotkey('ctrl', 'c')\npyautogui.press('enter')\n"
                           "time.sleep(0.5)")
    kinds = [a.type for a in acts]
    assert kinds == ["click", "double_click", "right_click", "move", "drag", "scroll", "scroll", "type",
                     "hotkey", "key", "wait"]
    assert (acts[4].x, acts[4].y, acts[4].x2, acts[4].y2) == (100, 100, 200, 300)
    assert acts[5].direction == "down" and acts[5].amount == 3
    assert acts[6].direction == "right"


@pytest.mark.parametrize("code", [
    "import os", "import pyautogui as p", "from os import system", "__import__('os')",
    "pyautogui.os.system('x')", "eval('1')", "exec('1')", "pyautogui.click(x=__import__('os'))",
    "x = 1", "pyautogui.click(*[1, 2])", "pyautogui.click(**{'x': 1})", "for i in range(3): pyautogui.click()",
    "pyautogui.screenshot('/tmp/x.png')", "time.time()", "pyautogui.click(1, 2).__class__",
    "def f(): pass", "lambda: 0",
])
def test_pyautogui_hostile_is_refused(code):
    with pytest.raises(ActionError, match="refused"):
        parse_pyautogui(code)


def test_action_validation():
    with pytest.raises(ValueError, match="unknown action type"):
        Action.from_dict({"type": "fly"})
    with pytest.raises(ValueError, match="unknown action fields"):
        Action.from_dict({"type": "click", "z": 1})
    assert Action.from_dict(Action("drag", x=1, y=2, x2=3, y2=4).to_dict()).x2 == 3


def test_config_yaml_env_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("scheduler:\n  rollout_n: 8\nagent:\n  max_steps: 3\n")
    cfg = load_config(p, ["agent.max_steps=5", "tasks.ids=[a, b]"],
                      environ={"VLLM_SERVER_URL": "http://h:1/v1", "VLLM_MODEL_NAME": "m",
                               "ENV_SERVER_URL": "http://e:2", "ENV_TOKEN": "tok"})
    assert cfg.scheduler.rollout_n == 8 and cfg.agent.max_steps == 5 and cfg.tasks.ids == ["a", "b"]
    assert cfg.llm.url == "http://h:1/v1" and cfg.llm.model == "m"
    assert cfg.env.services[0].url == "http://e:2" and cfg.env.services[0].token == "tok"
    with pytest.raises(Exception, match="rolout_n"):
        load_config(None, ["scheduler.rolout_n=3"], environ={})
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["nonsense"], environ={})


def test_builtin_suite_is_well_formed():
    tasks = builtin_tasks()
    assert len(tasks) >= 24 and len({t.id for t in tasks}) == len(tasks)
    for t in tasks:
        validate_evaluator(t.evaluator)
        assert t.oracle, t.id
        for a in t.oracle:
            Action.from_dict(a)


def test_task_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(TaskLoadError, match="bad.json"):
        load_task_file(bad)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(TaskLoadError, match="'id'"):
        load_task_file(missing)
    with pytest.raises(EvaluatorError, match="unsupported metric"):
        validate_evaluator({"func": "compare_table", "result": {"type": "vm_file"}})


def test_task_source_folder_with_a_broken_file(tmp_path):
    for i in range(3):
        (tmp_path / f"t{i}.json").write_text(json.dumps({"id": f"t{i}", "instruction": "do"}))
    (tmp_path / "zz-broken.json").write_text("{")
    items = load_items(str(tmp_path))
    assert [type(i).__name__ for i in items] == ["Task", "Task", "Task", "BrokenTask"]
    assert "zz-broken.json" in items[-1].reason
    src = TaskSource(items, epochs=2)
    keys = [k for k, _ in src]
    assert keys[:4] == ["t0", "t1", "t2", "zz-broken"] and keys[4] == "t0@e1" and len(keys) == 8
    shard = TaskSource(items, rank=1, world_size=2)
    assert [k for k, _ in shard] == ["t1", "zz-broken"]


def test_task_source_parquet_and_jsonl(tmp_path):
    import pyarrow as pa

    rows = [{"id": "p1", "instruction": "x", "config": "[]", "evaluator": "{}"},
            {"id": "", "instruction": "x", "config": "[]", "evaluator": "{}"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    items = load_items(str(tmp_path / "t.parquet"))
    assert isinstance(items[0], Task) and isinstance(items[1], BrokenTask)
    (tmp_path / "t.jsonl").write_text('{"id": "j1", "instruction": "x"}\nnot json\n')
    items = load_items(str(tmp_path / "t.jsonl"))
    assert isinstance(items[0], Task) and isinstance(items[1], BrokenTask)


def _traj(task, sample, reward=1.0, version=0):
    return Trajectory(task_id=task, sample=sample, status=Status.FINISHED, reason="ok", reward=reward,
                      steps=[Step(index=0, text="t", prompt_token_ids=[1, 2], token_ids=[3], policy_version=version,
                                  action={"type": "click", "x": 1.0, "y": 2.0})])


async def test_buffer_groups_persistence_and_resume(tmp_path):
    b = TrajectoryBuffer(tmp_path, rollout_n=2)
    assert b.add(_traj("a", 0)) is None
    g = b.add(_traj("a", 1, 0.0))
    assert g is not None and g.rewards == [1.0, 0.0]
    b.add(_traj("b", 0))
    with pytest.raises(ValueError, match="twice"):
        b.add(_traj("b", 0))
    assert (await b.get_batch(1))[0].task_id == "a"
    # restart: done keys are known, the partial group completes with the old sample
    b2 = TrajectoryBuffer(tmp_path, rollout_n=2)
    assert b2.done_keys() == {("a", 0), ("a", 1), ("b", 0)}
    g = b2.add(_traj("b", 1))
    assert g is not None and [t.sample for t in g.trajectories] == [0, 1]
    path = b2.compact()
    table = pq.read_table(path)
    assert table.num_rows == 4
    back = read_trajectories(tmp_path)
    assert sorted(t.key for t in back) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert back[0].steps[0].token_ids == [3] and back[0].steps[0].action["type"] == "click"


async def test_buffer_staleness(tmp_path):
    b = TrajectoryBuffer(None, rollout_n=1, max_staleness=1, stale_policy="drop")
    b.add(_traj("old", 0, version=0))
    b.add(_traj("new", 0, version=2))
    b.set_policy_version(2)
    got = await b.get_batch(1)
    assert got[0].task_id == "new" and b.dropped_stale == 1
    f = TrajectoryBuffer(None, rollout_n=1, max_staleness=0, stale_policy="flag")
    f.add(_traj("old", 0, version=0))
    f.set_policy_version(1)
    assert (await asyncio.wait_for(f.get_batch(1), 1))[0].stale


def test_ods_reader_reads_builtin_sheet():
    from agentenv.envs.tasks import BUILTIN_DIR

    cells = read_ods_cells(BUILTIN_DIR / "assets" / "budget.ods")
    sheet = next(iter(cells.values()))
    assert sheet["A2"] == "rent" and float(sheet["B2"]) == 1200


def test_default_yaml_matches_the_config_defaults():
    from pathlib import Path

    from agentenv.config import RunConfig

    path = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    assert load_config(path, environ={}) == RunConfig()
