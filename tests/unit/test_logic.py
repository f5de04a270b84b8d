"""Pure logic: pyautogui allow-list, config loading, task loading, the buffer on real parquet."""

from __future__ import annotations

import asyncio
import json

import pyarrow.parquet as pq
import pytest

from agentenv.config import load_config
from agentenv.envs.actions import ActionError, parse_pyautogui
from agentenv.envs.tasks import TaskLoadError, builtin_tasks, load_task_file
from agentenv.envs.tasks.evaluate import EvaluatorError, validate_evaluator
from agentenv.envs.tasks.getters import read_sheet_cells
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
    p.write_text("scheduler:\n  rollout_n: 8\nloop:\n  max_steps: 3\n")
    cfg = load_config(p, ["loop.max_steps=5", "tasks.ids=[a, b]", "sampling.temperature=0.5"],
                      environ={"VLLM_SERVER_URL": "http://h:1/v1", "VLLM_MODEL_NAME": "m",
                               "ENV_SERVER_URL": "http://e:2", "ENV_TOKEN": "tok"})
    assert cfg.scheduler.rollout_n == 8 and cfg.loop.max_steps == 5 and cfg.tasks.ids == ["a", "b"]
    assert cfg.sampling.temperature == 0.5 and cfg.sampling.top_p == 1.0
    assert cfg.llm.url == "http://h:1/v1" and cfg.llm.model == "m"
    assert cfg.env.services[0].url == "http://e:2" and cfg.env.services[0].token == "tok"
    with pytest.raises(Exception, match="rolout_n"):
        load_config(None, ["scheduler.rolout_n=3"], environ={})
    with pytest.raises(Exception, match="temprature"):
        load_config(None, ["sampling.temprature=3"], environ={})
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


def _traj(task, sample, reward=1.0, version=0, status=Status.FINISHED, ended_at=0.0, steps=True):
    t = Trajectory(task_id=task, sample=sample, status=status, reason="ok", reward=reward, ended_at=ended_at)
    if steps:
        t.add_step(Step(index=0, text="t", token_ids=[3], policy_version=version,
                        action={"type": "click", "x": 1.0, "y": 2.0}), [1, 2], None)
    return t


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
    assert back[0].prompt_ids() == [[1, 2]]


