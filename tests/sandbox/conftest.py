"""Env services for the sandbox tests: small desktops, one service per mode, started once per module."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from agentenv.config import EnvServiceConfig
from agentenv.net import free_port
from agentenv.services import EnvService


class Svc:
    def __init__(self, service: EnvService, upload_root: Path):
        self.service, self.upload_root = service, upload_root
        self.url, self.h = service.url, {"Authorization": f"Bearer {service.token}"}

    def ids(self) -> list[str]:
        return [e["id"] for e in httpx.get(self.url + "/envs", headers=self.h).json()]

    def execute(self, did: str, cmd: str, timeout: float = 30) -> dict:
        """A shell command on desktop ``did``, through OSWorld's /execute route (what an agent or a
        task file can do)."""
        r = httpx.post(f"{self.url}/envs/{did}/execute", headers=self.h, timeout=timeout + 10,
                       json={"command": cmd, "shell": True, "timeout": timeout})
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, did: str, path: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/envs/{did}{path}", headers=self.h, timeout=60, **kw)


def start_service(tmp_path_factory, sandbox: bool, num: int, osworld_port: int | None = None) -> Svc:
    root = tmp_path_factory.mktemp("uploads")
    os.chmod(root, 0o755)
    log = tmp_path_factory.mktemp("log") / "env-service.log"
    settings = EnvServiceConfig(width=640, height=480, sandbox=sandbox, upload_roots=[str(root)])
    svc = EnvService(num=num, port=free_port(), settings=settings, log=log, osworld_port=osworld_port).start()
    return Svc(svc, root)
