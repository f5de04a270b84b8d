"""EnvPool: leases desktops across one or more env services.

Desktops are reused between tasks (reset is cheap); a desktop returned as broken, or found dead by
a health check, is closed and replaced by a new one on the same service (retried for
``replace_timeout_s``, so a service that restarts keeps its slots). A service that cannot make a
replacement loses that slot, and the pool says so in the log and in ``stats()``; once every slot
is lost, ``acquire`` raises ``EnvPoolExhausted`` to everyone waiting.

Services may come and go while it runs (a Ray cluster's nodes: ``agentenv.integrations.ray``):
``add_service`` brings a service's desktops in, ``drop_service`` takes a lost one's out (none is
replaced; the trajectories on its leased ones fail on their next request and rerun elsewhere). While ``expecting`` says services are on their way back, an empty
pool makes ``acquire`` wait instead of raising.
"""

from __future__ import annotations

import asyncio
import collections
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from loguru import logger

from agentenv.config import ServiceConfig
from agentenv.envs.client import AsyncDesktopEnv, AsyncEnvClient, EnvError


class EnvPoolExhausted(EnvError):
    """Every desktop of the pool was lost: nothing can be leased any more."""


class EnvPool:
    def __init__(self, services: list[ServiceConfig | AsyncEnvClient | str], *, timeout_s: float = 120.0,
                 replace_timeout_s: float = 60.0):
        self.replace_timeout_s = replace_timeout_s
        self.timeout_s = timeout_s
        self._specs: list[tuple[AsyncEnvClient, int | None]] = [self._client(s) for s in services]
        self._gone: set[AsyncEnvClient] = set()  # clients of services dropped: desktops never replaced
        self.expecting = 0            # services on their way back (set by whoever watches them)
        self.dropped = 0              # desktops taken out with a lost service
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

    def _client(self, s: ServiceConfig | AsyncEnvClient | str) -> tuple[AsyncEnvClient, int | None]:
        if isinstance(s, str):
            return AsyncEnvClient(s, timeout_s=self.timeout_s), None
        if isinstance(s, ServiceConfig):
            return AsyncEnvClient(s.url, s.token, timeout_s=self.timeout_s), s.desktops
        return s, None  # an AsyncEnvClient, or anything with its methods (the benchmarks' simulated services)

    @staticmethod
    async def _desktops_of(client: AsyncEnvClient, want: int | None) -> list[AsyncDesktopEnv]:
        await client.health()
        have = await client.list()
        if want is not None:
            for _ in range(max(0, want - len(have))):
                have.append(await client.create())
            have = have[:want]
        return [AsyncDesktopEnv(client, e.id, e.screen) for e in have]

    def _take(self, envs: list[AsyncDesktopEnv]) -> None:
        for env in envs:
            self._all[env.name] = env
            self._free.append(env)
        for _ in envs:
            self._wake()

    async def start(self) -> "EnvPool":
        for client, want in self._specs:
            self._take(await self._desktops_of(client, want))
        if not self._all:
            raise EnvError("EnvPool", "no desktops on any env service")
        logger.info("env pool: {} desktops on {} service(s)", self.size, len(self._specs))
        return self

    async def add_service(self, spec: ServiceConfig | AsyncEnvClient | str) -> int:
        """Bring a service's desktops into the running pool; returns how many. Raises ``EnvError``
        (and adds nothing) when the service does not answer."""
        client, want = self._client(spec)
        if any(c.url == client.url for c, _ in self._specs if c not in self._gone):
            await client.aclose()
            raise ValueError(f"env service {client.url} is already in this pool")
        try:
            envs = await self._desktops_of(client, want)
        except BaseException:
            await client.aclose()
            raise
        self._specs.append((client, want))
        self._take(envs)
        logger.info("env pool: +{} desktops from {}; pool now {}", len(envs), client.url, self.size)
        return len(envs)

    def drop_service(self, url: str, reason: str) -> int:
        """A service is gone (its node died, its actor restarts elsewhere): its free desktops leave
        the pool now, its leased ones are ignored when released; none is replaced. Returns how many
        were free."""
        url = url.rstrip("/")
        client = next((c for c, _ in self._specs if c.url == url and c not in self._gone), None)
        if client is None:
            return 0
        self._gone.add(client)
        mine = [e for e in self._all.values() if e.client is client]
        free = [e for e in mine if e in self._free]
        for e in free:
            self._free.remove(e)
        for e in mine:  # a leased one is ignored when its trajectory gives it back
            del self._all[e.name]
        self.dropped += len(mine)
        logger.warning("env pool: service {} lost ({}): {} desktops out ({} in use end their trajectories "
                       "and rerun elsewhere); pool now {}", url, reason, len(mine), len(mine) - len(free), self.size)
        if not self._all:
            self._wake(all_of_them=True)  # nothing is left: waiters must re-check ``expecting``
        return len(free)

    def services(self) -> list[str]:
        """The URLs of the services in the pool now (not dropped)."""
        return [c.url for c, _ in self._specs if c not in self._gone]

    def set_expecting(self, n: int) -> None:
        """How many services are expected back; 0 with an empty pool makes waiters give up."""
        self.expecting = n
        if n == 0 and not self._all:
            self._wake(all_of_them=True)

    async def acquire(self) -> AsyncDesktopEnv:
        """The desktop freed longest ago (FIFO); waits for one. Raises ``EnvPoolExhausted`` once
        every desktop is lost and none is expected back, waiters included."""
        while not self._free:
            if not self._all and not self.expecting:
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
        if self._all.get(env.name) is not env:  # replaced already, or its service was dropped
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
            if env.client in self._gone:  # the service was declared lost meanwhile: stop trying
                return None
            try:
                e = await env.client.create()
                new = AsyncDesktopEnv(env.client, e.id, e.screen)
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
                "leases": self.leases, "services": len(self._specs) - len(self._gone), "dropped": self.dropped}

    async def aclose(self) -> None:
        for client, _ in self._specs:
            await client.aclose()
