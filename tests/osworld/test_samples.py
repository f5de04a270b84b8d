"""Train samples from real trajectories (the tiny model on vLLM, a real desktop)."""

from __future__ import annotations

import pytest

from tests.osworld.test_agent_loop import CLICK_ONLY, _first_env

from agentenv.config import LoopConfig
from agentenv.envs.tasks import builtin_tasks
from agentenv.rollout.agent import UITarsAgent
from agentenv.rollout.llm import Sampling, ServiceLLM
from agentenv.rollout.loop import Rollout, run_trajectory
from agentenv.rollout.samples import SequenceModeError, sequence_sample, step_samples
from agentenv.types import Trajectory

pytestmark = pytest.mark.slow


async def test_step_samples_decode_to_the_replies_and_a_window_is_not_one_sequence(vllm_server, env_service,
                                                                                   tiny_model_path, tiny_pixels):
    from transformers import AutoTokenizer

    client, env = await _first_env(env_service)
    llm = ServiceLLM(vllm_server.url, vllm_server.model)
    agent = UITarsAgent(history_images=1, min_pixels=tiny_pixels[0], max_pixels=tiny_pixels[1], wait_s=0.1)
    task = next(t for t in builtin_tasks() if t.id == "terminal-sort")
    traj = Trajectory(task_id=task.id, sample=0)
    try:
        await run_trajectory(traj, task, env, Rollout(llm, agent, Sampling(max_tokens=48, regex=CLICK_ONLY,
                                                                           logprobs=True), LoopConfig(max_steps=3)))
    finally:
        await llm.aclose()
        await client.aclose()
    assert len(traj.steps) == 3
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    samples = step_samples(traj)
    prompts = traj.prompt_ids()
    for s, step, prompt in zip(samples, traj.steps, prompts):
        # exactly the tokens the server returned, which decode to exactly the reply the agent parsed
        assert s.response_ids == step.token_ids and tok.decode(s.response_ids, skip_special_tokens=True) == step.text
        assert s.response_mask == [1] * len(step.token_ids) and s.response_logprobs == step.logprobs
        assert s.prompt_ids == prompt and s.image_steps == [step.index] and s.group_id == task.id
    # the one-screenshot window drops each old screenshot: the prompts do not extend each other
    with pytest.raises(SequenceModeError, match="step 1's prompt does not extend step 0's prompt and reply"):
        sequence_sample(traj)
