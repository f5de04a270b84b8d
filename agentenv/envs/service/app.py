"""The env service's wiring: the ASGI app (``create_app``: the host, the limits and the token in
``app.state``, the routers of ``api`` and ``osworld``, the middleware, how errors are answered) and
``serve`` (the token, the sandbox check, the listening sockets, uvicorn)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
import socket
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentenv.envs.service import api, osworld
from agentenv.envs.service.host import DesktopHost, UnknownDesktop
from agentenv.envs.service.middleware import BodyLimit, OSWorldPorts
from agentenv.config import EnvServiceConfig
from agentenv.envs.desktop_types import DesktopError, DesktopSpec

# The OSWorld paths this service answers, for the answer to a path it does not know.
OSWORLD_PATHS = sorted({r.path.removeprefix(osworld.router.prefix) for r in osworld.router.routes}
                       - set(osworld.UNSUPPORTED) | {"/screenshot"})


def create_app(num: int = 1, token: str | None = None, settings: EnvServiceConfig | None = None,
               osworld_ports: list[int] | None = None) -> FastAPI:
    settings = settings or EnvServiceConfig()
    host = DesktopHost(num, DesktopSpec.from_settings(settings), osworld_ports)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio

        await anyio.to_thread.run_sync(host.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(host.close_all)

    app = FastAPI(title="agentenv env service", lifespan=lifespan)
    app.state.host, app.state.token = host, token
    app.state.settings, app.state.limits = settings, settings.limits
    limits = settings.limits
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if osworld_ports:
        app.add_middleware(OSWorldPorts, host=host)
    for router in (api.public, api.router, osworld.router):
        app.include_router(router)
    _answer_errors(app)
    return app


def _answer_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI's own answer echoes the input, and an input holding NaN or Infinity makes that
        # answer a 500: say what is wrong, not what was sent.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail or "invalid request"}, status_code=422)

    @app.exception_handler(DesktopError)
    async def _dead(request: Request, exc: DesktopError):
        return JSONResponse({"detail": str(exc), "dead": True}, status_code=503)

    @app.exception_handler(UnknownDesktop)
    async def _unknown(request: Request, exc: UnknownDesktop):
        return JSONResponse({"detail": str(exc), "dead": True}, status_code=404)

    @app.exception_handler(PermissionError)
    async def _perm(request: Request, exc: PermissionError):
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(StarletteHTTPException)
    async def _no_route(request: Request, exc: StarletteHTTPException):
        if exc.status_code != 404 or exc.detail != "Not Found":  # a route's own answer
            return await http_exception_handler(request, exc)
        osworld_path = request.scope.get("agentenv.osworld_path")
        if osworld_path is not None:
            return JSONResponse({"detail": f"no OSWorld route {request.method} {osworld_path} on this desktop; "
                                           f"served: {', '.join(OSWORLD_PATHS)}"}, status_code=404)
        return JSONResponse({"detail": f"no route {request.method} {request.url.path} on this env service "
                                       "(our API: /health, /envs, /envs/{id}/reset|step|evaluate|screenshot; "
                                       f"OSWorld's under /envs/{{id}}: {', '.join(OSWORLD_PATHS)})"},
                            status_code=404)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_secret(path: str | Path, secret: str) -> None:
    """Write ``secret`` to ``path`` so that only we can read it: a new file (mode 600, ours) renamed
    over the target, so a file or symlink someone else planted there (in /tmp, say) is replaced,
    never written through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secret.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _token(host: str, port: int, token: str | None, token_file: str | None) -> str:
    """The service's token: given (``--token``, ``ENV_TOKEN``) or generated and written to
    ``token_file`` (mode 600); never printed or logged."""
    token = token or os.environ.get("ENV_TOKEN")
    if not token:
        if not is_loopback(host):
            raise SystemExit(f"refusing to serve desktops on non-loopback address {host} without a token "
                             "(--token or ENV_TOKEN)")
        if not token_file:
            raise SystemExit("no token given and nowhere to put a generated one: pass --token-file PATH "
                             "(written mode 600), or set ENV_TOKEN")
        token = secrets.token_urlsafe(24)
    if token_file:
        write_secret(token_file, token)
        print(f"export ENV_SERVER_URL=http://{host}:{port} ENV_TOKEN=$(cat {shlex.quote(str(token_file))})",
              flush=True)
    else:
        print(f"export ENV_SERVER_URL=http://{host}:{port}  # ENV_TOKEN: the token you gave", flush=True)
    return token


def _check_sandbox(sandbox: bool, network: bool) -> None:
    if sandbox:
        from agentenv.envs.sandbox import SandboxError, check_sandbox

        try:
            check_sandbox()  # before any desktop: a missing tool is named, not found halfway
        except SandboxError as e:
            raise SystemExit(f"agentenv serve-envs: {e}") from None
    else:
        logger.warning("desktops are NOT sandboxed (--no-sandbox): tasks and agents run commands on this "
                       "host as the desktop user and can reach its loopback services")
    if sandbox and network:
        logger.warning("sandboxed desktops share this host's network (--sandbox-network): their commands can "
                       "reach its loopback services")


def _listen(host: str, ports: list[int]) -> list[socket.socket]:
    sockets = []
    for p in ports:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, p))
        except OSError as e:
            raise SystemExit(f"agentenv serve-envs: cannot listen on {host}:{p}: {e}") from None
        sockets.append(s)
    return sockets


def serve(num: int, host: str = "127.0.0.1", port: int = 8100, token: str | None = None,
          token_file: str | None = None, settings: EnvServiceConfig | None = None,
          osworld_port: int | None = None) -> None:
    """Run the service with ``settings`` (``agentenv serve-envs``' flags). The token is never printed
    or logged: it is given (``--token``, ``ENV_TOKEN``) or generated and written to ``token_file``
    (mode 600)."""
    import uvicorn

    settings = settings or EnvServiceConfig()
    os.environ.update(settings.downloads.to_env())  # what the setup steps read (DownloadCache.from_config)
    token = _token(host, port, token, token_file)
    _check_sandbox(settings.sandbox, settings.sandbox_network)
    # ``num`` OSWorld ports: a desktop takes the lowest free one when created, frees it when closed.
    ports = [osworld_port + i for i in range(num)] if osworld_port else []
    app = create_app(num, token, settings, osworld_ports=ports)
    sockets = _listen(host, [port, *ports])
    if ports:
        print(f"# OSWorld-style clients: desktop i at http://agentenv:$ENV_TOKEN@{host}:{osworld_port}+i "
              f"(ports {osworld_port}-{osworld_port + num - 1}; GET /envs says each desktop's osworld_port)",
              flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=sockets)
