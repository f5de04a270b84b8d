"""One trajectory: reset the desktop, then ask the model and act until done. Thin I/O glue.

Desktop failures (``EnvDeadError``) propagate: the scheduler replaces the desktop and reruns the
trajectory. Everything else ends the trajectory with a status and a reason.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Callable

from agentenv._compat import timeout
from agentenv.envs.client import AsyncDesktopEnv, EnvRequestError
from agentenv.rollout.agent import Agent
from agentenv.rollout.llm import LLM, LLMError, Sampling
from agentenv.types import Action, Status, Step, Task, Trajectory


@dataclass
class LoopSettings:
    max_steps: int = 15
    max_invalid_in_row: int = 3
    step_timeout_s: float = 120.0


async def run_trajectory(
    traj: Trajectory,
    task: Task,
    env: AsyncDesktopEnv,
    llm: LLM,
    agent: Agent,
    sampling: Sampling,
    settings: LoopSettings,
    *,
    llm_slot: Callable[[], AbstractAsyncContextManager[Any]],
    policy_version: Callable[[], int],
    save_screenshot: Callable[[Trajectory, int, bytes], str] | None = None,
) -> Trajectory:
    """Fill ``traj`` (steps appended as they happen, so a timeout keeps them) and return it."""
    session = f"{task.id}#{traj.sample}#{traj.attempts}"
    try:
        return await _run(traj, task, env, llm, agent, sampling, settings, session, llm_slot, policy_version,
                          save_screenshot)
    finally:
        release = getattr(llm, "release_session", None)
        if release is not None:  # the trajectory's endpoint binding is no longer needed
            release(session)


async def _run(traj, task, env, llm, agent, sampling, settings, session, llm_slot, policy_version,
               save_screenshot) -> Trajectory:
    traj.env_id = env.name
    traj.steps.clear()
    image_size = agent.image_size(env.screen)
    try:
        obs = await env.reset(task, image_size)
    except EnvRequestError as e:
        traj.status, traj.reason = Status.TASK_ERROR, f"reset failed: {e.reason}"
        return traj
    state = agent.start(task.instruction, obs.screen)
    last_action: str | None = None
    traj.status, traj.reason = Status.MAX_STEPS, f"reached max_steps={settings.max_steps}"
    for i in range(settings.max_steps):
        agent.observe(state, obs.png)
        step = Step(index=i)
        if save_screenshot is not None:
            step.screenshot = save_screenshot(traj, i, obs.png)
        messages = agent.messages(state)
        try:
            async with llm_slot():
                step.policy_version = policy_version()
                async with timeout(settings.step_timeout_s):
                    completion = await llm.chat(messages, sampling, session=session)
        except asyncio.TimeoutError:
            traj.status, traj.reason = Status.TIMEOUT, f"model call of step {i} exceeded {settings.step_timeout_s}s"
            break
        except LLMError as e:
            traj.status, traj.reason = Status.LLM_ERROR, str(e)
            break
        agent.record_reply(state, completion.text)
        parsed = agent.parse(state, completion.text)
        step.text, step.thought = completion.text, parsed.thought
        step.prompt_token_ids, step.token_ids = completion.prompt_token_ids, completion.token_ids
        step.logprobs, step.finish_reason = completion.logprobs, completion.finish_reason
        step.llm_latency_s = completion.latency_s
        traj.steps.append(step)
        if not parsed.valid:
            step.valid, step.error = False, parsed.error
            state.invalid_in_row += 1
            if state.invalid_in_row >= settings.max_invalid_in_row:
                traj.status = Status.INVALID
                traj.reason = f"{state.invalid_in_row} invalid replies in a row; last: {parsed.error}"
                break
            t0 = time.perf_counter()  # nothing to do on screen: look again
            obs, step.env_info, _ = await env.step(Action("wait", seconds=0), image_size)
            step.env_latency_s = time.perf_counter() - t0
            continue
        state.invalid_in_row = 0
        step.action = parsed.actions[0].to_dict() if len(parsed.actions) == 1 else \
            {"type": "sequence", "actions": [a.to_dict() for a in parsed.actions]}
        t0 = time.perf_counter()
        for action in parsed.actions:
            new_obs, info, _ = await env.step(action, image_size)
            if new_obs is not None:
                obs = new_obs
            if info.get("error"):
                step.env_info = {**step.env_info, "error": info["error"]}
            last_action = action.type
        step.env_latency_s = time.perf_counter() - t0
        if last_action == "finished":
            traj.status, traj.reason = Status.FINISHED, "the model said finished"
            break
        if last_action == "call_user":
            traj.status, traj.reason = Status.CALL_USER, "the model called the user"
            break
    try:
        traj.reward = await env.evaluate(task, last_action)
    except EnvRequestError as e:
        traj.reason += f"; evaluation failed: {e.reason}"
        traj.reward = 0.0
    return traj
