"""A fault injector for tests: a real HTTP proxy on loopback in front of a real server (the vLLM
server, the env service). It forwards every request unchanged, except the ones a test tells it to
break: answer with a status (429, 503...), drop the connection without an answer, hang, or forward the
request and rewrite the real answer (``rewrite(fn)``: fn gets the upstream body and returns what to send),
or go away and come back on its port as a killed and restarted server does (``kill()``, ``revive()``).

    async with FaultProxy(upstream_url) as proxy:
        proxy.fail(429, times=1, headers={"Retry-After": "0.1"})
        llm = ServiceLLM(proxy.url + "/v1", ...)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import ClientSession, ClientTimeout, web


@dataclass
class _Rule:
    kind: str                      # status | garbage | drop | hang | rewrite
    times: int
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""                 # only requests whose path contains this
    fn: Callable[[bytes], bytes] | None = None


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        self.upstream = upstream.rstrip("/")
        self.host, self.port = host, port
        self.url = ""
        self.requests: list[str] = []       # paths seen, in order
        self.injected: list[str] = []       # "kind path" for every fault injected
        self._rules: list[_Rule] = []
        self._hanging: set[asyncio.Future] = set()
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    # ------------------------------------------------------------------ faults
    def fail(self, status: int, times: int = 1, headers: dict[str, str] | None = None, path: str = "") -> None:
        self._rules.append(_Rule("status", times, status, headers or {}, path))

    def garbage(self, times: int = 1, path: str = "") -> None:
        """Answer 200 with a body that is not JSON."""
        self._rules.append(_Rule("garbage", times, 200, path=path))

    def drop(self, times: int = 1, path: str = "") -> None:
        """Close the connection without answering."""
        self._rules.append(_Rule("drop", times, path=path))

    def hang(self, times: int = 10 ** 9, path: str = "") -> None:
        """Accept and never answer."""
        self._rules.append(_Rule("hang", times, path=path))

    def rewrite(self, fn: Callable[[bytes], bytes], times: int = 1, path: str = "") -> None:
        """Forward the request, then send ``fn(real answer's body)`` instead of the real body."""
        self._rules.append(_Rule("rewrite", times, path=path, fn=fn))

    def clear(self) -> None:
        self._rules.clear()
        for f in self._hanging:
            f.cancel()

    def _rule_for(self, path: str) -> _Rule | None:
        for r in self._rules:
            if r.times > 0 and r.path in path:
                r.times -= 1
                return r
        return None

    # ------------------------------------------------------------------ server
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        self.requests.append(path)
        rule = self._rule_for(request.path)
        body = await request.read()
        if rule is not None:
            self.injected.append(f"{rule.kind} {request.path}")
        if rule is not None and rule.kind != "rewrite":
            if rule.kind == "status":
                return web.json_response({"error": {"message": f"injected {rule.status}"}}, status=rule.status,
                                         headers=rule.headers)
            if rule.kind == "garbage":
                return web.Response(body=b"\x00not json\xff", status=200, content_type="application/json")
            if rule.kind == "drop":
                request.transport.close()
                raise web.HTTPInternalServerError()  # never reaches the client: the connection is gone
            fut = asyncio.get_running_loop().create_future()
            self._hanging.add(fut)
            try:
                await fut
            finally:
                self._hanging.discard(fut)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + path, data=body,
                                         headers=headers) as up:
            data = await up.read()
            if rule is not None and rule.fn is not None:
                data = rule.fn(data)
            out = {k: v for k, v in up.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
            return web.Response(body=data, status=up.status, headers=out)

    async def _listen(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{self.port}"

    async def kill(self) -> None:
        """Go away as a killed server does: open connections closed, new ones refused."""
        self.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def revive(self) -> None:
        """Listen again on the same port, as a restarted server does."""
        await self._listen()

    async def __aenter__(self) -> "FaultProxy":
        self._session = ClientSession(timeout=ClientTimeout(total=600), auto_decompress=False)
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
        if self._session is not None:
            await self._session.close()
