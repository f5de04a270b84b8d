"""ASGI middleware of the env service: the request-body limit, and the OSWorld ports (a desktop's
own port, where it answers at OSWorld's paths)."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from agentenv.envs.service.host import DesktopHost


class BodyLimit:
    """A request body over ``max_bytes`` gets 413, whether it announces its length or streams it
    in chunks, before it is held in memory."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    r = JSONResponse({"detail": f"request body of {int(v)} bytes is over the limit of {limit} "
                                                "(serve-envs --max-body-bytes)"}, status_code=413)
                    return await r(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes "
                                             "(serve-envs --max-body-bytes)")
            return msg

        await self.app(scope, limited, send)


class OSWorldPorts:
    """A request that came in on a desktop's own port (``serve-envs --osworld-port BASE``:
    BASE+slot, ``DesktopHost.slots``) is that desktop's OSWorld in-VM server, at the paths OSWorld's
    client uses (``/screenshot``, ``/execute``, ...): the path gets the ``/envs/{id}`` prefix. Its
    client sends no bearer token, but ``requests`` sends the user and password of a URL
    (``vm_ip="agentenv:TOKEN@127.0.0.1"``) as Basic auth: the password is taken as the token."""

    def __init__(self, app: Any, host: DesktopHost):
        self.app, self.host = app, host

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        server = scope.get("server") or (None, None)
        if scope["type"] != "http" or server[1] not in self.host.osworld_ports:
            return await self.app(scope, receive, send)
        did = self.host.on_port(server[1])
        if did is None or scope["path"].startswith("/envs"):
            r = JSONResponse({"detail": f"no desktop on port {server[1]}"}, status_code=404)
            return await r(scope, receive, send)
        headers = []
        for k, v in scope.get("headers", []):
            if k == b"authorization" and v[:6].lower() == b"basic ":
                try:
                    password = base64.b64decode(v[6:].strip()).split(b":", 1)[1]
                except (ValueError, IndexError):
                    password = b""
                v = b"Bearer " + password
            headers.append((k, v))
        path = f"/envs/{did}{scope['path']}"
        await self.app({**scope, "path": path, "raw_path": path.encode(), "headers": headers,
                        "agentenv.osworld_path": scope["path"]}, receive, send)
