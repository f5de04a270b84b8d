"""EnvPool with services that come and go (pure logic; the services are in-memory fakes with the
AsyncEnvClient methods the pool uses). The real thing, on a Ray cluster: tests/ray/."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from agentenv.envs.pool import EnvPool, EnvPoolExhausted
from agentenv.envs.wire import Created, DesktopInfo, Health

_ids = itertools.count()


class FakeService:
    def __init__(self, url: str, desktops: int):
        self.url, self.desktops = url, desktops

    async def health(self):
        return Health(desktops=self.desktops)

    async def list(self):
        return [DesktopInfo(id=f"d{next(_ids)}", width=100, height=100) for _ in range(self.desktops)]

    async def create(self, width=None, height=None):
        return Created(id=f"d{next(_ids)}", width=100, height=100)

    async def close(self, env_id):
        return None

    async def alive(self, env_id):
        return True

    async def aclose(self):
        return None


async def test_a_dropped_service_leaves_at_once_and_its_leased_desktops_are_not_taken_back():
    a, b = FakeService("http://a", 2), FakeService("http://b", 2)
    pool = await EnvPool([a, b]).start()
    leased = [await pool.acquire() for _ in range(3)]
    on_a = [e for e in leased if e.client is a]
    assert pool.drop_service("http://a", "node lost") == 2 - len(on_a)
    assert pool.size == 2 and pool.services() == ["http://b"]
    for e in on_a:  # their trajectories give them back: ignored, never replaced
        await pool.release(e, broken=True)
    assert pool.size == 2 and pool.replaced == 0 and all(e.client is b for e in pool._free)
    assert pool.drop_service("http://a", "again") == 0  # once is enough
    assert pool.stats()["dropped"] == 2 and pool.stats()["services"] == 1


async def test_an_empty_pool_waits_for_a_service_that_is_expected_back():
    a = FakeService("http://a", 1)
    pool = await EnvPool([a]).start()
    env = await pool.acquire()
    pool.drop_service("http://a", "node lost")
    pool.set_expecting(1)
    waiter = asyncio.ensure_future(pool.acquire())
    await pool.release(env)
    await asyncio.sleep(0.01)
    assert not waiter.done()  # nothing left, but something is coming: wait
    # the same URL again (a restarted service): a new client, new desktops
    assert await pool.add_service(FakeService("http://a", 2)) == 2
    got = await asyncio.wait_for(waiter, 1)
    assert got.client is not a and pool.size == 2
    with pytest.raises(ValueError, match="already in this pool"):
        await pool.add_service(FakeService("http://a", 1))


async def test_an_empty_pool_with_nothing_expected_tells_every_waiter():
    pool = await EnvPool([FakeService("http://a", 1)]).start()
    env = await pool.acquire()
    pool.set_expecting(1)
    pool.drop_service("http://a", "node lost")
    waiters = [asyncio.ensure_future(pool.acquire()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    pool.set_expecting(0)  # the cluster gave up on it
    for w in waiters:
        with pytest.raises(EnvPoolExhausted):
            await asyncio.wait_for(w, 1)
    await pool.release(env)
