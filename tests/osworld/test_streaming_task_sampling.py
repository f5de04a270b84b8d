"""The streaming scheduler with the real tiny model on vLLM and a real env service (4 desktops).

6+ tasks, rollout_n=2: streaming admission, every group complete with token ids, parquet on
disk, in-process vLLM through duck typing, stop-and-resume without duplicates or losses, and a
broken task file plus a desktop killed mid-trajectory recorded with reasons.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest


from agentenv.envs.client import AsyncEnvClient
from agentenv.envs.pool import EnvPool
from agentenv.envs.tasks import builtin_tasks
from agentenv.rollout.agent import UITarsAgent
from agentenv.rollout.buffer import TrajectoryBuffer, read_trajectories
from agentenv.rollout.llm import Sampling, as_llm
from agentenv.config import LoopConfig, SchedulerConfig, ServiceConfig
from agentenv.rollout.loop import Rollout
from agentenv.rollout.scheduler import StreamingScheduler
from agentenv.rollout.sources import TaskSource, load_items
from agentenv.rollout.uitars import ACTION_REGEX
from agentenv.types import Status

pytestmark = pytest.mark.slow

# Light tasks (editor, terminal, calculator, file manager): the suite's heavy apps are covered by
# test_desktops; here the scheduler is under test.
TASK_IDS = ["editor-type-hello", "terminal-mkdir", "calc-add", "files-open-documents", "editor-clear",
            "terminal-sort", "files-new-folder"]
ROLLOUT_N = 2


def tasks():
    by_id = {t.id: t for t in builtin_tasks()}
    return [by_id[i] for i in TASK_IDS]


# Never "finished": trajectories run to max_steps, so a desktop killed early is killed mid-trajectory.
CLICK_ONLY = r"Thought: [a-z ]{1,12}\nAction: click\(start_box='\([12]?\d{1,2},[12]?\d{1,2}\)'\)"


def make_scheduler(llm, pool, out: Path | None, items, tiny_pixels, max_steps=3,
                   regex=ACTION_REGEX, step_timeout_s: float = 120, rank: int = 0,
                   world_size: int = 1) -> StreamingScheduler:
    agent = UITarsAgent(min_pixels=tiny_pixels[0], max_pixels=tiny_pixels[1], wait_s=0.2)
    buffer = TrajectoryBuffer(out, ROLLOUT_N)
    rollout = Rollout(as_llm(llm), agent, Sampling(temperature=1.0, max_tokens=48, regex=regex),
                      LoopConfig(max_steps=max_steps, step_timeout_s=step_timeout_s))
    return StreamingScheduler(rollout, pool, buffer, TaskSource(items, rank=rank, world_size=world_size),
                              SchedulerConfig(rollout_n=ROLLOUT_N, env_retries=2))


@pytest.fixture
async def pool(env_service):
    p = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    yield p
    await p.aclose()


def check_complete(out: Path, expected_ids: list[str]) -> list:
    trajs = read_trajectories(out)
    keys = [t.key for t in trajs]
    assert len(keys) == len(set(keys)), "a trajectory was written twice"
    assert sorted(keys) == sorted((i, s) for i in expected_ids for s in range(ROLLOUT_N))
    return trajs


def check_streamed(sched, summary: dict, pool, task_ids: list[str]) -> list:
    """Every group of ``task_ids`` ran; it streamed (the first group was in the buffer before the last sample was
    admitted); no desktop sat idle (after the first pool-full of admissions, every admission took
    the desktop freed next, in the order they were freed). Returns the admissions."""
    assert summary["groups"] == len(task_ids) and summary["trajectories"] == len(task_ids) * ROLLOUT_N
    ev = sched.stats.events
    admits = [e for e in ev if e.kind == "admit"]
    groups = [e for e in ev if e.kind == "group"]
    releases = [e for e in ev if e.kind == "release"]
    assert groups[0].t < admits[-1].t
    n = pool.size
    assert [a.env for a in admits[n:]] == [r.env for r in releases[:len(admits) - n]]
    return admits


async def test_streaming_groups_complete_with_token_ids(vllm_server, pool, tmp_path, tiny_pixels):
    sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks(), tiny_pixels)
    summary = await sched.run()
    check_streamed(sched, summary, pool, TASK_IDS)
    ev = sched.stats.events
    # no lock-step: some sample was admitted while the other sample of an earlier group still ran
    running: dict[tuple[str, int], bool] = {}
    overlap = False
    for e in ev:
        if e.kind == "admit":
            overlap |= any(k[0] != e.key for k in running)
            running[(e.key, e.sample)] = True
        elif e.kind == "done":
            running.pop((e.key, e.sample), None)
    assert overlap
    # every group is complete, every step carries token ids, parquet reads back with pyarrow
    trajs = check_complete(tmp_path, TASK_IDS)
    for t in trajs:
        assert t.status in (Status.MAX_STEPS, Status.FINISHED, Status.CALL_USER), (t.key, t.status, t.reason)
        assert t.steps and all(s.token_ids and p for s, p in zip(t.steps, t.prompt_ids()))
        assert all((tmp_path / s.screenshot).exists() for s in t.steps)
        assert t.final_screenshot and (tmp_path / t.final_screenshot).exists()
    table = pq.read_table(tmp_path / "trajectories.parquet") if (tmp_path / "trajectories.parquet").exists() \
        else pq.read_table(tmp_path / "parts")
    assert table.num_rows == len(TASK_IDS) * ROLLOUT_N
    assert table.column("steps").type.value_type.field("token_ids").type.value_type.bit_width == 32
    groups = sched.buffer.drain()
    assert len(groups) == len(TASK_IDS) and all(len(g.trajectories) == ROLLOUT_N for g in groups)


async def test_in_process_vllm_through_duck_typing(vllm_server, pool, tmp_path, in_process_engine, tiny_pixels):
    sched = make_scheduler(in_process_engine, pool, tmp_path, tasks()[:6], tiny_pixels)
    try:
        summary = await sched.run()
    finally:
        await sched.llm.aclose()
    assert type(sched.llm).__name__ == "InProcessLLM"
    assert summary["groups"] == 6
    for t in check_complete(tmp_path, TASK_IDS[:6]):
        assert t.steps and all(s.token_ids for s in t.steps)
        assert t.steps[0].text.startswith("Thought: ")


async def test_stop_and_restart_finishes_the_rest_without_duplicates(vllm_server, pool, tmp_path, tiny_pixels):
    first = make_scheduler(vllm_server.url, pool, tmp_path, tasks(), tiny_pixels)

    async def stop_after(k: int) -> None:
        while first.buffer.trajectories_done < k:
            await asyncio.sleep(0.05)
        first.stop()

    run = asyncio.ensure_future(first.run())
    await asyncio.gather(run, stop_after(3))
    done_first = first.buffer.trajectories_done
    total = len(TASK_IDS) * ROLLOUT_N
    assert 3 <= done_first < total and first.stopping
    first_keys = {t.key for t in read_trajectories(tmp_path)}
    assert len(first_keys) == done_first  # everything finished in flight was written, once

    second = make_scheduler(vllm_server.url, pool, tmp_path, tasks(), tiny_pixels)
    summary = await second.run()
    assert summary["trajectories"] == total - done_first  # only the rest ran
    second.buffer.compact()
    check_complete(tmp_path, TASK_IDS)
    assert not (first_keys & {(e.key, e.sample) for e in second.stats.events if e.kind == "admit"})
    # groups split across the restart are complete in the second buffer
    assert second.buffer.groups_done == len(TASK_IDS) - first.buffer.groups_done


async def test_broken_task_file_and_killed_desktop_are_recorded(vllm_server, pool, env_service, tmp_path,
                                                                tiny_pixels):
    folder = tmp_path / "tasks"
    folder.mkdir()
    good = tasks()[:5]
    for t in good:
        (folder / f"{t.id}.json").write_text(json.dumps(t.to_dict()))
    (folder / "broken.json").write_text('{"id": "broken", "instruction": ')
    out = tmp_path / "out"
    sched = make_scheduler(vllm_server.url, pool, out, load_items(str(folder)), tiny_pixels, max_steps=6,
                           regex=CLICK_ONLY)
    client = AsyncEnvClient(env_service.url, env_service.token)
    killed: dict = {}

    async def kill_one() -> None:
        # once steps are flowing, kill the X server under the trajectory admitted last (the one
        # furthest from its end)
        while sched.stats.steps < 3:
            await asyncio.sleep(0.05)
        busy = [e for e in sched.stats.events if e.kind == "admit"]
        released = {(e.key, e.sample) for e in sched.stats.events if e.kind in ("release", "done")}
        victim = next(e for e in reversed(busy) if (e.key, e.sample) not in released)
        env_id = victim.env.rsplit("/", 1)[1]
        display = next(e.display for e in await client.list() if e.id == env_id)
        os.kill(int(Path(f"/tmp/.X{display[1:]}-lock").read_text()), signal.SIGKILL)
        killed.update(key=(victim.key, victim.sample))

    try:
        await asyncio.gather(sched.run(), kill_one())
    finally:
        await client.aclose()
    trajs = {t.key: t for t in read_trajectories(out)}
    ids = [t.id for t in good] + ["broken"]
    assert sorted(trajs) == sorted((i, s) for i in ids for s in range(ROLLOUT_N))
    for s in range(ROLLOUT_N):
        b = trajs[("broken", s)]
        assert b.status == Status.TASK_ERROR and "broken.json" in b.reason
    victim = trajs[killed["key"]]
    assert victim.attempts >= 2 and "rerun after" in victim.reason and victim.steps, victim
    assert victim.status != Status.ENV_ERROR
    others = [t for k, t in trajs.items() if k[0] != "broken"]
    assert all(t.status in (Status.MAX_STEPS, Status.FINISHED, Status.CALL_USER) for t in others)
    assert pool.replaced >= 1 and pool.size == 4


def test_agentenv_run_sigterm_flushes_and_a_rerun_finishes(vllm_server, env_service, tmp_path):
    """`agentenv run` on SIGTERM stops admitting, finishes what is in flight, writes the summary
    and exits 0; the next run, with --resume, does only the rest."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    ids = TASK_IDS[:5]
    cmd = [sys.executable, "-m", "agentenv", "run", "--set", f"llm.url={vllm_server.url}",
           "--set", f"llm.model={vllm_server.model}",
           "--set", f"env.services=[{{url: '{env_service.url}', token: '{env_service.token}'}}]",
           "--set", f"tasks.ids=[{', '.join(ids)}]", "--set", f"output.dir={out}",
           "--set", "loop.max_steps=3", "--set", "progress=false"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((out / "parts").glob("*.parquet")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_early"] and 1 <= summary["trajectories"] < len(ids) * ROLLOUT_N
    first = summary["trajectories"]
    r = subprocess.run(cmd + ["--resume", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    second = json.loads(r.stdout.strip().splitlines()[-1])
    assert not second["stopped_early"] and second["trajectories"] == len(ids) * ROLLOUT_N - first
    check_complete(out, ids)
