"""The UI-TARS agent loop end to end: the real tiny model on vLLM and a real desktop."""

from __future__ import annotations

import httpx
import pytest

from agentenv.envs.client import AsyncEnvClient, AsyncDesktopEnv
from agentenv.envs.tasks import builtin_tasks
from agentenv.rollout.agent import UITarsAgent
from agentenv.rollout.llm import Sampling, ServiceLLM
from agentenv.config import LoopConfig
from agentenv.rollout.loop import Rollout, run_trajectory
from agentenv.rollout.uitars import ACTION_REGEX
from agentenv.types import Status, Trajectory

pytestmark = pytest.mark.slow

CLICK_ONLY = r"Thought: [a-z ]{1,12}\nAction: click\(start_box='\([12]?\d{1,2},[12]?\d{1,2}\)'\)"


async def _first_env(env_service) -> tuple[AsyncEnvClient, AsyncDesktopEnv]:
    client = AsyncEnvClient(env_service.url, env_service.token)
    e = (await client.list())[-1]
    return client, AsyncDesktopEnv(client, e.id, e.screen)


async def test_clicks_land_on_the_mapped_pixel(vllm_server, env_service, tiny_pixels):
    """Each model click, mapped from the resized image to the screen, moves the real pointer there."""
    client, env = await _first_env(env_service)
    llm = ServiceLLM(vllm_server.url, vllm_server.model)
    agent = UITarsAgent(min_pixels=tiny_pixels[0], max_pixels=tiny_pixels[1])
    task = next(t for t in builtin_tasks() if t.id == "editor-type-hello")
    try:
        size = agent.image_size(env.screen)
        obs = await env.reset(task, size)
        assert obs.size == size  # the env sends the screenshot at the model's size
        state = agent.start(task.instruction, obs.screen)
        for i in range(3):
            agent.observe(state, obs.png)
            c = await llm.chat(agent.messages(state), Sampling(temperature=1.0, seed=i, max_tokens=40,
                                                                regex=CLICK_ONLY), session="mapped")
            agent.record_reply(state, c.text)
            parsed = agent.parse(state, c.text)
            assert parsed.valid and c.token_ids, (c.text, parsed.error)
            (a,) = parsed.actions
            obs, info, _ = await env.step(a, size)
            assert "error" not in info
            pos = httpx.post(f"{env_service.url}/envs/{env.id}/cursor_position",
                             headers={"Authorization": f"Bearer {env_service.token}"}).json()
            assert pos == [int(round(a.x)), int(round(a.y))]
    finally:
        await llm.aclose()
        await client.aclose()


async def test_trajectory_runs_to_max_steps_or_finished(vllm_server, env_service, tiny_pixels):
    client, env = await _first_env(env_service)
    llm = ServiceLLM(vllm_server.url, vllm_server.model)
    agent = UITarsAgent(min_pixels=tiny_pixels[0], max_pixels=tiny_pixels[1], wait_s=0.1)
    task = next(t for t in builtin_tasks() if t.id == "terminal-mkdir")
    traj = Trajectory(task_id=task.id, sample=0)
    try:
        await run_trajectory(traj, task, env, Rollout(
            llm, agent, Sampling(temperature=1.0, max_tokens=48, regex=ACTION_REGEX, logprobs=True),
            LoopConfig(max_steps=5), policy_version=lambda: 7))
    finally:
        await llm.aclose()
        await client.aclose()
    assert traj.status in (Status.MAX_STEPS, Status.FINISHED), traj.reason
    assert 1 <= len(traj.steps) <= 5
    for s in traj.steps:
        assert s.token_ids and s.prompt_delta and s.logprobs and len(s.logprobs) == len(s.token_ids)
        assert s.policy_version == 7 and s.valid and s.action and s.thought
        assert s.llm_latency_s > 0 and s.env_latency_s > 0
    # the prompt grows turn by turn: each step's prompt starts with the previous step's prompt,
    # which each step stores as the length it shares
    prompts = traj.prompt_ids()
    for i, (a, b) in enumerate(zip(prompts, prompts[1:])):
        assert b[:len(a) - 3] == a[:-3] and traj.steps[i + 1].prompt_shared >= len(a) - 3
    if traj.status == Status.FINISHED:
        assert traj.steps[-1].action["type"] == "finished"
    assert traj.reward == 0.0  # random weights do not solve the task


async def test_garbage_replies_end_the_trajectory_as_invalid(vllm_server, env_service, tiny_pixels):
    client, env = await _first_env(env_service)
    llm = ServiceLLM(vllm_server.url, vllm_server.model)
    agent = UITarsAgent(min_pixels=tiny_pixels[0], max_pixels=tiny_pixels[1])
    task = next(t for t in builtin_tasks() if t.id == "editor-clear")
    traj = Trajectory(task_id=task.id, sample=0)
    try:
        await run_trajectory(traj, task, env, Rollout(
            llm, agent, Sampling(max_tokens=12, regex=r"Thought: [a-z]{1,8}"),  # never an Action
            LoopConfig(max_steps=10, max_invalid_in_row=2)))
    finally:
        await llm.aclose()
        await client.aclose()
    assert traj.status == Status.INVALID and "2 invalid replies" in traj.reason
    assert len(traj.steps) == 2 and all(not s.valid and "Action" in s.error for s in traj.steps)
