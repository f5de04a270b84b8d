"""One trajectory: reset the desktop, then ask the model and act until done. Thin I/O glue.

``run_trajectory(traj, task, env, rollout)`` is the seam every driver uses: the streaming
scheduler, the verl agent loop, a script. ``Rollout`` holds what all trajectories of a run share.

Desktop failures (``EnvDeadError``) propagate: the caller replaces the desktop and reruns the
trajectory. Everything else ends the trajectory with a status and a reason: a failed setup is
``task_error``, a model service that gives up is ``llm_error``, an action the desktop refuses is
an invalid step, an evaluator that cannot score is ``eval_error`` (never a silent reward 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

from agentenv.compat import timeout
from agentenv.config import LoopConfig, RunConfig, Sampling, tiny_model_pixels
from agentenv.envs.client import AsyncDesktopEnv, EnvRequestError
from agentenv.rollout.agent import Agent, make_agent
from agentenv.rollout.llm import LLM, Completion, LLMError, LLMNoEndpointError, Messages, as_llm
from agentenv.rollout.uitars import ACTION_REGEX
from agentenv.types import Action, Status, Step, Task, Trajectory


MAX_INVALID_REPLY_CHARS = 1000


def _version_zero() -> int:
    return 0


@dataclass
class Rollout:
    """What every trajectory of a run shares: the model, the agent, sampling and limits, and the
    driver's hooks (a slot around each model call, the current policy version, where screenshots go)."""

    llm: LLM
    agent: Agent
    sampling: Sampling = field(default_factory=Sampling)
    limits: LoopConfig = field(default_factory=LoopConfig)
    policy_version: Callable[[], int] = _version_zero
    llm_slot: Callable[[], AbstractAsyncContextManager[Any]] = contextlib.nullcontext
    # (trajectory, name, png) -> where it was saved ("" when not saved)
    save_screenshot: Callable[[Trajectory, str, bytes], str] | None = None

    def __post_init__(self) -> None:
        self.llm = as_llm(self.llm)  # an adapter stays itself; an object with chat only gets the defaults

    @classmethod
    def from_config(cls, cfg: RunConfig, llm: Any, *, tiny: bool = False) -> "Rollout":
        """The agent, sampling and limits a config asks for. ``tiny``: the model is the project's
        tiny random-weight model (its pixel bounds; replies constrained to UI-TARS actions)."""
        a = cfg.agent
        min_px, max_px = a.min_pixels, a.max_pixels
        if (min_px is None or max_px is None) and tiny and tiny_model_pixels():
            min_px, max_px = tiny_model_pixels()
        kw = {k: v for k, v in (("min_pixels", min_px), ("max_pixels", max_px)) if v is not None}
        agent = make_agent(a.name, history_images=a.history_images, language=a.language, wait_s=a.wait_s, **kw)
        s = cfg.sampling
        regex = ACTION_REGEX if s.regex == "uitars" else s.regex
        if tiny:  # random weights: only the regex makes replies parseable, and short ones do
            s = s.model_copy(update={"max_tokens": min(s.max_tokens, 64), "regex": regex or ACTION_REGEX})
        elif regex != s.regex:
            s = s.model_copy(update={"regex": regex})
        return cls(llm, agent, s, cfg.loop)


async def run_trajectory(traj: Trajectory, task: Task, env: AsyncDesktopEnv, rollout: Rollout) -> Trajectory:
    """Fill ``traj`` (steps appended as they happen, so a timeout keeps them) and return it."""
    session = f"{task.id}#{traj.sample}#{traj.attempts}"
    try:
        return await _run(traj, task, env, rollout, session)
    finally:
        rollout.llm.release_session(session)  # the trajectory's endpoint binding is no longer needed


async def _call_model(r: Rollout, messages: Messages, session: str) -> tuple[Completion, int]:
    """One model call within ``step_timeout_s``, and the policy version when it started. While no
    endpoint is up and one is on its way back (a model server Ray restarts), the call waits for it
    outside the slot and the timeout (the LLM bounds that wait), then goes again."""
    while True:
        try:
            async with r.llm_slot():
                version = r.policy_version()
                async with timeout(r.limits.step_timeout_s):
                    return await r.llm.chat(messages, r.sampling, session=session), version
        except LLMNoEndpointError:
            await r.llm.wait_for_endpoint()  # only ServiceLLM raises it


