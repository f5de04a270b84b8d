"""Desktops across a Ray cluster: env services as Ray actors, found and watched by the scheduler.

Each node that should run desktops advertises a custom resource, one unit per desktop::

    ray start --head                                           # the scheduler's machine
    ray start --address HEAD:6379 --resources '{"desktop": 8}'   # each desktop machine

``RayEnvFleet`` starts one ``EnvServiceActor`` per such node (or actors of ``desktops_per_actor``
desktops each, placed by Ray wherever the resource is free). An actor runs ``agentenv serve-envs``
as its child, on its node's address, with a bearer token it makes itself; the scheduler learns
every service (URL and token, from the actor's ``info()`` reply, never from a log) without a list
typed by hand. The data path stays HTTP between the scheduler and the env services: screenshots
never go through Ray's object store.

Node loss: the fleet watches its actors (Ray's actor table, and each service's ``/health``).
When a node dies, its service is dropped from the ``EnvPool`` (its desktops are never replaced;
the trajectories that ran on them fail with ``EnvDeadError`` and rerun elsewhere, within
``scheduler.env_retries``), Ray restarts the actor (``max_restarts``) where the resource is free
(the node that comes back, another one), and the fleet brings the new service's desktops into the
pool. While actors are on their way back an empty pool waits (``return_timeout_s``) instead of
ending the run. The serve-envs child is tied to its actor (``spawn_tied``): an actor that dies
takes its env service and desktops with it.

Model servers: URLs as without Ray, or ``start_vllm_actors`` (``ray.vllm_actors``): vLLM servers as
Ray actors where ``ray.vllm_resources`` fit (GPU nodes), each with an API key it makes itself;
not restarted (``ServiceLLM`` fails over to the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import ray
from loguru import logger

from agentenv.config import EnvConfig, RayConfig
from agentenv.envs.pool import EnvPool, ServiceSpec

ACTOR_PREFIX = "agentenv-envs-"  # env-service actors are named agentenv-envs-<i> in the run's namespace
_PENDING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")


class RaySetupError(RuntimeError):
    """The cluster cannot serve the desktops asked for (no node with the resource, actors that do
    not start in time)."""


def _log_dir() -> Path:
    """Where an actor's env service logs: beside Ray's own logs of the session (gone with them)."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        return Path(node.get_logs_dir_path())
    return Path(tempfile.mkdtemp(prefix="agentenv-envs-"))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EnvServiceActor:
    """One env service (``agentenv serve-envs``) on the node Ray placed this actor on.

    Not decorated: ``RayEnvFleet`` applies ``ray.remote`` with the options of the run. If the env
    service dies on its own, the actor exits so that Ray restarts both."""

    def __init__(self, desktops: int, width: int, height: int, host: str | None = None, sandbox: bool = True,
                 network: bool = False):
        from agentenv.procs import descendants
        from agentenv.services import EnvService

        self._descendants = descendants
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = host or ray.util.get_node_ip_address()
        # A fresh token per incarnation, handed to the driver only as this actor's reply (never in
        # an argument Ray records, nor a log); the child gets it in its environment.
        token = secrets.token_urlsafe(24)
        logdir = _log_dir()
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between the probe and the bind
            self.svc = EnvService(desktops, _free_port(self.host), width, height, token=token,
                                  log=logdir / f"agentenv-envs-{os.getpid()}.log", host=self.host,
                                  sandbox=sandbox, network=network)
            try:
                self.svc.start()
                break
            except RuntimeError as e:
                last = e
        else:
            raise RuntimeError(f"env service on node {self.node_id[:12]} ({self.host}) did not start: {last}")
        self._stopping = False
        threading.Thread(target=self._supervise, daemon=True, name="agentenv-envs-supervisor").start()

    def _supervise(self) -> None:
        self.svc.proc.wait()
        if not self._stopping:  # it died under us: let Ray restart the actor and a fresh service
            logger.error("env service {} exited with {}; the actor exits for Ray to restart it",
                         self.svc.url, self.svc.proc.returncode)
            os._exit(1)

    def info(self) -> dict[str, Any]:
        """Where the service is and how to talk to it, plus what runs for it (PIDs, for tests)."""
        pid = self.svc.proc.pid
        return {"url": self.svc.url, "token": self.svc.token, "desktops": self.svc.num, "node_id": self.node_id,
                "actor_pid": os.getpid(), "service_pid": pid, "pids": [pid, *self._descendants(pid)]}

    def stop(self) -> None:
        """Close the desktops and end the service (by its process group)."""
        self._stopping = True
        self.svc.stop()


