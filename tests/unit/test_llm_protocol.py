"""The LLM protocol's defaults and side tasks owned by their block (pure logic: the model is an
in-memory fake that answers ``chat`` only, as a simulation's model does)."""

from __future__ import annotations

import asyncio

import pytest

from agentenv.compat import side_task
from agentenv.rollout.llm import LLM, ChatLLM, Completion, ServiceLLM, as_llm
from agentenv.rollout.loop import Rollout


class ChatOnly:
    def __init__(self) -> None:
        self.closed = False

    async def chat(self, messages, sampling=None, *, session=None) -> Completion:
        return Completion(text=f"{session}", prompt_token_ids=[1], token_ids=[2])

    async def aclose(self) -> None:
        self.closed = True


async def test_an_object_with_chat_only_gets_the_protocols_defaults():
    model = ChatOnly()
    llm = as_llm(model)
    assert isinstance(llm, ChatLLM) and isinstance(llm, LLM) and llm.obj is model
    assert (await llm.chat([], session="s#0#1")).text == "s#0#1"
    assert await llm.ready() and not llm.exhausted and llm.endpoints == [] and llm.stats() == {}
    assert llm.api_key("http://x") is None and llm.release_session("s") is None
    await llm.wait_for_endpoint()  # returns at once: nothing to wait for
    with pytest.raises(TypeError, match="cannot swap weights endpoint by endpoint"):
        await llm.update_weights(1, path="/nowhere")
    await llm.aclose()
    assert model.closed
    assert as_llm(llm) is llm and Rollout(llm, agent=None).llm is llm  # type: ignore[arg-type]
    assert isinstance(Rollout(model, agent=None).llm, ChatLLM)  # type: ignore[arg-type]


async def test_an_adapter_is_itself_and_overrides_the_defaults():
    llm = ServiceLLM(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"], api_key="k")
    assert as_llm(llm) is llm and Rollout(llm, agent=None).llm is llm  # type: ignore[arg-type]
    assert llm.endpoints == ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"] and llm.api_key(llm.endpoints[0]) == "k"
    assert set(llm.stats()) == set(llm.endpoints) and not llm.exhausted
    await llm.aclose()


async def test_a_side_task_ends_with_its_block_and_never_fails_it():
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async with side_task(forever(), "forever") as task:
        await started.wait()
    assert task.cancelled()  # cancelled and awaited when the block ended

    async def broken() -> None:
        raise ValueError("the side task broke")

    async with side_task(broken(), "broken") as task:
        await asyncio.sleep(0)
    assert isinstance(task.exception(), ValueError)  # logged, not raised into the block

    with pytest.raises(KeyError):  # the block's own error goes through as it is, not in a group
        async with side_task(forever(), "forever") as task:
            raise KeyError("the block's")
    assert task.cancelled()

    async def finishing() -> str:
        await asyncio.sleep(0.05)
        return "done"

    async with side_task(finishing(), "finishing", grace_s=5.0) as task:
        pass
    assert task.result() == "done"  # given its grace to finish, not cancelled
