"""The Ray actors of a fleet (agentenv/integrations/ray.py): an env service or a vLLM server as the
tied child of an actor, which exits with its server so that Ray restarts both."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from loguru import logger

from agentenv.config import EnvServiceConfig
from agentenv.net import free_port


class RaySetupError(RuntimeError):
    """The cluster cannot serve what was asked for (no node with the resource, actors that do not
    start in time, no actors to attach to)."""


@dataclass
class LLMEndpoint:
    """A model server that a Ray actor runs: where it is and the key it made (from the actor's reply)."""

    url: str
    api_key: str
    model: str


@dataclass
class Replacement:
    """A lost service or model server whose actor Ray restarted, and the fleet took back in."""

    kind: str        # env | vllm
    actor: str
    old_url: str
    new_url: str
    node_id: str


def log_dir() -> Path:
    """Where an actor's server logs: beside Ray's own logs of the session (gone with them)."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        return Path(node.get_logs_dir_path())
    return Path(tempfile.mkdtemp(prefix="agentenv-envs-"))


class ServerActor:
    """What both actors share: the server (``self.svc``, its process ``self.proc``) is watched, and if
    it exits on its own the actor exits too (ending what is left of the server's process group), so
    that Ray restarts both."""

    svc: Any
    proc: Any

    def __init__(self) -> None:
        self.node_id = ray.get_runtime_context().get_node_id()
        self._stopping = False

    def _serve(self, svc: Any, what: str) -> None:
        """Take ``svc`` (started) as this actor's server and watch it."""
        from agentenv.services import stop_group

        self.svc, self.proc = svc, svc.proc

        def watch() -> None:
            self.proc.wait()
            if not self._stopping:  # it died under us: let Ray restart the actor and a fresh server
                logger.error("{} (pid {}) exited with {}; the actor exits for Ray to restart it", what,
                             self.proc.pid, self.proc.returncode)
                stop_group(self.proc, grace=5.0)  # its children (vLLM's engine process) go too
                os._exit(1)

        threading.Thread(target=watch, daemon=True, name="agentenv-supervisor").start()

    def _where(self) -> dict[str, Any]:
        """The node and the processes that run for this actor (PIDs, for tests)."""
        from agentenv.procs import descendants

        pid = self.proc.pid
        return {"node_id": self.node_id, "actor_pid": os.getpid(), "service_pid": pid,
                "pids": [pid, *descendants(pid)]}

    def stop(self) -> None:
        """End the server (by its process group; an env service closes its desktops first)."""
        self._stopping = True
        self.svc.stop()


class EnvServiceActor(ServerActor):
    """One env service (``agentenv serve-envs``) on the node Ray placed this actor on, with ``settings``
    (the run's ``env.serve``) given whole.

    Not decorated: ``RayFleet`` applies ``ray.remote`` with the options of the run."""

    def __init__(self, desktops: int, settings: EnvServiceConfig, host: str | None = None):
        from agentenv.services import EnvService

        super().__init__()
        self.host = host or ray.util.get_node_ip_address()
        # A fresh token per incarnation, handed to the driver only as this actor's reply (never in
        # an argument Ray records, nor a log); the child gets it in its environment.
        token = secrets.token_urlsafe(24)
        logdir = log_dir()
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between the probe and the bind
            svc = EnvService(desktops, free_port(self.host), settings, token=token,
                             log=logdir / f"agentenv-envs-{os.getpid()}.log", host=self.host)
            try:
                svc.start()
                break
            except RuntimeError as e:
                last = e
        else:
            raise RuntimeError(f"env service on node {self.node_id[:12]} ({self.host}) did not start: {last}")
        self._serve(svc, f"env service {svc.url}")

    def info(self) -> dict[str, Any]:
        """Where the service is and how to talk to it, plus what runs for it."""
        return {"url": self.svc.url, "token": self.svc.token, "desktops": self.svc.num, **self._where()}


class VLLMServiceActor(ServerActor):
    """A vLLM server (``start_vllm_service.sh``, tied to this actor) on the node Ray placed it on
    (``ray.vllm_resources``: GPU nodes), on its node's address with an API key it makes itself (a
    new one, and a new port, per incarnation)."""

    def __init__(self, args: list[str], host: str | None = None, start_timeout_s: float = 900.0):
        from agentenv.services import VLLMService

        super().__init__()
        host = host or ray.util.get_node_ip_address()
        name = arg_of(args, "--served-model-name") or Path(arg_of(args, "--model") or "tiny-uitars").name
        run_dir = log_dir() / f"agentenv-vllm-{os.getpid()}"
        svc = VLLMService(port=free_port(host), extra=list(args), run_dir=run_dir, host=host, model=name,
                          api_key=secrets.token_urlsafe(24)).start(timeout=start_timeout_s)
        self._serve(svc, f"vLLM server {svc.url}")

    def info(self) -> dict[str, Any]:
        return {"url": self.svc.url, "api_key": self.svc.api_key, "model": self.svc.model, **self._where()}


def arg_of(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def stop_actors(handles: list[Any], timeout_s: float = 60.0) -> None:
    """Ask each actor to stop its server, then end the actors for good."""
    stops = []
    for h in handles:
        with contextlib.suppress(Exception):
            stops.append(h.stop.remote())
    with contextlib.suppress(Exception):
        ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
    for h in handles:
        with contextlib.suppress(Exception):
            ray.kill(h, no_restart=True)


def named(prefix: str) -> list[str]:
    """The actors of this namespace named <prefix><i>, in the order of i (the same in every process)."""
    names = [n for n in ray.util.list_named_actors() if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return sorted(names, key=lambda n: int(n[len(prefix):]))
