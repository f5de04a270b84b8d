"""Faults during a real run (tiny model on vLLM, real desktops): each trajectory is a failure
boundary, a lost desktop is replaced, an outage of the model service pauses admission, a failed
evaluation is its own status, and pause() really waits.

Faults are injected by killing real processes or through a real HTTP proxy (tests/faultproxy.py).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.faultproxy import FaultProxy
from tests.osworld.test_streaming_task_sampling import CLICK_ONLY, ROLLOUT_N, check_complete, make_scheduler, tasks

from agentenv.envs.client import AsyncDesktopEnv, AsyncEnvClient, EnvDeadError
from agentenv.config import ServiceConfig
from agentenv.envs.pool import EnvPool
from agentenv.net import free_port
from agentenv.procs import descendants
from agentenv.rollout.buffer import read_trajectories
from agentenv.rollout.llm import ServiceLLM
from agentenv.types import Status

pytestmark = pytest.mark.slow
POLICY = (Status.MAX_STEPS, Status.FINISHED, Status.CALL_USER, Status.INVALID)


async def _wait_for(cond, timeout: float = 240.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_a_garbled_answer_fails_only_its_own_trajectory(vllm_server, env_service, tmp_path, tiny_pixels):
    async with FaultProxy(env_service.url) as proxy:
        pool = await EnvPool([ServiceConfig(url=proxy.url, token=env_service.token)]).start()
        sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks()[:4], tiny_pixels, max_steps=4,
                               regex=CLICK_ONLY)

        async def garble() -> None:
            await _wait_for(lambda: sched.stats.steps >= 2)
            proxy.garbage(times=1, path="/step")

        try:
            summary, _ = await asyncio.gather(sched.run(), garble())
        finally:
            await pool.aclose()
    trajs = check_complete(tmp_path, [t.id for t in tasks()[:4]])
    broken = [t for t in trajs if t.status == Status.ERROR]
    assert len(broken) == 1 and "JSONDecodeError" in broken[0].reason, [(t.key, t.status, t.reason) for t in trajs]
    assert all(t.status in POLICY for t in trajs if t is not broken[0])
    assert summary["statuses"]["error"] == 1


async def test_a_desktop_closed_mid_run_is_replaced_and_its_trajectory_rerun(vllm_server, env_service, tmp_path,
                                                                            tiny_pixels):
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    client = AsyncEnvClient(env_service.url, env_service.token)
    sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks()[:3], tiny_pixels, max_steps=5, regex=CLICK_ONLY)
    victim: dict = {}

    async def close_one() -> None:
        await _wait_for(lambda: sched.stats.steps >= 2)
        running = {(e.key, e.sample): e.env for e in sched.stats.events if e.kind == "admit"}
        for e in sched.stats.events:
            if e.kind == "done":
                running.pop((e.key, e.sample), None)
        key, env_name = next(iter(running.items()))
        await client.close(env_name.rsplit("/", 1)[1])  # the service forgets it: 404 from now on
        victim["key"] = key

    try:
        await asyncio.gather(sched.run(), close_one())
    finally:
        await client.aclose()
    trajs = {t.key: t for t in check_complete(tmp_path, [t.id for t in tasks()[:3]])}
    v = trajs[victim["key"]]
    assert v.attempts == 2 and "rerun after" in v.reason and v.status in POLICY, v
    assert pool.replaced == 1 and pool.size == 4
    await pool.aclose()


async def test_the_trajectory_runner_reruns_on_a_closed_desktop_and_gives_desktops_back_when_cancelled(
        vllm_server, env_service, tiny_pixels):
    """run_leased alone (as the verl agent loop calls it, no scheduler): the rerun policy, and the
    desktop back in the pool however the trajectory ends, cancelled included."""
    from agentenv.config import SchedulerConfig
    from agentenv.rollout.runner import run_leased
    from agentenv.types import Trajectory

    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    client = AsyncEnvClient(env_service.url, env_service.token)
    rollout = make_scheduler(vllm_server.url, pool, None, [], tiny_pixels, max_steps=4, regex=CLICK_ONLY).rollout
    task, limits = tasks()[0], SchedulerConfig(rollout_n=1, env_retries=2)
    try:
        cancelled = Trajectory(task_id=task.id, sample=0)
        run = asyncio.ensure_future(run_leased(cancelled, task, pool, rollout, limits))
        await _wait_for(lambda: len(cancelled.steps) >= 1)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        assert run.cancelled() and pool.busy == 0  # the desktop went back, though nothing ended normally

        traj, released = Trajectory(task_id=task.id, sample=1), []
        run = asyncio.ensure_future(run_leased(traj, task, pool, rollout, limits, released=released.append))
        await _wait_for(lambda: len(traj.steps) >= 1)
        first = traj.env_id
        await client.close(first.rsplit("/", 1)[1])  # the service forgets it: 404 from now on
        await run
    finally:
        await client.aclose()
    assert traj.attempts == 2 and "rerun after" in traj.reason and first in traj.reason and traj.status in POLICY, traj
    assert released == [first, traj.env_id] and traj.env_id != first and traj.ended_at > 0
    assert pool.busy == 0 and pool.replaced == 1
    await pool.aclose()


async def test_when_every_desktop_is_lost_the_run_ends_with_an_error(vllm_server, tmp_path, tiny_pixels):
    from agentenv.services import EnvService

    svc = EnvService(num=1, port=free_port(), log=tmp_path / "env.log").start()
    procs: list[int] = []
    pool = await EnvPool([ServiceConfig(url=svc.url, token=svc.token)], replace_timeout_s=1.0).start()
    sched = make_scheduler(vllm_server.url, pool, tmp_path / "out", tasks()[:3], tiny_pixels, max_steps=4,
                           regex=CLICK_ONLY)

    async def kill_service() -> None:
        await _wait_for(lambda: sched.stats.steps >= 1)
        procs.extend(descendants(svc.proc.pid))  # its X server and apps, to end after the test
        os.kill(svc.proc.pid, signal.SIGKILL)

    try:
        summary, _ = await asyncio.wait_for(asyncio.gather(sched.run(), kill_service()), 300)
    finally:
        await pool.aclose()
        for pid in [svc.proc.pid, *procs]:  # the killed service could not close its desktops
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        svc.proc.wait(10)
    assert "every desktop was lost" in summary["error"]
    trajs = read_trajectories(tmp_path / "out")
    # the trajectory in flight ended with the reason; nothing else was admitted or recorded
    assert len(trajs) == 1 and trajs[0].status == Status.ENV_ERROR and "no desktop left" in trajs[0].reason
    assert summary["trajectories"] == 1 and pool.lost == 1


async def test_an_evaluator_that_fails_is_eval_error_and_kept_out_of_training(vllm_server, env_service, tmp_path,
                                                                             tiny_pixels):
    async with FaultProxy(env_service.url) as proxy:
        pool = await EnvPool([ServiceConfig(url=proxy.url, token=env_service.token)]).start()
        sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks()[:2], tiny_pixels, max_steps=2)
        proxy.fail(422, times=1, path="/evaluate")
        try:
            await sched.run()
        finally:
            await pool.aclose()
    trajs = check_complete(tmp_path, [t.id for t in tasks()[:2]])
    failed = [t for t in trajs if t.status == Status.EVAL_ERROR]
    assert len(failed) == 1 and "evaluation failed" in failed[0].reason and failed[0].steps
    groups = sched.buffer.drain()
    assert sum(len(g.trajectories) for g in groups) == 2 * ROLLOUT_N - 1
    assert failed[0] not in [t for g in groups for t in g.trajectories]


async def test_pause_waits_for_model_calls_in_flight_and_stops_admission(vllm_server, env_service, tmp_path,
                                                                        tiny_pixels):
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks()[:5], tiny_pixels, max_steps=4, regex=CLICK_ONLY)
    seen: dict = {}

    async def pause_and_resume() -> None:
        await _wait_for(lambda: sched.stats.steps >= 3 and sched.stats.llm_in_flight > 0)
        await sched.pause()
        seen["in_flight_at_pause"] = sched.stats.llm_in_flight
        steps, admitted = sched.stats.steps, sched.stats.admitted
        await asyncio.sleep(2.0)  # trajectories wait at their next step; nothing new starts
        seen["moved"] = (sched.stats.steps - steps, sched.stats.admitted - admitted, sched.stats.llm_in_flight)
        sched.resume(policy_version=3)

    try:
        await asyncio.gather(sched.run(), pause_and_resume())
    finally:
        await pool.aclose()
    assert seen["in_flight_at_pause"] == 0 and seen["moved"] == (0, 0, 0)
    trajs = check_complete(tmp_path, [t.id for t in tasks()[:5]])
    assert all(t.status in POLICY for t in trajs)
    versions = [s.policy_version for t in trajs for s in t.steps]
    assert 0 in versions and 3 in versions and set(versions) == {0, 3}
    # a trajectory's steps never go back to an older policy
    assert all(t.policy_versions == sorted(t.policy_versions) for t in trajs)


async def test_a_model_service_outage_pauses_admission_instead_of_burning_the_queue(vllm_server, env_service,
                                                                                   tmp_path, tiny_pixels):
    async with FaultProxy(vllm_server.url[:-3]) as proxy:
        llm = ServiceLLM(proxy.url, vllm_server.model, max_retries=1, backoff_s=0.05, down_s=0.2)
        pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
        sched = make_scheduler(llm, pool, tmp_path, tasks()[:6], tiny_pixels, max_steps=3, regex=CLICK_ONLY)
        sched.config.llm_wait_s = 0.2
        seen: dict = {}

        async def outage() -> None:
            await _wait_for(lambda: sched.stats.steps >= 2)
            proxy.fail(503, times=10 ** 6)  # every path, /health too
            await _wait_for(lambda: sched.buffer.statuses.get("llm_error", 0) >= 1)
            admitted = sched.stats.admitted
            await asyncio.sleep(3.0)
            seen["admitted_while_down"] = sched.stats.admitted - admitted
            proxy.clear()

        try:
            summary, _ = await asyncio.gather(sched.run(), outage())
        finally:
            await pool.aclose()
            await llm.aclose()
    trajs = check_complete(tmp_path, [t.id for t in tasks()[:6]])
    failed = [t for t in trajs if t.status == Status.LLM_ERROR]
    assert seen["admitted_while_down"] == 0
    # only what was in flight when the service went away failed; the queue waited and then ran
    assert 1 <= len(failed) <= pool.size
    assert all("503" in t.reason or "no endpoint is up" in t.reason for t in failed), [t.reason for t in failed]
    assert sum(t.status in POLICY for t in trajs) == len(trajs) - len(failed)


async def test_the_env_client_retries_a_blip_but_never_repeats_an_action(env_service):
    port = free_port()
    client = AsyncEnvClient(f"http://127.0.0.1:{port}", env_service.token)
    proxy = FaultProxy(env_service.url, port=port)

    async def start_late() -> None:  # the service "restarts": nothing listens for a moment
        await asyncio.sleep(0.3)
        await proxy.__aenter__()

    try:
        envs, _ = await asyncio.gather(client.list(), start_late())
        assert envs and proxy.requests == ["/envs"]
        env = AsyncDesktopEnv(client, envs[0].id, envs[0].screen)
        proxy.drop(times=1, path="/reset")
        obs = await env.reset(None)  # idempotent: retried after the dropped connection
        assert obs.png and proxy.injected == [f"drop /envs/{env.id}/reset"]
        proxy.drop(times=1, path="/step")
        from agentenv.types import Action

        with pytest.raises(EnvDeadError):  # a step may have acted: it is not sent twice
            await env.step(Action("wait", seconds=0))
        assert sum(p.endswith("/step") for p in proxy.requests) == 1
    finally:
        await client.aclose()
        await proxy.__aexit__(None, None, None)
