"""The LLM layer against the real tiny model served by vLLM (and in-process vLLM)."""

from __future__ import annotations

import asyncio
import base64
import io
import os

import pytest

from tests.conftest import cpu_engine_env
from tests.faultproxy import FaultProxy
from PIL import Image, ImageDraw

from agentenv.rollout.llm import (AsyncEngineLLM, InProcessLLM, LLMError, LLMRequestError, Sampling, ServiceLLM,
                                  WrapperLLM, as_llm)
from agentenv.rollout.uitars import ACTION_REGEX

pytestmark = [pytest.mark.slow, pytest.mark.starts_vllm]  # a second server, in-process engines


def screenshot_messages(text: str = "Open the editor and type hello.", seed: int = 0) -> list[dict]:
    img = Image.new("RGB", (1920, 1080), (40 + seed * 10, 90, 160))
    ImageDraw.Draw(img).rectangle([200 + seed, 200, 900, 600], fill=(250, 250, 250))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


GREEDY = Sampling(temperature=0.0, max_tokens=40, regex=ACTION_REGEX)


async def test_chat_with_screenshot_returns_text_and_token_ids(vllm_server, tiny_model_path):
    from transformers import AutoTokenizer

    llm = as_llm(vllm_server.url, model=vllm_server.model)
    try:
        c = await llm.chat(screenshot_messages(), GREEDY)
    finally:
        await llm.aclose()
    assert c.text.startswith("Thought: ") and "\nAction: " in c.text
    assert c.token_ids and c.prompt_token_ids
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
    # the image is in the prompt: many image-pad tokens
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert c.prompt_token_ids.count(pad) > 50
    assert c.endpoint == vllm_server.url


async def test_32_concurrent_requests_all_succeed(vllm_server):
    llm = ServiceLLM(vllm_server.url, vllm_server.model)
    try:
        outs = await asyncio.gather(*[llm.chat(screenshot_messages(seed=i % 4), GREEDY, session=f"s{i}")
                                      for i in range(32)])
    finally:
        await llm.aclose()
    assert len(outs) == 32 and all(o.token_ids and "Action:" in o.text for o in outs)
    assert llm.stats()[llm.endpoints[0]]["served"] == 32


async def test_logprobs_when_asked(vllm_server):
    llm = ServiceLLM(vllm_server.url, vllm_server.model)
    try:
        c = await llm.chat(screenshot_messages(), Sampling(max_tokens=20, regex=ACTION_REGEX, logprobs=True))
    finally:
        await llm.aclose()
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    assert all(lp <= 0.0 for lp in c.logprobs)


async def test_400_is_not_retried_and_names_endpoint(vllm_server):
    llm = ServiceLLM(vllm_server.url, vllm_server.model, max_retries=4)
    try:
        with pytest.raises(LLMRequestError) as ei:
            await llm.chat(screenshot_messages(), Sampling(max_tokens=10_000_000))
    finally:
        await llm.aclose()
    e = ei.value
    assert e.status == 400
    assert vllm_server.url in str(e) and e.reason
    st = llm.stats()[vllm_server.url]
    assert st["requests"] == 1 and st["failures"] == 0 and st["up"]


async def test_wrong_model_name_is_a_clear_404(vllm_server):
    llm = ServiceLLM(vllm_server.url, "no-such-model")
    try:
        with pytest.raises(LLMRequestError) as ei:
            await llm.chat(screenshot_messages(), GREEDY)
    finally:
        await llm.aclose()
    assert ei.value.status == 404 and "no-such-model" in str(ei.value)


def test_as_llm_duck_typing(vllm_server):
    import openai

    assert isinstance(as_llm(vllm_server.url), ServiceLLM)
    assert isinstance(as_llm([vllm_server.url, vllm_server.url]), ServiceLLM)
    assert isinstance(as_llm(openai.AsyncOpenAI(base_url=vllm_server.url, api_key="x")), ServiceLLM)
    assert isinstance(as_llm(openai.OpenAI(base_url=vllm_server.url, api_key="x")), ServiceLLM)

    class Seed:
        def generate_with_messages(self, messages, **kw):
            return "Thought: x\nAction: wait()"

    assert isinstance(as_llm(Seed()), WrapperLLM)
    with pytest.raises(TypeError, match="generate_with_messages"):
        as_llm(object())
    os.environ.pop("VLLM_SERVER_URL", None)
    with pytest.raises(TypeError, match="VLLM_SERVER_URL"):
        as_llm(None)


async def test_sync_openai_client_and_wrapper_work(vllm_server):
    import openai

    llm = as_llm(openai.OpenAI(base_url=vllm_server.url, api_key="x", max_retries=0), model=vllm_server.model)
    c = await llm.chat(screenshot_messages(), GREEDY)
    assert c.token_ids and "Action:" in c.text