async def _act(env: AsyncDesktopEnv, parsed: Any, step: Step, image_size: Any, obs: Any,
               last_action: str | None) -> tuple[Any, str | None]:
    """Do a valid reply's actions on the desktop: the observation and the action type after them."""
    step.action = parsed.actions[0].to_dict() if len(parsed.actions) == 1 else \
        {"type": "sequence", "actions": [a.to_dict() for a in parsed.actions]}
    t0 = time.perf_counter()
    try:
        for action in parsed.actions:
            new_obs, info, _ = await env.step(action, image_size)
            if new_obs is not None:
                obs = new_obs
            if info.get("error"):
                step.env_info = {**step.env_info, "error": info["error"]}
            last_action = action.type
    except EnvRequestError as e:  # the desktop refused the action: the reply was not usable
        parsed.valid, parsed.error = False, f"the desktop refused the action: {e.reason}"
    step.env_latency_s = time.perf_counter() - t0
    return obs, last_action


async def _run(traj: Trajectory, task: Task, env: AsyncDesktopEnv, r: Rollout, session: str) -> Trajectory:
    agent, limits, save = r.agent, r.limits, r.save_screenshot
    traj.env_id = env.name
    traj.steps.clear()
    traj.final_screenshot = ""
    image_size = agent.image_size(env.screen)
    try:
        obs = await env.reset(task, image_size)
    except EnvRequestError as e:
        traj.status, traj.reason = Status.TASK_ERROR, f"reset failed: {e.reason}"
        return traj
    state = agent.start(task.instruction, obs.screen)
    last_action: str | None = None
    prompt: list[int] | None = None
    traj.status, traj.reason = Status.MAX_STEPS, f"reached max_steps={limits.max_steps}"
    for i in range(limits.max_steps):
        agent.observe(state, obs.png)
        step = Step(index=i, image_steps=agent.image_steps(state))
        if save is not None:
            step.screenshot = save(traj, f"step-{i:03d}", obs.png)
        messages = agent.messages(state)
        try:
            completion, version = await _call_model(r, messages, session)
        except asyncio.TimeoutError:
            traj.status, traj.reason = Status.TIMEOUT, f"model call of step {i} exceeded {limits.step_timeout_s}s"
            break
        except LLMError as e:
            traj.status, traj.reason = Status.LLM_ERROR, str(e)
            break
        step.policy_version = completion.policy_version if completion.policy_version is not None else version
        parsed = agent.parse(state, completion.text)
        # An invalid reply stays in the history only in part: 10,000 characters of garbage must not
        # push every later prompt past the model's context.
        agent.record_reply(state, completion.text if parsed.valid else completion.text[:MAX_INVALID_REPLY_CHARS])
        step.text, step.thought = completion.text, parsed.thought
        step.token_ids, step.logprobs = completion.token_ids, completion.logprobs
        step.finish_reason, step.llm_latency_s = completion.finish_reason, completion.latency_s
        traj.add_step(step, completion.prompt_token_ids, prompt)
        prompt = completion.prompt_token_ids
        if parsed.valid:
            obs, last_action = await _act(env, parsed, step, image_size, obs, last_action)
        if not parsed.valid:
            step.valid, step.error = False, parsed.error
            state.invalid_in_row += 1
            if state.invalid_in_row >= limits.max_invalid_in_row:
                traj.status = Status.INVALID
                traj.reason = f"{state.invalid_in_row} invalid replies in a row; last: {parsed.error}"
                break
            if step.action is None:  # nothing was done on screen: look again
                t0 = time.perf_counter()
                obs, step.env_info, _ = await env.step(Action("wait", seconds=0), image_size)
                step.env_latency_s = time.perf_counter() - t0
            continue
        state.invalid_in_row = 0
        if last_action == "finished":
            traj.status, traj.reason = Status.FINISHED, "the model said finished"
            break
        if last_action == "call_user":
            traj.status, traj.reason = Status.CALL_USER, "the model called the user"
            break
    if save is not None and traj.steps:
        traj.final_screenshot = save(traj, "final", obs.png)
    if traj.status.infrastructure:
        return traj  # nothing to score: the run was cut short by the infrastructure, not the policy
    try:
        traj.reward = await env.evaluate(task, last_action)
    except EnvRequestError as e:
        traj.reward = 0.0
        traj.reason = f"evaluation failed: {e.reason} (the run ended: {traj.status.value}: {traj.reason})"
        traj.status = Status.EVAL_ERROR
    return traj
