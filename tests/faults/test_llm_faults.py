"""The model service misbehaving, on the real tiny model behind a fault-injecting proxy.

One slow or failed call must not take an endpoint and all its sessions out (a cascade under
load); overload (429) is waited out; 5xx and dropped connections are retried; what cannot be
served says where and why.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faultproxy import FaultProxy
from tests.osworld.test_llm import GREEDY, screenshot_messages

from agentenv.rollout.llm import LLMUnavailableError, ServiceLLM

pytestmark = pytest.mark.slow


async def test_one_timeout_neither_marks_the_endpoint_down_nor_moves_its_sessions(vllm_server):
    async with FaultProxy(vllm_server.url[:-3]) as a, FaultProxy(vllm_server.url[:-3]) as b:
        llm = ServiceLLM([a.url, b.url], vllm_server.model, timeout_s=3.0, max_retries=3, backoff_s=0.05,
                         failure_threshold=3)
        try:
            first = await asyncio.gather(*[llm.chat(screenshot_messages(), GREEDY, session=f"s{i}")
                                           for i in range(4)])
            where = {f"s{i}": c.endpoint for i, c in enumerate(first)}
            on_a = [s for s, e in where.items() if e == llm.endpoints[0]]
            assert on_a and len(on_a) < 4
            a.hang(times=1, path="/chat/completions")
            victim = on_a[0]
            out = await llm.chat(screenshot_messages(seed=1), GREEDY, session=victim)
            assert out.token_ids and a.injected == ["hang /v1/chat/completions"]
            assert out.endpoint == llm.endpoints[1]  # that one call went elsewhere ...
            st = llm.stats()[llm.endpoints[0]]
            assert st["down_count"] == 0 and st["failures"] == 1  # ... A counts one failure, and is not down
            # ... and the other sessions bound to A still go to A
            again = await asyncio.gather(*[llm.chat(screenshot_messages(seed=2), GREEDY, session=s)
                                           for s in on_a[1:]])
            assert all(c.endpoint == llm.endpoints[0] for c in again)
            assert llm.stats()[llm.endpoints[0]]["failures"] == 0  # a success clears the count
        finally:
            await llm.aclose()


async def test_429_is_waited_out_and_5xx_and_dropped_connections_are_retried(vllm_server):
    async with FaultProxy(vllm_server.url[:-3]) as p:
        llm = ServiceLLM(p.url, vllm_server.model, max_retries=4, backoff_s=0.05, down_s=0.2, failure_threshold=3)
        try:
            p.fail(429, times=2, headers={"Retry-After": "0.2"}, path="/chat/completions")
            c = await llm.chat(screenshot_messages(), GREEDY, session="x")
            assert c.token_ids and p.injected.count("status /v1/chat/completions") == 2
            assert llm.stats()[llm.endpoints[0]]["down_count"] == 0  # overload is not an outage

            p.fail(503, times=2, path="/chat/completions")
            c = await llm.chat(screenshot_messages(), GREEDY, session="x")
            assert c.token_ids and p.injected.count("status /v1/chat/completions") == 4
            assert llm.stats()[llm.endpoints[0]]["down_count"] == 0  # below the threshold

            p.drop(times=1, path="/chat/completions")
            c = await llm.chat(screenshot_messages(), GREEDY, session="x")
            assert c.token_ids and "drop /v1/chat/completions" in p.injected

            p.fail(503, times=100, path="/chat/completions")
            with pytest.raises(LLMUnavailableError) as ei:
                await llm.chat(screenshot_messages(), GREEDY, session="x")
            assert p.url in str(ei.value) and "503" in str(ei.value) and "gave up after 5 attempts" in str(ei.value)
            assert llm.stats()[llm.endpoints[0]]["down_count"] >= 1  # three in a row: down
        finally:
            await llm.aclose()
