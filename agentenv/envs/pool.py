"""EnvPool: leases desktops across one or more env services.

Desktops are reused between tasks (reset is cheap); a desktop returned as broken, or found dead by
a health check, is closed and replaced by a new one on the same service (retried for
``replace_timeout_s``, so a service that restarts keeps its slots). A service that cannot make a
replacement loses that slot, and the pool says so in the log and in ``stats()``; once every slot
is lost, ``acquire`` raises ``EnvPoolExhausted`` to everyone waiting.
"""

from __future__ import annotations

import asyncio
import collections
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from loguru import logger

from agentenv.envs.client import AsyncDesktopEnv, AsyncEnvClient, EnvError


@dataclass
class ServiceSpec:
    url: str
    token: str | None = None
    desktops: int | None = None  # None: use the desktops the service already has


class EnvPoolExhausted(EnvError):
    """Every desktop of the pool was lost: nothing can be leased any more."""


class EnvPool:
    def __init__(self, services: list[ServiceSpec | AsyncEnvClient | str], *, timeout_s: float = 120.0,
                 replace_timeout_s: float = 60.0):
        self.replace_timeout_s = replace_timeout_s
        self._specs: list[tuple[AsyncEnvClient, int | None]] = []
        for s in services:
            if isinstance(s, AsyncEnvClient):
                self._specs.append((s, None))
            elif isinstance(s, str):
                self._specs.append((AsyncEnvClient(s, timeout_s=timeout_s), None))
            else:
                self._specs.append((AsyncEnvClient(s.url, s.token, timeout_s=timeout_s), s.desktops))
        self._free: collections.deque[AsyncDesktopEnv] = collections.deque()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._all: dict[str, AsyncDesktopEnv] = {}
        self.replaced = 0
        self.lost = 0
        self.leases = 0

    @property
    def size(self) -> int:
        return len(self._all)

    @property
    def busy(self) -> int:
        return len(self._all) - len(self._free)

    async def start(self) -> "EnvPool":
        for client, want in self._specs:
            await client.health()
            have = await client.list()
            if want is not None:
                for _ in range(max(0, want - len(have))):
                    have.append(await client.create())
                have = have[:want]
            for e in have:
                env = AsyncDesktopEnv(client, e["id"], (e["width"], e["height"]))
                self._all[env.name] = env
                self._free.append(env)
        if not self._all:
            raise EnvError("EnvPool", "no desktops on any env service")
        logger.info("env pool: {} desktops on {} service(s)", self.size, len(self._specs))
        return self

    async def acquire(self) -> AsyncDesktopEnv:
        """The desktop freed longest ago (FIFO); waits for one. Raises ``EnvPoolExhausted`` once
        every desktop is lost, waiters included."""
        while not self._free:
            if not self._all:
                raise EnvPoolExhausted("EnvPool", f"every desktop was lost ({self.lost} could not be replaced)")
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                elif self._free:
                    self._wake()  # it was woken for a desktop it will not take: pass it on
                raise
        self.leases += 1
        return self._free.popleft()

    def _wake(self, all_of_them: bool = False) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if not all_of_them:
                    return

    async def release(self, env: AsyncDesktopEnv, broken: bool = False) -> None:
        """Give a desktop back; a broken one is replaced before it is leased again."""
        if env.name not in self._all:
            return
        if broken or not await env.alive():
            replacement = await self._replace(env)
            if replacement is None:
                if not self._all:
                    self._wake(all_of_them=True)  # they must learn that nothing is coming
                return
            env = replacement
        self._free.append(env)
        self._wake()

    async def _replace(self, env: AsyncDesktopEnv) -> AsyncDesktopEnv | None:
        del self._all[env.name]
        try:
            await env.client.close(env.id)
        except EnvError:
            pass  # it is dead already
        deadline = time.monotonic() + self.replace_timeout_s
        delay = 0.5
        while True:
            try:
                e = await env.client.create()
                new = AsyncDesktopEnv(env.client, e["id"], (e["width"], e["height"]))
                break
            except EnvError as err:  # the service may be restarting: give it replace_timeout_s
                if time.monotonic() + delay > deadline:
                    self.lost += 1
                    logger.error("env pool: could not replace {} ({}); pool now {} desktops", env.name, err,
                                 self.size)
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
        self.replaced += 1
        self._all[new.name] = new
        logger.warning("env pool: replaced dead desktop {} with {}", env.name, new.name)
        return new

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[AsyncDesktopEnv]:
        env = await self.acquire()
        broken = False
        try:
            yield env
        except EnvError:
            broken = True
            raise
        finally:
            await asyncio.shield(self.release(env, broken=broken))

    def stats(self) -> dict[str, int]:
        return {"desktops": self.size, "busy": self.busy, "replaced": self.replaced, "lost": self.lost,
                "leases": self.leases}

    async def aclose(self) -> None:
        for client, _ in self._specs:
            await client.aclose()