class VLLMServiceActor:
    """A vLLM server (``start_vllm_service.sh``, tied to this actor) on the node Ray placed it on
    (``ray.vllm_resources``: GPU nodes), on its node's address with an API key it makes itself."""

    def __init__(self, args: list[str], host: str | None = None, start_timeout_s: float = 900.0):
        from agentenv.services import VLLMService

        self.node_id = ray.get_runtime_context().get_node_id()
        host = host or ray.util.get_node_ip_address()
        name = _arg(args, "--served-model-name") or Path(_arg(args, "--model") or "tiny-uitars").name
        run_dir = _log_dir() / f"agentenv-vllm-{os.getpid()}"
        self.svc = VLLMService(port=_free_port(host), extra=list(args), run_dir=run_dir, host=host, model=name,
                               api_key=secrets.token_urlsafe(24)).start(timeout=start_timeout_s)

    def info(self) -> dict[str, Any]:
        pid = self.svc.proc.pid if self.svc.proc else None
        return {"url": self.svc.url, "api_key": self.svc.api_key, "model": self.svc.model, "node_id": self.node_id,
                "actor_pid": os.getpid(), "pids": [pid] if pid else []}

    def stop(self) -> None:
        self.svc.stop()


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def start_vllm_actors(rcfg: RayConfig) -> tuple[list[Any], list[dict[str, Any]]]:
    """``rcfg.vllm_actors`` model servers as Ray actors: their handles and ``info()`` (URL, API key,
    served name). Not restarted by Ray: ``ServiceLLM`` fails over to the others when one is lost."""
    resources = dict(rcfg.vllm_resources)
    opts: dict[str, Any] = {"num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0),
                            "resources": resources, "max_restarts": 0}
    cls = ray.remote(VLLMServiceActor)
    handles = [cls.options(name=f"agentenv-vllm-{i}", **opts).remote(rcfg.vllm_args, rcfg.host)
               for i in range(rcfg.vllm_actors)]
    refs = [h.info.remote() for h in handles]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=rcfg.start_timeout_s)
    try:
        if pending:
            raise RaySetupError(f"{len(pending)} of {len(refs)} vLLM actors did not start within "
                                f"{rcfg.start_timeout_s:.0f}s (ray.start_timeout_s; resources {rcfg.vllm_resources})")
        infos = ray.get(refs)
    except Exception as e:
        stop_actors(handles)
        if isinstance(e, RaySetupError):
            raise
        raise RaySetupError(f"a vLLM actor failed to start: {e}") from e
    logger.info("ray: {} vLLM servers: {}", len(infos), ", ".join(i["url"] for i in infos))
    return handles, infos


def stop_actors(handles: list[Any], timeout_s: float = 60.0) -> None:
    """Ask each actor to stop its service, then end the actors for good."""
    stops = []
    for h in handles:
        with contextlib.suppress(Exception):
            stops.append(h.stop.remote())
    with contextlib.suppress(Exception):
        ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
    for h in handles:
        with contextlib.suppress(Exception):
            ray.kill(h, no_restart=True)


@dataclass
class _Member:
    name: str
    handle: Any
    desktops: int
    url: str | None = None          # the service in the pool now (None: not in it)
    incarnation: int = -1           # Ray's restart count when it was added
    node_id: str = ""
    down_since: float | None = None
    info: dict[str, Any] | None = None


