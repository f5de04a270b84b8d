"""ServiceLLM with endpoints that come and go (pure logic: the servers are in-memory fakes behind
ServiceLLM's seams to the network: a call, a health probe, a post to an admin route). The real thing, a vLLM
actor whose server is killed mid-run and restarted by Ray: tests/ray/test_ray_cli.py."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from agentenv.config import LoopConfig
from agentenv.rollout.llm import LLMNoEndpointError, LLMUnavailableError, ServiceLLM
from agentenv.rollout.loop import Rollout, _call_model

MESSAGES = [{"role": "user", "content": "hi"}]


class FakeServer:
    """Answers every call, or holds calls until ``release`` (then dies if ``alive`` is false)."""

    def __init__(self) -> None:
        self.alive = True
        self.hold: asyncio.Event | None = None
        self.calls = 0
        self.held = 0


class Servers:
    def __init__(self, llm: ServiceLLM, *urls: str):
        self.by_root = {u: FakeServer() for u in urls}
        llm._create = self.create  # type: ignore[method-assign]
        llm._healthy = self.healthy  # type: ignore[method-assign]
        llm._post = self.post  # type: ignore[method-assign]

    def __getitem__(self, root: str) -> FakeServer:
        return self.by_root.setdefault(root, FakeServer())

    async def healthy(self, ep) -> bool:
        return self[ep.root].alive

    async def post(self, ep, path, body, *, timeout, optional=False) -> None:
        assert self[ep.root].alive

    async def create(self, ep, messages, sampling):
        s = self[ep.root]
        s.calls += 1
        if s.hold is not None:
            s.held += 1
            await s.hold.wait()
        if not s.alive:
            raise openai.APIConnectionError(request=httpx.Request("POST", ep.url))
        return {"choices": [{"message": {"content": "ok"}, "token_ids": [7], "finish_reason": "stop"}],
                "prompt_token_ids": [1, 2]}


def make(*urls: str, **kw) -> tuple[ServiceLLM, Servers]:
    llm = ServiceLLM(list(urls), "m", max_retries=3, backoff_s=0.001, down_s=60.0, **kw)
    return llm, Servers(llm, *urls)


async def until(cond, timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.001)


async def test_a_dropped_endpoint_takes_no_call_and_its_sessions_move():
    llm, servers = make("http://a", "http://b")
    first = await llm.chat(MESSAGES, session="s")
    other = "http://b/v1" if first.endpoint == "http://a/v1" else "http://a/v1"
    assert llm.drop_endpoint(first.endpoint, "its actor is restarting")
    assert llm.endpoints == [other] and not llm.drop_endpoint(first.endpoint, "again")
    assert (await llm.chat(MESSAGES, session="s")).endpoint == other  # the session moved
    assert servers[first.endpoint[:-3]].calls == 1
    await llm.aclose()


async def test_a_call_in_flight_on_a_lost_server_waits_for_its_replacement_outside_the_step_timeout():
    llm, servers = make("http://a")
    a = servers["http://a"]
    a.hold = asyncio.Event()
    rollout = Rollout(llm, agent=None, limits=LoopConfig(step_timeout_s=0.2))  # type: ignore[arg-type]
    call = asyncio.ensure_future(_call_model(rollout, MESSAGES, "s"))
    await until(lambda: a.held == 1)
    # the watcher: the server is gone, its actor restarts (a new port, a new key)
    llm.drop_endpoint("http://a", "actor restarting")
    llm.set_expecting(1)
    a.alive = False
    a.hold.set()  # the call in flight fails (connection refused), is retried, finds no endpoint: it waits
    await asyncio.sleep(0.5)  # longer than the step timeout: the wait is not counted against it
    assert not call.done()
    await llm.add_endpoint("http://b:9/v1", "new-key")
    llm.set_expecting(0)
    completion, version = await asyncio.wait_for(call, 2)
    assert completion.endpoint == "http://b:9/v1" and completion.token_ids == [7] and version == 0
    assert llm.endpoints == ["http://b:9/v1"] and llm.api_key("http://b:9/v1") == "new-key"
    await llm.aclose()


async def test_with_no_endpoint_up_a_call_raises_at_once_while_one_is_expected():
    llm, servers = make("http://a")
    llm.drop_endpoint("http://a", "lost")
    llm.set_expecting(1)
    with pytest.raises(LLMNoEndpointError):
        await llm.chat(MESSAGES)
    assert servers["http://a"].calls == 0
    waiters = [asyncio.ensure_future(llm.wait_for_endpoint()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    assert not llm.exhausted
    llm.set_expecting(0)  # the cluster gave up on it (return_timeout_s, or Ray's max_restarts)
    assert llm.exhausted  # the scheduler stops admitting, with an error, instead of waiting forever
    for w in waiters:
        with pytest.raises(LLMUnavailableError, match="none is expected back"):
            await asyncio.wait_for(w, 1)
    # nothing expected: a call fails its retries as before (the trajectory ends with llm_error)
    with pytest.raises(LLMUnavailableError) as e:
        await llm.chat(MESSAGES)
    assert not isinstance(e.value, LLMNoEndpointError)
    await llm.aclose()


async def test_an_added_endpoint_loads_the_last_weights_before_it_takes_calls():
    llm, servers = make("http://a", policy_version=0)
    loaded: list[tuple[str, bool]] = []

    async def load(root: str) -> None:
        if root == "http://c":
            raise RuntimeError("no weights there")
        loaded.append((root, llm.stats()[root + "/v1"]["draining"]))

    await llm.update_weights(3, load=load)
    assert loaded == [("http://a", True)]
    await llm.add_endpoint("http://b")
    assert loaded[1] == ("http://b", True)  # drained while it loaded: no call saw the old weights
    st = llm.stats()["http://b/v1"]
    assert st["version"] == 3 and not st["draining"]
    llm.drop_endpoint("http://a", "lost")
    assert (await llm.chat(MESSAGES)).policy_version == 3
    with pytest.raises(RuntimeError, match="no weights there"):  # a server that cannot load them is not taken in
        await llm.add_endpoint("http://c")
    assert llm.endpoints == ["http://b/v1"]
    await llm.aclose()


async def test_add_endpoint_refuses_a_server_that_does_not_answer_or_is_in_use():
    llm, servers = make("http://a")
    servers["http://dead"].alive = False
    with pytest.raises(Exception, match="does not answer /health"):
        await llm.add_endpoint("http://dead")
    with pytest.raises(ValueError, match="already in use"):
        await llm.add_endpoint("http://a/v1")
    assert llm.endpoints == ["http://a/v1"]
    await llm.aclose()


def test_each_scheduler_gets_its_share_of_the_services():
    from agentenv.integrations.ray import RaySetupError, share

    services = [f"s{i}" for i in range(5)]
    shares = [share(services, r, 2) for r in range(2)]
    assert shares == [["s0", "s2", "s4"], ["s1", "s3"]]  # disjoint, together all of them
    with pytest.raises(RaySetupError, match="gets no env service"):
        share(services[:1], 1, 2)
    with pytest.raises(ValueError):
        share(services, 2, 2)


class FakeActor:
    """What the fleet uses of a Ray actor handle: its id, and ``info.remote()``."""

    def __init__(self, actor_id: str):
        self._actor_id = type("Id", (), {"hex": lambda _: actor_id})()
        self.reply: dict = {}
        self.asked = 0
        actor = self

        class _Info:
            @staticmethod
            async def remote() -> dict:
                actor.asked += 1
                return dict(actor.reply)

        self.info = _Info()


async def test_the_fleet_replaces_a_lost_vllm_actor_in_the_llm():
    from agentenv.config import RayConfig
    from agentenv.integrations.ray import RayFleet, Replacement, _Member

    llm, servers = make("http://a:1")
    fleet = RayFleet(RayConfig())
    actor = FakeActor("v0")
    fleet.members = [_Member("agentenv-vllm-0", actor, "vllm", url="http://a:1/v1", incarnation=0, node_id="n1")]
    table = {"v0": ("ALIVE", 0)}
    fleet._states = lambda members=None: dict(table)  # type: ignore[method-assign]

    async def healthy(http, url):
        return servers[url.removesuffix("/health")].alive

    fleet._healthy = healthy  # type: ignore[method-assign]
    await fleet.refresh(None, llm=llm)  # all well: nothing changes
    assert llm.endpoints == ["http://a:1/v1"] and llm.expecting == 0 and actor.asked == 0

    servers["http://a:1"].alive = False  # the server is killed; Ray has not noticed yet
    await fleet.refresh(None, llm=llm)
    assert llm.endpoints == [] and llm.expecting == 1 and fleet.lost["vllm"] == 1
    assert actor.asked == 0  # the dropped incarnation is on its way out: not asked for a URL

    table["v0"] = ("RESTARTING", 1)
    await fleet.refresh(None, llm=llm)
    assert llm.expecting == 1 and not llm.exhausted

    table["v0"] = ("ALIVE", 1)
    actor.reply = {"url": "http://a:2/v1", "api_key": "k2", "model": "m", "node_id": "n2"}
    await fleet.refresh(None, llm=llm)
    assert llm.endpoints == ["http://a:2/v1"] and llm.api_key("http://a:2/v1") == "k2" and llm.expecting == 0
    assert fleet.replaced == [Replacement("vllm", "agentenv-vllm-0", "http://a:1/v1", "http://a:2/v1", "n2")]
    assert fleet.report()["vllm_lost"] == 1 and fleet.report()["vllm_returned"] == 1
    assert (await llm.chat(MESSAGES)).endpoint == "http://a:2/v1"

    table["v0"] = ("DEAD", 1)  # Ray's max_restarts used up
    await fleet.refresh(None, llm=llm)
    assert llm.endpoints == [] and llm.exhausted
    await llm.aclose()
