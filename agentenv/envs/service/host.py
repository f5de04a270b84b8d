"""``DesktopHost``: the desktops of one service process, their OSWorld ports and their metrics."""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

from loguru import logger

from agentenv.envs.wire import DesktopInfo
from agentenv.envs.desktop import Desktop, make_desktop
from agentenv.envs.desktop_types import DesktopError, DesktopSpec


class UnknownDesktop(LookupError):
    """A desktop id this service does not have: for a client, that desktop is gone."""


class DesktopHost:
    """Owns the desktops of one service process."""

    def __init__(self, num: int, spec: DesktopSpec, osworld_ports: list[int] | None = None):
        self.spec = spec
        self.desktops: dict[str, Desktop] = {}
        # OSWorld ports (serve-envs --osworld-port): slot i is port osworld_ports[i]; a desktop takes
        # the lowest free slot when it is created and frees it when it is closed.
        self.osworld_ports = list(osworld_ports or [])
        self.slots: list[str | None] = [None] * len(self.osworld_ports)
        self._lock = threading.Lock()
        self._n = 0
        self.num = num
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.m_steps = Counter("agentenv_env_steps", "actions executed", registry=self.registry)
        self.m_resets = Counter("agentenv_env_resets", "resets", ["outcome"], registry=self.registry)
        self.m_step_s = Histogram("agentenv_env_step_seconds", "action + screenshot time", registry=self.registry,
                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5))
        self.m_reset_s = Histogram("agentenv_env_reset_seconds", "reset time", registry=self.registry,
                                   buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.m_desktops = Gauge("agentenv_env_desktops", "desktops alive", registry=self.registry)

    def create(self, width: int | None = None, height: int | None = None) -> Desktop:
        with self._lock:
            self._n += 1
            did = f"d{self._n}-{secrets.token_hex(3)}"
            slot = next((i for i, s in enumerate(self.slots) if s is None), None)
            if slot is not None:
                self.slots[slot] = did  # taken while the desktop starts: two creates get two slots
        spec = dataclasses.replace(self.spec, width=width or self.spec.width, height=height or self.spec.height)
        try:
            d = make_desktop(did, spec).start()
        except BaseException as e:
            self._free_slot(did)
            if isinstance(e, (OSError, subprocess.SubprocessError)):  # answered 503 like any desktop not up
                raise DesktopError(f"could not start a desktop: {type(e).__name__}: {e}") from e
            raise
        with self._lock:
            self.desktops[did] = d
        self.m_desktops.set(len(self.desktops))
        return d

    def osworld_port(self, did: str) -> int | None:
        """The port where desktop ``did`` answers as OSWorld's in-VM server, if it has one."""
        with self._lock:
            return self.osworld_ports[self.slots.index(did)] if did in self.slots else None

    def on_port(self, port: int) -> str | None:
        """The desktop that answers on OSWorld port ``port`` now (None: none, or still starting)."""
        with self._lock:
            did = self.slots[self.osworld_ports.index(port)] if port in self.osworld_ports else None
            return did if did in self.desktops else None

    def info(self, d: Desktop) -> DesktopInfo:
        return DesktopInfo(id=d.id, display=d.display, width=d.width, height=d.height, task=d.task_id,
                           alive=d.alive(), sandboxed=d.sandboxed, osworld_port=self.osworld_port(d.id))

    def _free_slot(self, did: str) -> None:
        with self._lock:
            if did in self.slots:
                self.slots[self.slots.index(did)] = None

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(lambda _: self.create(), range(self.num)))
        logger.info("env service: {} desktops up", len(self.desktops))

    def get(self, did: str) -> Desktop:
        d = self.desktops.get(did)
        if d is None:
            raise UnknownDesktop(f"no desktop {did!r} on this service (closed, or the service restarted)")
        return d

    def close(self, did: str) -> None:
        with self._lock:
            d = self.desktops.pop(did, None)
        if d is not None:
            d.close()
        self._free_slot(did)  # after the close: the next desktop on this port is a fresh one
        self.m_desktops.set(len(self.desktops))

    def close_all(self) -> None:
        for did in list(self.desktops):
            self.close(did)