class RayEnvFleet:
    """Env-service actors on a Ray cluster (``ray.init`` done by the caller), for an ``EnvPool``.

        fleet = RayEnvFleet(cfg.ray, cfg.env)
        pool = await EnvPool(fleet.start()).start()
        async with fleet.watching(pool):
            await scheduler.run()
        fleet.shutdown()
    """

    def __init__(self, rcfg: RayConfig, env: EnvConfig | None = None):
        self.cfg, self.env = rcfg, env or EnvConfig()
        self.members: list[_Member] = []
        self.added = 0    # services brought (back) into the pool after the start
        self.dropped = 0  # services taken out of it

    # ------------------------------------------------------------------ start
    def plan(self) -> list[tuple[int, dict[str, Any]]]:
        """(desktops, ray options) per actor, from the nodes that advertise the resource now."""
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

    def start(self) -> list[ServiceSpec]:
        """Start the actors and wait for each service; returns their specs for ``EnvPool``."""
        actor_cls = ray.remote(EnvServiceActor)
        for i, (desktops, opts) in enumerate(self.plan()):
            name = f"{ACTOR_PREFIX}{i}"
            handle = actor_cls.options(name=name, num_cpus=0, max_restarts=self.cfg.max_restarts,
                                       max_concurrency=4, **opts).remote(
                desktops, self.env.width, self.env.height, self.cfg.host, self.env.sandbox, self.env.sandbox_network)
            self.members.append(_Member(name, handle, desktops))
        refs = [m.handle.info.remote() for m in self.members]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.start_timeout_s)
        if pending:
            self.shutdown()
            raise RaySetupError(f"{len(pending)} of {len(refs)} env-service actors did not start within "
                                f"{self.cfg.start_timeout_s:.0f}s (ray.start_timeout_s)")
        try:
            infos = ray.get(refs)
        except ray.exceptions.RayError as e:
            self.shutdown()
            raise RaySetupError(f"an env-service actor failed to start: {e}") from e
        states = self._states()
        for m, info in zip(self.members, infos):
            m.url, m.node_id, m.info = info["url"], info["node_id"], info
            m.incarnation = states.get(m.handle._actor_id.hex(), ("ALIVE", 0))[1]
        logger.info("ray: {} env services, {} desktops on {} nodes", len(self.members),
                    sum(m.desktops for m in self.members), len({m.node_id for m in self.members}))
        return [ServiceSpec(i["url"], i["token"]) for i in infos]

    # ------------------------------------------------------------------ watch
    def _states(self) -> dict[str, tuple[str, int]]:
        """actor id -> (state, restarts) from Ray's actor table (the GCS; no dashboard needed)."""
        from ray._private import state

        out: dict[str, tuple[str, int]] = {}
        for m in self.members:
            a = state.actors(actor_id=m.handle._actor_id.hex())
            if a:
                out[a["ActorID"]] = (a["State"], int(a.get("NumRestarts", 0)))
        return out

    async def _healthy(self, http: httpx.AsyncClient, url: str) -> bool | None:
        """True: it answers; False: nothing listens (gone); None: no answer in time (not sure)."""
        try:
            return (await http.get(url + "/health")).status_code == 200
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            return False
        except httpx.TimeoutException:
            return None

    async def refresh(self, pool: EnvPool, http: httpx.AsyncClient) -> None:
        """One look: drop the services that are gone, add those that came (back)."""
        states = await asyncio.to_thread(self._states)
        now = time.monotonic()
        expecting = 0
        for m in self.members:
            st, restarts = states.get(m.handle._actor_id.hex(), ("DEAD", 0))
            if m.url is not None:
                why = None
                if st != "ALIVE" or restarts != m.incarnation:
                    why = f"actor {m.name} is {st.lower()} (restarts {restarts})"
                elif await self._healthy(http, m.url) is False:
                    # Nothing listens: the service is gone (its actor exits and Ray restarts it on a
                    # new port). No answer in time is not proof (load): the steps' own timeouts judge that.
                    why = "its /health refuses connections"
                if why is None:
                    continue
                pool.drop_service(m.url, f"{why}; node {m.node_id[:12]}")
                self.dropped += 1
                m.url, m.down_since = None, now
            if st == "ALIVE":
                try:
                    info = await asyncio.wait_for(m.handle.info.remote(), timeout=10.0)
                    await pool.add_service(ServiceSpec(info["url"], info["token"]))
                except Exception as e:  # not up yet, or it died again: next look
                    logger.debug("env-service actor {} not ready yet: {}", m.name, e)
                    expecting += 1
                    continue
                m.url, m.node_id, m.info, m.incarnation, m.down_since = info["url"], info["node_id"], info, restarts, None
                self.added += 1
                logger.info("ray: env service {} back on node {} ({} desktops)", m.name, m.node_id[:12], m.desktops)
            elif st in _PENDING and m.down_since is not None and now - m.down_since < self.cfg.return_timeout_s:
                expecting += 1
        pool.set_expecting(expecting)

    async def watch(self, pool: EnvPool) -> None:
        """Look every ``watch_s`` until cancelled."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as http:
            while True:
                await asyncio.sleep(self.cfg.watch_s)
                try:
                    await self.refresh(pool, http)
                except Exception as e:  # the GCS unreachable for a moment must not end the run
                    logger.opt(exception=e).warning("ray: watching the env services failed this time")

    @contextlib.asynccontextmanager
    async def watching(self, pool: EnvPool) -> AsyncIterator["RayEnvFleet"]:
        """Watch while the body runs; the watcher ends with it."""
        task = asyncio.ensure_future(self.watch(pool))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ stop
    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every service (closing its desktops), then the actors, for good."""
        stop_actors([m.handle for m in self.members], timeout_s)
        self.members = []


def discover(timeout_s: float = 30.0) -> list[ServiceSpec]:
    """The env services a fleet started in this Ray namespace, found by actor name: for another
    process of the cluster (a second scheduler, a verl worker) that should use the same desktops."""
    handles = [ray.get_actor(n) for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
    infos = ray.get([h.info.remote() for h in handles], timeout=timeout_s)
    return [ServiceSpec(i["url"], i["token"]) for i in infos]


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
