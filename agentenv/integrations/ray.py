"""Desktops and model servers across a Ray cluster: services as Ray actors, found and watched by
the scheduler.

Each node that should run desktops advertises a custom resource, one unit per desktop::

    ray start --head                                           # the scheduler's machine
    ray start --address HEAD:6379 --resources '{"desktop": 8}'   # each desktop machine

``RayFleet.start()`` starts one ``EnvServiceActor`` per such node (or actors of
``desktops_per_actor`` desktops each, placed by Ray wherever the resource is free). An actor runs
``agentenv serve-envs`` as its child, on its node's address, with the run's ``env.serve`` settings
(whole, as a local run's service gets them) and a bearer token it makes itself;
the scheduler learns every service (URL and token, from the actor's ``info()`` reply, never from a
log) without a list typed by hand. The data path stays HTTP between the scheduler and the env
services: screenshots never go through Ray's object store.

Model servers: URLs as without Ray, or ``RayFleet.start_vllm()`` (``ray.vllm_actors``): vLLM
servers as ``VLLMServiceActor``s where ``ray.vllm_resources`` fit (GPU nodes), each with an API key
it makes itself.

Loss: the fleet watches its actors of both kinds (Ray's actor table, and each server's
``/health``). When a node dies or a server exits, its service is dropped from the ``EnvPool`` (its
desktops are never replaced; the trajectories that ran on them fail with ``EnvDeadError`` and rerun
elsewhere, within ``scheduler.env_retries``) or its endpoint from the ``ServiceLLM`` (calls in
flight there fail and are retried on the others); Ray restarts the actor (``max_restarts``) where
its resources are free, and the fleet takes the new service's desktops, or the new server's URL and
key, back in. While actors are on their way back an empty pool, or an LLM with no endpoint up,
waits (``return_timeout_s``) instead of ending the run. Each server is its actor's tied child
(``spawn_tied``), and an actor whose server exits exits too: they live and die together.

Several schedulers (one per node, past ~10,000 trajectories): each takes the share ``rank`` of
``world_size`` of the env services (``start(rank, world_size)`` in the one that starts them,
``attach(rank, world_size)`` in the others; ``discover(rank=, world_size=)`` for a one-off look) and
the same share of the tasks (``tasks.rank`` / ``tasks.world_size``); every scheduler uses every
model server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
import ray
from loguru import logger

from agentenv.compat import side_task
from agentenv.config import EnvConfig, RayConfig, ServiceConfig
from agentenv.envs.pool import EnvPool
from agentenv.integrations.ray_actors import (EnvServiceActor, LLMEndpoint, RaySetupError, Replacement,
                                              VLLMServiceActor, named, stop_actors)

# Actors are named <prefix><i> in the run's namespace: other processes of the cluster find them by name.
ENV_PREFIX = "agentenv-envs-"
VLLM_PREFIX = "agentenv-vllm-"
_PENDING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")


def share(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """Scheduler ``rank`` of ``world_size``'s share: every world_size-th item from ``rank``, as
    ``TaskSource`` shards the tasks. Raises ``RaySetupError`` when the share is empty."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    mine = items[rank::world_size]
    if not mine:
        raise RaySetupError(f"scheduler {rank} of {world_size} gets no env service: there are {len(items)} (use "
                            "fewer schedulers, or ray.desktops_per_actor for more, smaller services)")
    return mine


@dataclass
class _Member:
    name: str
    handle: Any
    kind: str                       # env | vllm
    desktops: int = 0
    owned: bool = True              # started by this fleet (its shutdown stops it); False: attached to
    watched: bool = True            # this scheduler uses it (its share)
    url: str | None = None          # the server in the pool / the LLM now (None: not in it)
    incarnation: int = -1           # Ray's restart count when it was added
    node_id: str = ""
    down_since: float | None = None
    lost_url: str | None = None     # the URL it had when it was dropped
    info: dict[str, Any] | None = None

    @property
    def health_url(self) -> str:
        assert self.url is not None
        return self.url.removesuffix("/v1") + "/health"


