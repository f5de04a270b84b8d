"""New weights served without stopping rollouts: two real vLLM servers, two tiny checkpoints
(seeds 0 and 1) and a LoRA adapter, updated endpoint by endpoint during a running scheduler."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT, VLLM_PORT
from tests.osworld.test_streaming_task_sampling import CLICK_ONLY, check_complete, make_scheduler, tasks

from agentenv.config import AGENTENV_HOME, Sampling, ServiceConfig
from agentenv.envs.pool import EnvPool
from agentenv.rollout.llm import ServiceLLM
from agentenv.types import Status

pytestmark = [pytest.mark.slow, pytest.mark.starts_vllm]  # vLLM servers of its own

SEED1 = AGENTENV_HOME / "models" / "tiny-uitars-seed1"
HELLO = [{"role": "user", "content": "hello there, agent"}]
GREEDY = Sampling(temperature=0.0, max_tokens=8)


def _make(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--quiet", *args], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


async def _greedy(url: str, model: str = "tiny-uitars") -> list[int]:
    llm = ServiceLLM(url, model)
    try:
        return (await llm.chat(HELLO, GREEDY)).token_ids
    finally:
        await llm.aclose()


@pytest.fixture(scope="module")
def two_servers(run_dir):
    """A starts on the seed-1 checkpoint (the reference for what seed 1 answers), B on seed 0."""
    from agentenv.services import VLLMService

    _make("--seed", "1", "--out", str(SEED1))
    a = VLLMService(port=VLLM_PORT + 20, run_dir=run_dir,
                    extra=["--weight-updates", "--model", str(SEED1), "--served-model-name", "tiny-uitars"])
    b = VLLMService(port=VLLM_PORT + 21, run_dir=run_dir, extra=["--weight-updates"])
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda s: s.start(), (a, b)))
    yield a, b
    a.stop()
    b.stop()


async def test_rolling_update_during_a_run(two_servers, env_service, tmp_path, tiny_pixels):
    from agentenv.config import TINY_MODEL

    a, b = two_servers
    seed1_reply = await _greedy(a.url)
    seed0_reply = await _greedy(b.url)
    assert seed1_reply != seed0_reply
    llm = ServiceLLM([a.url, b.url], "tiny-uitars", policy_version=None)
    await llm.update_weights(0, path=str(TINY_MODEL))  # both on seed 0 for the run: version 0
    assert await _greedy(a.url) == seed0_reply

    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    sched = make_scheduler(llm, pool, tmp_path, tasks()[:6], tiny_pixels, max_steps=4, regex=CLICK_ONLY)
    served_during: dict = {}

    async def update() -> None:
        while sched.stats.steps < 4:
            await asyncio.sleep(0.05)
        before = {u: s["served"] for u, s in llm.stats().items()}
        await sched.update_weights(1, path=str(SEED1))  # A, then B; the other serves meanwhile
        served_during.update({u: s["served"] - before[u] for u, s in llm.stats().items()})

    try:
        summary, _ = await asyncio.wait_for(asyncio.gather(sched.run(), update()), 600)
    finally:
        await pool.aclose()
    trajs = check_complete(tmp_path, [t.id for t in tasks()[:6]])
    assert all(t.status in (Status.MAX_STEPS, Status.FINISHED, Status.CALL_USER) for t in trajs), \
        [(t.key, t.status, t.reason) for t in trajs]
    versions = [v for t in trajs for v in t.policy_versions]
    assert set(versions) == {0, 1} and summary["policy_version"] == 1
    assert all(t.policy_versions == sorted(t.policy_versions) for t in trajs)  # never back to old weights
    assert sum(served_during.values()) > 0  # model calls went on while the endpoints were swapped in turn
    # both endpoints now answer as the seed-1 checkpoint did
    assert await _greedy(a.url) == seed1_reply and await _greedy(b.url) == seed1_reply

    # a LoRA adapter: loaded on each endpoint in turn, then every call uses it
    lora = tmp_path / "lora"
    _make("--lora", str(lora), "--seed", "7")
    await llm.update_weights(2, lora=str(lora))
    out = [await llm.chat(HELLO, GREEDY, session=f"s{i}") for i in range(4)]
    assert all(c.policy_version == 2 and c.token_ids == out[0].token_ids for c in out)
    assert out[0].token_ids != seed1_reply
    assert await _greedy(a.url, "policy-v2") == await _greedy(b.url, "policy-v2") == out[0].token_ids
    await llm.aclose()