async def test_buffer_reruns_infrastructure_failures_and_trains_on_policy_outcomes(tmp_path):
    b = TrajectoryBuffer(tmp_path, rollout_n=2)
    b.add(_traj("a", 0))
    b.add(_traj("a", 1, status=Status.LLM_ERROR, reward=0.0, ended_at=1.0))
    b.add(_traj("b", 0, status=Status.EVAL_ERROR, reward=0.0))
    b.add(_traj("b", 1, status=Status.ENV_ERROR, reward=0.0))
    b.add(_traj("c", 0, status=Status.TASK_ERROR, steps=False))
    b.add(_traj("c", 1, status=Status.TASK_ERROR, steps=False))
    # a trainer sees a's trainable sample only; b has none; c's broken task has none either
    batch = b.drain()
    assert [(g.task_id, [t.sample for t in g.trajectories]) for g in batch] == [("a", [0])]
    assert b.dropped_untrainable == 2
    # a resumed run reruns the infrastructure failures, not the policy outcomes or the broken task
    b2 = TrajectoryBuffer(tmp_path, rollout_n=2)
    assert b2.done_keys() == {("a", 0), ("c", 0), ("c", 1)}
    g = b2.add(_traj("a", 1, reward=0.5, ended_at=2.0))  # the rerun completes the group
    assert g is not None and g.rewards == [1.0, 0.5]
    back = {t.key: t for t in read_trajectories(tmp_path)}
    assert back[("a", 1)].status == Status.FINISHED and back[("b", 0)].status == Status.EVAL_ERROR
    # compacting keeps one row per pair, the one that supersedes the failure
    table = pq.read_table(b2.compact())
    assert table.num_rows == 6 and sorted(zip(table["task_id"].to_pylist(), table["sample"].to_pylist())) == \
        [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert not list((tmp_path / "parts").glob("*.parquet"))


def test_prompt_ids_are_stored_compactly_and_exactly():
    from agentenv.types import decode_prompt, encode_prompt

    pad = 151655
    p0 = [1, 2, 3] + [pad] * 64 + [4]
    p1 = p0 + [5, 6] + [pad] * 64 + [7]
    shared, delta = encode_prompt(p0, p1)
    assert shared == len(p0) and delta == [5, 6, -64, pad, 7]
    assert decode_prompt(p0, shared, delta) == p1
    assert encode_prompt(None, p0) == (0, [1, 2, 3, -64, pad, 4])
    # a prompt that dropped an image from the middle shares only the part before it
    p2 = p0[:3] + [9] + [pad] * 64
    shared, delta = encode_prompt(p1, p2)
    assert shared == 3 and decode_prompt(p1, shared, delta) == p2


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
    # a group whose trajectories never reached the model has no version: it is not stale
    n = TrajectoryBuffer(None, rollout_n=1, max_staleness=0, stale_policy="drop")
    n.add(_traj("nosteps", 0, status=Status.MAX_STEPS, steps=False))
    n.set_policy_version(5)
    assert [g.task_id for g in n.drain()] == ["nosteps"] and n.dropped_stale == 0


def test_ods_reader_reads_builtin_sheet():
    from agentenv.envs.tasks import BUILTIN_DIR

    cells = read_sheet_cells(BUILTIN_DIR / "assets" / "budget.ods")
    sheet = next(iter(cells.values()))
    assert sheet["A2"] == "rent" and float(sheet["B2"]) == 1200


def test_default_yaml_matches_the_config_defaults():
    from pathlib import Path

    from agentenv.config import RunConfig

    path = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    assert load_config(path, environ={}) == RunConfig()


def test_buffer_fsyncs_files_and_their_directory(tmp_path, monkeypatch):
    """A crash right after add() or compact() returns must not lose the rename: the file and the
    directory entry both reach the disk."""
    import os

    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    b = TrajectoryBuffer(tmp_path, rollout_n=1)
    b.add(_traj("a", 0))
    parts = tmp_path / "parts"
    assert any(s.startswith(str(parts / ".a-0-")) for s in synced)  # the part file, before its rename
    assert str(parts) in synced                                      # the directory, after it
    synced.clear()
    b.compact()
    assert str(tmp_path / ".trajectories.parquet.tmp") in synced and str(tmp_path) in synced
    assert str(parts) in synced  # the unlinked parts


def test_a_resumed_buffer_removes_what_a_killed_writer_left_half_written(tmp_path):
    b = TrajectoryBuffer(tmp_path, rollout_n=2)
    b.add(_traj("a", 0))
    # SIGKILL inside write_atomic leaves its temp file; the part it was writing never appeared
    half = tmp_path / "parts" / ".a-1-0123abcd.parquet.tmp"
    half.write_bytes(b"PAR1 cut short")
    other = tmp_path / "parts" / "notes.tmp"  # not one of ours: left alone
    other.write_text("x")
    b2 = TrajectoryBuffer(tmp_path, rollout_n=2)
    assert not half.exists() and other.exists()
    assert b2.done_keys() == {("a", 0)}
    assert b2.add(_traj("a", 1)) is not None


def _turns(prompts_and_replies, image_steps, reward=1.0):
    t = Trajectory(task_id="g", sample=1, status=Status.FINISHED, reward=reward)
    prev = None
    for i, ((prompt, reply), imgs) in enumerate(zip(prompts_and_replies, image_steps)):
        t.add_step(Step(index=i, token_ids=reply, logprobs=[-0.5] * len(reply), image_steps=imgs,
                        policy_version=i), prompt, prev)
        prev = prompt
    return t


def test_sequence_and_step_samples_mask_exactly_the_model_tokens():
    from agentenv.rollout.samples import group_samples, sequence_sample, step_samples
    from agentenv.types import Group

    p0 = [1, 2, 9, 9, 9]                  # system + instruction + image 0
    r0 = [50, 51, 2]                      # reply 0 (ends with the end-of-turn token)
    p1 = p0 + r0 + [7, 9, 9, 9]           # + template between turns + image 1
    r1 = [60, 2]
    t = _turns([(p0, r0), (p1, r1)], [[0], [0, 1]])
    seq = sequence_sample(t)
    assert seq.prompt_ids == p0 and seq.response_ids == r0 + [7, 9, 9, 9] + r1
    assert seq.response_mask == [1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert seq.response_logprobs == [-0.5] * 3 + [0.0] * 4 + [-0.5] * 2
    assert [tok for tok, m in zip(seq.response_ids, seq.response_mask) if m] == r0 + r1
    assert seq.image_steps == [0, 1] and seq.policy_versions == [0, 1] and seq.reward == 1.0 and seq.num_turns == 4
    steps = step_samples(t)
    assert [(s.prompt_ids, s.response_ids, s.response_mask, s.image_steps) for s in steps] == \
        [(p0, r0, [1, 1, 1], [0]), (p1, r1, [1, 1], [0, 1])]
    assert all(s.group_id == "g" and s.sample == 1 and s.reward == 1.0 for s in steps)
    assert len(group_samples([Group("g", [t])], "sequence")) == 1 and len(group_samples([Group("g", [t])])) == 2


def test_sequence_mode_refuses_prompts_that_do_not_extend_and_says_why():
    from agentenv.rollout.samples import SequenceModeError, sequence_sample, trajectory_samples

    p0 = [1, 2, 9, 9]
    p1 = [1, 2, 50, 51, 7, 9, 9]          # the history window dropped image 0
    t = _turns([(p0, [50, 51]), (p1, [60])], [[0], [1]])
    with pytest.raises(SequenceModeError, match="step 1's prompt does not extend step 0's.*step mode"):
        sequence_sample(t)
    assert [s.step for s in trajectory_samples(t, "auto")] == [0, 1]  # auto falls back to step mode
    # a server that re-tokenized the earlier reply differently breaks the sequence too
    t2 = _turns([(p0, [50, 51]), (p0 + [50, 52, 7], [60])], [[0], [0, 1]])
    with pytest.raises(SequenceModeError, match="differ at token 5"):
        sequence_sample(t2)


def test_task_round_trips_with_the_keys_it_does_not_model():
    t = Task.from_dict({"id": "x", "instruction": "y", "snapshot": "chrome", "proxy": False}, source="f.json")
    d = t.to_dict()
    assert d["snapshot"] == "chrome" and "extra" not in d  # OSWorld's shape, as in the file
    assert Task.from_dict(d, source="f.json") == t