async def test_two_servers_sticky_failover_and_recovery(vllm_server):
    """Turns of a trajectory stick to one endpoint; a killed server is routed around without
    failures; a server that comes back is used again. The two endpoints are two real HTTP proxies in
    front of the session's vLLM server; "killed" is B's proxy closing its connections and refusing
    new ones, as a dead server does (a real vLLM server killed and restarted, by PID, is
    tests/faults/test_fault_suite.py's). Proxies, not a second server: a vLLM start costs 1-3 min here."""
    upstream = vllm_server.url[:-3]
    async with FaultProxy(upstream) as pa, FaultProxy(upstream) as pb:
        a_url, b_url = pa.url + "/v1", pb.url + "/v1"
        llm = ServiceLLM([a_url, b_url], vllm_server.model, down_s=1.0, max_retries=3, backoff_s=0.2)
        try:
            # new sessions spread over both; every turn of a session hits the same endpoint
            first = await asyncio.gather(*[llm.chat(screenshot_messages(), GREEDY, session=f"t{i}")
                                           for i in range(6)])
            where = {f"t{i}": c.endpoint for i, c in enumerate(first)}
            assert set(where.values()) == {a_url, b_url}
            for turn in range(2):
                again = await asyncio.gather(*[llm.chat(screenshot_messages(seed=turn + 1), GREEDY, session=s)
                                               for s in where])
                assert [c.endpoint for c in again] == list(where.values())

            await pb.kill()  # B dies mid-run
            after = await asyncio.gather(*[llm.chat(screenshot_messages(), GREEDY, session=s) for s in where])
            assert all(c.endpoint == a_url and c.token_ids for c in after)  # nothing failed
            assert not llm.stats()[b_url]["up"]

            await pb.revive()  # B comes back on its port
            await asyncio.sleep(1.2)
            back = await asyncio.gather(*[llm.chat(screenshot_messages(), GREEDY, session=f"new{i}")
                                          for i in range(6)])
            assert b_url in {c.endpoint for c in back}
        finally:
            await llm.aclose()


async def test_greedy_same_tokens_service_and_in_process(vllm_server, in_process_engine):
    """The same prompt, greedy, gives the same token ids over HTTP and with vllm.LLM in-process."""
    service = ServiceLLM(vllm_server.url, vllm_server.model)
    msgs = [screenshot_messages(seed=i) for i in range(3)]
    plain = Sampling(temperature=0.0, max_tokens=24)  # unconstrained greedy decoding
    try:
        remote = [await service.chat(m, plain) for m in msgs]
    finally:
        await service.aclose()
    local = as_llm(in_process_engine)
    assert isinstance(local, InProcessLLM)
    too_many_images = [{"role": "user", "content": [c for m in msgs + msgs for c in m[0]["content"]]}]
    try:
        here = await asyncio.gather(*[local.chat(m, plain) for m in msgs])  # batched in one call
        # one bad prompt (6 images, the engine takes 5) in a batch fails only its own call
        mixed = await asyncio.gather(*[local.chat(m, plain) for m in [msgs[0], too_many_images, msgs[1]]],
                                     return_exceptions=True)
    finally:
        await local.aclose()
    for r, h in zip(remote, here):
        assert h.prompt_token_ids == r.prompt_token_ids
        assert h.token_ids == r.token_ids
        assert h.text == r.text
    assert isinstance(mixed[1], LLMError) and "image" in str(mixed[1])
    assert mixed[0].token_ids == here[0].token_ids and mixed[2].token_ids == here[1].token_ids


async def test_async_engine_adapter_matches_the_service(vllm_server, tiny_model_path, tiny_pixels):
    """vLLM's async engine in this event loop, through as_llm: the same greedy tokens as over HTTP."""
    cpu_engine_env()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    service = ServiceLLM(vllm_server.url, vllm_server.model)
    plain = Sampling(temperature=0.0, max_tokens=24)
    try:
        remote = await service.chat(screenshot_messages(seed=2), plain)
    finally:
        await service.aclose()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_model_path), max_model_len=8192, limit_mm_per_prompt={"image": 5, "video": 0},
        mm_processor_kwargs={"min_pixels": tiny_pixels[0], "max_pixels": tiny_pixels[1]}))
    try:
        llm = as_llm(engine)
        assert isinstance(llm, AsyncEngineLLM)
        here = await llm.chat(screenshot_messages(seed=2), plain)
    finally:
        engine.shutdown()
    assert here.prompt_token_ids == remote.prompt_token_ids and here.token_ids == remote.token_ids
    assert here.text == remote.text and here.endpoint == "async-engine"


async def test_a_seed_style_wrapper_is_adapted(vllm_server):
    """An object with generate_with_messages (the seed's interface), sync, calling the real server."""
    import openai

    class Seed:
        def __init__(self):
            self.client = openai.OpenAI(base_url=vllm_server.url, api_key="x", max_retries=0)
            self.seen: list[dict] = []

        def generate_with_messages(self, messages, **kw):
            self.seen.append(kw)
            r = self.client.chat.completions.create(
                model=vllm_server.model, messages=messages, **kw,
                extra_body={"return_token_ids": True, "structured_outputs": {"regex": ACTION_REGEX}})
            d = r.model_dump()
            return {"text": d["choices"][0]["message"]["content"], "token_ids": d["choices"][0]["token_ids"],
                    "prompt_token_ids": d["prompt_token_ids"], "finish_reason": d["choices"][0]["finish_reason"]}

    seed = Seed()
    llm = as_llm(seed)
    assert isinstance(llm, WrapperLLM)
    c = await llm.chat(screenshot_messages(), GREEDY)
    assert c.text.startswith("Thought: ") and c.token_ids and c.prompt_token_ids and c.finish_reason in ("stop", "length")
    assert seed.seen == [{"temperature": 0.0, "top_p": 1.0, "max_tokens": 40}]
    again = await llm.chat(screenshot_messages(), GREEDY)
    assert again.token_ids == c.token_ids  # greedy through the wrapper is deterministic too