class RayFleet:
    """Env-service and vLLM actors on a Ray cluster (``ray.init`` done by the caller), for an
    ``EnvPool`` and a ``ServiceLLM``.

        fleet = RayFleet(cfg.ray, cfg.env)
        endpoints = fleet.start_vllm()                # optional: model servers as actors
        llm = ServiceLLM([e.url for e in endpoints], api_key={e.url: e.api_key for e in endpoints})
        pool = await EnvPool(fleet.start()).start()
        async with fleet.watching(pool, llm):
            await scheduler.run()
        fleet.shutdown()
    """

    def __init__(self, rcfg: RayConfig, env: EnvConfig | None = None):
        self.cfg, self.env = rcfg, env or EnvConfig()
        self.members: list[_Member] = []
        self.lost: collections.Counter[str] = collections.Counter()      # by kind: dropped after the start
        self.returned: collections.Counter[str] = collections.Counter()  # by kind: taken back in
        self.replaced: list[Replacement] = []

    def of(self, kind: str) -> list[_Member]:
        return [m for m in self.members if m.kind == kind]

    # ------------------------------------------------------------------ start
    def plan(self) -> list[tuple[int, dict[str, Any]]]:
        """(desktops, ray options) per env actor, from the nodes that advertise the resource now."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        res = self.cfg.resource
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(res, 0) >= 1]
        if not nodes:
            raise RaySetupError(f"no node of the Ray cluster advertises the resource {res!r}: start the desktop "
                                f"machines with ray start --address HEAD:PORT --resources '{{\"{res}\": 8}}'")
        per = self.cfg.desktops_per_actor
        if per is None:  # one service per node, all its desktops; soft: after a loss, wherever it fits
            return [(int(n["Resources"][res]),
                     {"resources": {res: int(n["Resources"][res])},
                      "scheduling_strategy": NodeAffinitySchedulingStrategy(n["NodeID"], soft=True)})
                    for n in nodes]
        total = sum(int(n["Resources"][res]) for n in nodes)
        count = self.cfg.actors or total // per
        if count < 1:
            raise RaySetupError(f"the cluster has {total} {res!r} units, fewer than desktops_per_actor={per}")
        return [(per, {"resources": {res: per}})] * count

    def _ready(self, new: list[_Member], what: str, hint: str = "") -> list[dict[str, Any]]:
        """Wait for the new members' actors to be up (``start_timeout_s``) and take their replies;
        on failure everything this fleet started is stopped."""
        refs = [m.handle.info.remote() for m in new]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.start_timeout_s)
        if pending:
            self.shutdown()
            raise RaySetupError(f"{len(pending)} of {len(refs)} {what} did not start within "
                                f"{self.cfg.start_timeout_s:.0f}s (ray.start_timeout_s{hint})")
        try:
            infos = ray.get(refs)
        except ray.exceptions.RayError as e:
            self.shutdown()
            raise RaySetupError(f"one of the {what} failed to start: {e}") from e
        states = self._states(new)
        for m, info in zip(new, infos):
            m.url, m.node_id, m.info = info["url"], info["node_id"], info
            m.incarnation = states.get(m.handle._actor_id.hex(), ("ALIVE", 0))[1]
        return infos

    def start(self, rank: int = 0, world_size: int = 1) -> list[ServiceConfig]:
        """Start the env actors and wait for each service; returns the specs of scheduler
        ``rank``'s share (all of them for one scheduler), the ones this fleet watches."""
        plan = self.plan()
        ours = set(share(list(range(len(plan))), rank, world_size))  # an empty share fails before anything starts
        actor_cls = ray.remote(EnvServiceActor)
        new = []
        for i, (desktops, opts) in enumerate(plan):
            name = f"{ENV_PREFIX}{i}"
            handle = actor_cls.options(name=name, num_cpus=0, max_restarts=self.cfg.max_restarts,
                                       max_concurrency=4, **opts).remote(
                desktops, self.env.serve, self.cfg.host)
            new.append(_Member(name, handle, "env", desktops))
        self.members += new
        infos = self._ready(new, "env-service actors")
        for i, m in enumerate(new):
            m.watched = i in ours
        mine = [m for m in new if m.watched]
        logger.info("ray: {} env services, {} desktops on {} nodes{}", len(new), sum(m.desktops for m in new),
                    len({m.node_id for m in new}), f"; scheduler {rank} of {world_size} uses {len(mine)}"
                    if world_size > 1 else "")
        return [ServiceConfig(url=i["url"], token=i["token"]) for m, i in zip(new, infos) if m.watched]

    def start_vllm(self) -> list[LLMEndpoint]:
        """``ray.vllm_actors`` model servers as Ray actors where ``ray.vllm_resources`` fit, restarted
        by Ray like the env services; returns where they are."""
        resources = dict(self.cfg.vllm_resources)
        opts: dict[str, Any] = {"num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0),
                                "resources": resources, "max_restarts": self.cfg.max_restarts, "max_concurrency": 4}
        cls = ray.remote(VLLMServiceActor)
        new = [_Member(f"{VLLM_PREFIX}{i}", cls.options(name=f"{VLLM_PREFIX}{i}", **opts).remote(
                   self.cfg.vllm_args, self.cfg.host, self.cfg.start_timeout_s), "vllm")
               for i in range(self.cfg.vllm_actors)]
        self.members += new
        infos = self._ready(new, "vLLM actors", f"; resources {self.cfg.vllm_resources}")
        logger.info("ray: {} vLLM servers: {}", len(infos), ", ".join(i["url"] for i in infos))
        return [LLMEndpoint(i["url"], i["api_key"], i["model"]) for i in infos]

    def attach(self, rank: int = 0, world_size: int = 1, *, vllm: bool = True) -> list[ServiceConfig]:
        """Use the actors another process of this namespace started (a second scheduler): scheduler
        ``rank``'s share of the env services, and (``vllm``) every vLLM actor (``llm_endpoints()``).
        They are watched like our own; ``shutdown`` leaves them running. Waits ``start_timeout_s``
        for them."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while not (names := named(ENV_PREFIX)):
            if time.monotonic() > deadline:
                raise RaySetupError(f"no env-service actors ({ENV_PREFIX}<i>) in the Ray namespace "
                                    f"{self.cfg.namespace!r} after {self.cfg.start_timeout_s:.0f}s: start them "
                                    "first (agentenv run --ray as rank 0, or RayFleet.start)")
            time.sleep(1.0)
        new = [_Member(n, ray.get_actor(n), "env", owned=False) for n in share(names, rank, world_size)]
        new += [_Member(n, ray.get_actor(n), "vllm", owned=False) for n in (named(VLLM_PREFIX) if vllm else [])]
        self.members += new
        infos = self._ready(new, "attached actors")
        for m, info in zip(new, infos):
            m.desktops = info.get("desktops", 0)
        logger.info("ray: scheduler {} of {} attached to {} env services ({} desktops) and {} vLLM servers", rank,
                    world_size, len(self.of("env")), sum(m.desktops for m in self.of("env")), len(self.of("vllm")))
        return [ServiceConfig(url=m.url, token=m.info["token"]) for m in new if m.kind == "env" and m.url and m.info]

    def llm_endpoints(self) -> list[LLMEndpoint]:
        """The fleet's model servers in use now."""
        return [LLMEndpoint(m.url, m.info["api_key"], m.info["model"]) for m in self.of("vllm") if m.url and m.info]

    # ------------------------------------------------------------------ watch
    def _states(self, members: list[_Member] | None = None) -> dict[str, tuple[str, int]]:
        """actor id -> (state, restarts) from Ray's actor table (the GCS; no dashboard needed)."""
        from ray._private import state

        out: dict[str, tuple[str, int]] = {}
        for m in self.members if members is None else members:
            a = state.actors(actor_id=m.handle._actor_id.hex())
            if a:
                out[a["ActorID"]] = (a["State"], int(a.get("NumRestarts", 0)))
        return out

    async def _healthy(self, http: httpx.AsyncClient, url: str) -> bool | None:
        """True: it answers; False: nothing listens (gone); None: no answer in time (not sure)."""
        try:
            return (await http.get(url)).status_code == 200
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            return False
        except httpx.TimeoutException:
            return None

    async def refresh(self, http: httpx.AsyncClient, pool: EnvPool | None = None, llm: Any = None) -> None:
        """One look: drop the services and model servers that are gone, say how many are on their
        way back (at once: a call that finds no endpoint then waits instead of spending its
        retries), then add those that came (back)."""
        watched = [m for m in self.members if m.watched and (pool if m.kind == "env" else llm) is not None]
        states = await asyncio.to_thread(self._states, watched)
        now = time.monotonic()
        for m in watched:
            st, restarts = states.get(m.handle._actor_id.hex(), ("DEAD", 0))
            if m.url is None:
                continue
            why = None
            if st != "ALIVE" or restarts != m.incarnation:
                why = f"actor {m.name} is {st.lower()} (restarts {restarts})"
            elif await self._healthy(http, m.health_url) is False:
                # Nothing listens: the server is gone (its actor exits and Ray restarts it on a
                # new port). No answer in time is not proof (load): the calls' own timeouts judge that.
                why = "its /health refuses connections"
            if why is None:
                continue
            why = f"{why}; node {m.node_id[:12]}"
            if m.kind == "env":
                pool.drop_service(m.url, why)  # type: ignore[union-attr]
            else:
                llm.drop_endpoint(m.url, why)
            self.lost[m.kind] += 1
            m.lost_url, m.url, m.down_since = m.url, None, now
        self._tell_expecting(watched, states, now, pool, llm)
        added = False
        for m in watched:
            st, restarts = states.get(m.handle._actor_id.hex(), ("DEAD", 0))
            # ALIVE in the incarnation that was dropped: the old actor on its way out, not back
            if m.url is not None or st != "ALIVE" or restarts == m.incarnation:
                continue
            try:
                info = await asyncio.wait_for(m.handle.info.remote(), timeout=10.0)
                if m.kind == "env":
                    await pool.add_service(ServiceConfig(url=info["url"], token=info["token"]))  # type: ignore[union-attr]
                else:
                    await llm.add_endpoint(info["url"], info["api_key"])
            except Exception as e:  # not up yet, or it died again: next look
                logger.debug("{} actor {} not ready yet: {}", m.kind, m.name, e)
                continue
            m.url, m.node_id, m.info, m.incarnation, m.down_since = info["url"], info["node_id"], info, restarts, None
            self.returned[m.kind] += 1
            added = True
            if m.lost_url is not None:
                self.replaced.append(Replacement(m.kind, m.name, m.lost_url, m.url, m.node_id))
            logger.info("ray: {} actor {} back on node {}: {}", m.kind, m.name, m.node_id[:12], m.url)
        if added:
            self._tell_expecting(watched, states, now, pool, llm)

    def _tell_expecting(self, watched: list[_Member], states: dict[str, tuple[str, int]], now: float,
                        pool: EnvPool | None, llm: Any) -> None:
        """Out of the pool or the LLM, not dead for good, and lost less than ``return_timeout_s`` ago."""
        expecting: collections.Counter[str] = collections.Counter(
            m.kind for m in watched if m.url is None and m.down_since is not None
            and states.get(m.handle._actor_id.hex(), ("DEAD", 0))[0] != "DEAD"
            and now - m.down_since < self.cfg.return_timeout_s)
        if pool is not None:
            pool.set_expecting(expecting["env"])
        if llm is not None and self.of("vllm"):
            llm.set_expecting(expecting["vllm"])

    async def watch(self, pool: EnvPool | None = None, llm: Any = None) -> None:
        """Look every ``watch_s`` until cancelled."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as http:
            while True:
                await asyncio.sleep(self.cfg.watch_s)
                try:
                    await self.refresh(http, pool, llm)
                except Exception as e:  # the GCS unreachable for a moment must not end the run
                    logger.opt(exception=e).warning("ray: watching the actors failed this time")

    @contextlib.asynccontextmanager
    async def watching(self, pool: EnvPool | None = None, llm: Any = None) -> AsyncIterator["RayFleet"]:
        """Watch while the body runs (the env services for ``pool``, the vLLM actors for ``llm``,
        a ``ServiceLLM`` over their endpoints); the watcher ends with it."""
        async with side_task(self.watch(pool, llm), "ray: the watcher"):
            yield self

    def report(self) -> dict[str, Any]:
        """For a run's summary: the actors, what was lost and came back, which servers replaced which."""
        return {"env_services": len([m for m in self.of("env") if m.watched]), "lost": self.lost["env"],
                "returned": self.returned["env"], "vllm_actors": len(self.of("vllm")),
                "vllm_lost": self.lost["vllm"], "vllm_returned": self.returned["vllm"],
                "replaced": [vars(r) for r in self.replaced]}

    # ------------------------------------------------------------------ stop
    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every server this fleet started (closing its desktops), then its actors, for good;
        actors it attached to are left running."""
        stop_actors([m.handle for m in self.members if m.owned], timeout_s)
        self.members = []


def discover(timeout_s: float = 30.0, *, rank: int = 0, world_size: int = 1) -> list[ServiceConfig]:
    """The env services a fleet started in this Ray namespace (scheduler ``rank``'s share of them),
    found by actor name: for another process of the cluster (a second scheduler, a verl worker) that
    should use the same desktops. ``RayFleet.attach`` does the same and follows their restarts."""
    handles = [ray.get_actor(n) for n in share(named(ENV_PREFIX), rank, world_size)]
    infos = ray.get([h.info.remote() for h in handles], timeout=timeout_s)
    return [ServiceConfig(url=i["url"], token=i["token"]) for i in infos]


def discover_llm(timeout_s: float = 30.0) -> list[LLMEndpoint]:
    """The model servers a fleet started in this Ray namespace (``ray.vllm_actors``), by actor name."""
    handles = [ray.get_actor(n) for n in named(VLLM_PREFIX)]
    infos = ray.get([h.info.remote() for h in handles], timeout=timeout_s)
    return [LLMEndpoint(i["url"], i["api_key"], i["model"]) for i in infos]


def stay_on_loopback() -> None:
    """Keep Ray on loopback: a driver reaches a cluster on 127.0.0.1 at 127.0.0.1, and a cluster
    this process starts (``address="local"``, ``Cluster``) registers its nodes, and so binds its
    servers and our actors' services, on 127.0.0.1. Ray swaps loopback for the machine's outward
    address (``resolve_ip_for_localhost``) unless its switch for laptops is off; the switch is an
    environment variable (inherited by the raylets and workers started from here) read at import,
    so it is set in both places."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(rcfg: RayConfig, desktops: int) -> None:
    """Connect to the cluster ``rcfg.address`` names; ``local`` starts one of our own on loopback
    with ``desktops`` units of the resource. Our processes' output stays in Ray's log files."""
    kw: dict[str, Any] = {"namespace": rcfg.namespace, "log_to_driver": False}
    if rcfg.address == "local":  # _node_ip_address alone is not enough: Ray registers the node outward
        stay_on_loopback()
        kw.update(address="local", num_cpus=rcfg.local_cpus, resources={rcfg.resource: desktops},
                  include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        kw["address"] = rcfg.address
        host = rcfg.address.rsplit(":", 1)[0] if rcfg.address != "auto" else ""
        if host in ("127.0.0.1", "localhost", "[::1]"):
            stay_on_loopback()
            kw["_node_ip_address"] = "127.0.0.1"
    ray.init(**kw)
