"""EnvPool: leases desktops across one or more env services.

Desktops are reused between tasks (reset is cheap); a desktop returned as broken, or found dead by
a health check, is closed and replaced by a new one on the same service. A service that cannot
make a replacement loses that slot, and the pool says so in the log and in ``stats()``.
"""

from __future__ import annotations

import asyncio
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


class EnvPool:
    def __init__(self, services: list[ServiceSpec | AsyncEnvClient | str], *, timeout_s: float = 120.0):
        self._specs: list[tuple[AsyncEnvClient, int | None]] = []
        for s in services:
            if isinstance(s, AsyncEnvClient):
                self._specs.append((s, None))
            elif isinstance(s, str):
                self._specs.append((AsyncEnvClient(s, timeout_s=timeout_s), None))
            else:
                self._specs.append((AsyncEnvClient(s.url, s.token, timeout_s=timeout_s), s.desktops))
        self._free: asyncio.Queue[AsyncDesktopEnv] = asyncio.Queue()
        self._all: dict[str, AsyncDesktopEnv] = {}
        self.replaced = 0
        self.lost = 0
        self.leases = 0

    @property
    def size(self) -> int:
        return len(self._all)

    @property
    def busy(self) -> int:
        return len(self._all) - self._free.qsize()

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
                self._free.put_nowait(env)
        if not self._all:
            raise EnvError("EnvPool", "no desktops on any env service")
        logger.info("env pool: {} desktops on {} service(s)", self.size, len(self._specs))
        return self

    async def acquire(self) -> AsyncDesktopEnv:
        if not self._all:
            raise EnvError("EnvPool", "every desktop was lost")
        env = await self._free.get()
        self.leases += 1
        return env

    async def release(self, env: AsyncDesktopEnv, broken: bool = False) -> None:
        """Give a desktop back; a broken one is replaced before it is leased again."""
        if env.name not in self._all:
            return
        if broken or not await env.alive():
            replacement = await self._replace(env)
            if replacement is None:
                return
            env = replacement
        self._free.put_nowait(env)

    async def _replace(self, env: AsyncDesktopEnv) -> AsyncDesktopEnv | None:
        del self._all[env.name]
        try:
            await env.client.close(env.id)
        except EnvError:
            pass  # it is dead already
        try:
            e = await env.client.create()
            new = AsyncDesktopEnv(env.client, e["id"], (e["width"], e["height"]))
        except EnvError as e:
            self.lost += 1
            logger.error("env pool: could not replace {} ({}); pool now {} desktops", env.name, e, self.size)
            return None
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
