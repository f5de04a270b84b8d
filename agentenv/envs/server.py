"""The env service: N real desktops behind an authenticated HTTP API (FastAPI + uvicorn).

    agentenv serve-envs --num 4 --host 127.0.0.1 --port 8100 [--token T]

Routes (all but /health need ``Authorization: Bearer <token>``):

    GET  /health                         liveness, desktop count
    GET  /settings                       the settings it runs with (config.EnvServiceConfig)
    GET  /metrics                        Prometheus metrics
    GET  /envs                           list desktops
    POST /envs                           create one          DELETE /envs/{id}   close one
    POST /envs/{id}/reset   {task, image_size?}      -> screenshot + info
    POST /envs/{id}/step    {action, image_size?}    -> screenshot + info (errors in info)
    GET  /envs/{id}/screenshot                       -> PNG
    POST /envs/{id}/evaluate {task, last_action?}    -> reward
    GET  /envs/{id}/alive

Per desktop, the OSWorld in-VM server paths used by OSWorld-style clients and task configs, under
``/envs/{id}``: /screenshot, /execute, /setup/execute, /setup/launch, /setup/open_file,
/setup/activate_window, /setup/upload, /file, /screen_size, /platform, /cursor_position,
/list_directory, /setup/close_window, /setup/change_wallpaper, and on sandboxed desktops only
/terminal (the terminal's text over AT-SPI), /accessibility (the AT-SPI tree as OSWorld's XML,
``{"AT": xml}``; bounded, see sandbox.A11yLimits), /run_python and /run_bash_script (plain desktops:
501 for the first two, 403 for the others).
Unlike OSWorld's server these are authenticated, commands run as the unprivileged desktop user,
and ``python -c "import pyautogui; ..."`` commands go through the pyautogui allow-list instead of
running as code.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import ipaddress
import os
import secrets
import shlex
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel, Field

from agentenv.config import DownloadConfig, EnvServiceConfig
from agentenv.envs.actions import ActionError, check_action, parse_pyautogui
from agentenv.envs.tasks.evaluate import EvaluatorError, evaluate
from agentenv.envs.tasks.setup import TaskSetupError
from agentenv.envs.xvfb import DesktopError, DesktopSpec, LocalDesktop, make_desktop
from agentenv.types import Action, Task


class ResetRequest(BaseModel):
    task: dict[str, Any] | None = None
    image_size: tuple[int, int] | None = Field(None, description="resize the screenshot to (w, h)")


class StepRequest(BaseModel):
    action: dict[str, Any]
    image_size: tuple[int, int] | None = None
    screenshot: bool = True


class EvaluateRequest(BaseModel):
    task: dict[str, Any]
    last_action: str | None = None


class CreateRequest(BaseModel):
    width: int | None = None
    height: int | None = None


class ExecuteRequest(BaseModel):
    command: list[str] | str
    shell: bool = False
    timeout: float = Field(120.0, allow_inf_nan=False)


class RunPythonRequest(BaseModel):
    code: str


class RunBashRequest(BaseModel):
    script: str
    timeout: float = Field(30.0, allow_inf_nan=False)
    working_dir: str | None = None


class PathRequest(BaseModel):
    path: str


class CloseWindowRequest(BaseModel):
    window_name: str
    strict: bool = False
    by_class: bool = False


# /list_directory: run inside the desktop (its own view of the filesystem, its user's rights).
_LIST_DIRECTORY = r"""
import json, os, sys
def tree(p, depth):
    node = {"type": "directory", "name": os.path.basename(p.rstrip("/")) or p, "children": []}
    if depth > 8:
        return node
    for e in sorted(os.scandir(p), key=lambda e: e.name):
        if e.is_dir(follow_symlinks=False):
            node["children"].append(tree(e.path, depth + 1))
        else:
            node["children"].append({"type": "file", "name": e.name})
    return node
p = os.path.expanduser(sys.argv[1])
if not os.path.isdir(p):
    print(json.dumps({"error": "not a directory: " + p})); sys.exit(0)
print(json.dumps({"directory_tree": tree(p, 0)}))
"""


class LaunchRequest(BaseModel):
    command: list[str] | str
    shell: bool = False


def _encode(img, image_size: tuple[int, int] | None) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    if image_size and tuple(image_size) != img.size:
        img = img.resize(tuple(image_size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode(), img.size


def _argv(command: list[str] | str) -> list[str]:
    """A command as argv; a 422 that says why when it cannot be one."""
    try:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
    except ValueError as e:
        raise HTTPException(422, f"cannot split command: {e}") from e
    if not argv or not argv[0]:
        raise HTTPException(422, "empty command")
    if any("\0" in a for a in argv):
        raise HTTPException(422, "command contains a NUL byte")
    return argv


def _pyautogui_code(command: list[str] | str) -> str | None:
    """The code of an OSWorld-style ``python -c "import pyautogui; ..."`` command, else None."""
    argv = _argv(command)
    if len(argv) == 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-c" \
            and "pyautogui" in argv[2]:
        return argv[2].replace("; ", "\n")
    return None


class UnknownDesktop(LookupError):
    """A desktop id this service does not have: for a client, that desktop is gone."""


class DesktopHost:
    """Owns the desktops of one service process."""

    def __init__(self, num: int, spec: DesktopSpec, osworld_ports: list[int] | None = None):
        self.spec = spec
        self.desktops: dict[str, LocalDesktop] = {}
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

    def create(self, width: int | None = None, height: int | None = None) -> LocalDesktop:
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

    def info(self, d: LocalDesktop) -> dict[str, Any]:
        return {"id": d.id, "display": d.display, "width": d.width, "height": d.height, "task": d.task_id,
                "alive": d.alive(), "sandboxed": d.sandboxed, "osworld_port": self.osworld_port(d.id)}

    def _free_slot(self, did: str) -> None:
        with self._lock:
            if did in self.slots:
                self.slots[self.slots.index(did)] = None

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(lambda _: self.create(), range(self.num)))
        logger.info("env service: {} desktops up", len(self.desktops))

    def get(self, did: str) -> LocalDesktop:
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


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether it announces its length
    or streams it in chunks, before it is held in memory."""

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


class _OSWorldPorts:
    """ASGI middleware: a request that came in on a desktop's own port (``serve-envs --osworld-port
    BASE``: BASE+slot, ``DesktopHost.slots``) is that desktop's OSWorld in-VM server, at the paths
    OSWorld's client uses (``/screenshot``, ``/execute``, ...): the path gets the ``/envs/{id}``
    prefix. Its client sends no bearer token, but ``requests`` sends the user and password of a URL
    (``vm_ip="agentenv:TOKEN@127.0.0.1"``) as Basic auth: the password is taken as the token."""

    def __init__(self, app: Any, host: "DesktopHost"):
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
        await self.app({**scope, "path": path, "raw_path": path.encode(), "headers": headers}, receive, send)


def create_app(num: int = 1, token: str | None = None, settings: EnvServiceConfig | None = None,
               osworld_ports: list[int] | None = None):
    settings = settings or EnvServiceConfig()
    host = DesktopHost(num, DesktopSpec.from_settings(settings), osworld_ports)
    limits = settings.limits

    def check_image_size(size: tuple[int, int] | None) -> None:
        if size is None:
            return
        w, h = size
        if w < 1 or h < 1:
            raise HTTPException(422, f"image_size {w}x{h}: both sides must be at least 1")
        if w * h > limits.max_image_pixels:
            raise HTTPException(413, f"image_size {w}x{h} is over the limit of {limits.max_image_pixels} pixels "
                                     "(serve-envs --max-image-pixels)")

    def check_screen(width: int | None, height: int | None) -> None:
        for name, v in (("width", width), ("height", height)):
            if v is not None and not 64 <= v <= limits.max_screen_side:
                raise HTTPException(422, f"{name} {v} is outside 64..{limits.max_screen_side} "
                                         "(serve-envs --max-screen-side)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio

        await anyio.to_thread.run_sync(host.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(host.close_all)

    app = FastAPI(title="agentenv env service", lifespan=lifespan)
    app.state.host = host
    app.state.limits = limits
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    if osworld_ports:
        app.add_middleware(_OSWorldPorts, host=host)

    def auth(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    A = [Depends(auth)]

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

    @app.get("/health")
    def health():
        return {"status": "ok", "desktops": len(host.desktops)}

    @app.get("/settings", dependencies=A)
    def effective_settings():
        """The settings this service runs with; the downloads as its setup steps read them."""
        return settings.model_copy(update={"downloads": DownloadConfig.from_env()}).model_dump(mode="json")

    @app.get("/metrics", dependencies=A)
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(host.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/envs", dependencies=A)
    def list_envs():
        # a copy: others create and close desktops meanwhile
        return [host.info(d) for d in list(host.desktops.values())]

    @app.post("/envs", dependencies=A)
    def create_env(req: CreateRequest | None = None):
        req = req or CreateRequest()
        check_screen(req.width, req.height)
        d = host.create(req.width, req.height)
        return {"id": d.id, "width": d.width, "height": d.height, "osworld_port": host.osworld_port(d.id)}

    @app.get("/envs/{did}", dependencies=A)
    def env_info(did: str):
        return host.info(host.get(did))

    @app.delete("/envs/{did}", dependencies=A)
    def close_env(did: str):
        host.get(did)
        host.close(did)
        return {"closed": did}

    @app.get("/envs/{did}/alive", dependencies=A)
    def alive(did: str):
        return {"alive": host.get(did).alive()}

    @app.post("/envs/{did}/reset", dependencies=A)
    def reset(did: str, req: ResetRequest):
        d = host.get(did)
        check_image_size(req.image_size)
        try:
            task = Task.from_dict(req.task) if req.task else None
        except ValueError as e:
            raise HTTPException(422, f"bad task: {e}") from e
        t0 = time.perf_counter()
        try:
            d.reset(task)
        except TaskSetupError as e:
            host.m_resets.labels("setup_error").inc()
            raise HTTPException(422, f"task setup failed: {e}") from e
        except DesktopError as e:
            if not d.alive():
                raise
            host.m_resets.labels("setup_error").inc()  # e.g. an app the task names is not installed
            raise HTTPException(422, f"task setup failed: {e}") from e
        host.m_resets.labels("ok").inc()
        reset_s = time.perf_counter() - t0
        host.m_reset_s.observe(reset_s)
        png, size = _encode(d.screenshot(), req.image_size)
        return {"screenshot": png, "size": size, "screen": [d.width, d.height],
                "info": {"reset_s": reset_s}}

    @app.post("/envs/{did}/step", dependencies=A)
    def step(did: str, req: StepRequest):
        d = host.get(did)
        check_image_size(req.image_size)
        try:
            action = Action.from_dict(req.action)
            check_action(action)
            if action.type == "pyautogui":  # refused before anything acts, not halfway through
                parse_pyautogui(action.code or "", d.width, d.height)
        except (ValueError, TypeError) as e:
            raise HTTPException(422, f"bad action: {e}") from e
        t0 = time.perf_counter()
        info = d.execute(action)
        info["action_s"] = time.perf_counter() - t0
        out: dict[str, Any] = {"info": info, "terminated": action.is_terminal}
        if req.screenshot:
            out["screenshot"], out["size"] = _encode(d.screenshot(), req.image_size)
        host.m_steps.inc()
        host.m_step_s.observe(time.perf_counter() - t0)
        return out

    @app.get("/envs/{did}/screenshot", dependencies=A)
    def screenshot(did: str):
        return Response(host.get(did).screenshot_png(), media_type="image/png")

    @app.post("/envs/{did}/evaluate", dependencies=A)
    def evaluate_env(did: str, req: EvaluateRequest):
        d = host.get(did)
        with d._lock:  # a desktop's HOME is swapped by reset: never read it halfway through one
            return _evaluate(d, req)

    def _evaluate(d: LocalDesktop, req: EvaluateRequest):
        try:
            task = Task.from_dict(req.task)
            return {"reward": evaluate(d, task, req.last_action)}
        except (ValueError, EvaluatorError) as e:
            raise HTTPException(422, f"cannot evaluate: {e}") from e

    # ------------------------------------------------------------- OSWorld in-VM server paths
    def _execute(d: LocalDesktop, req: ExecuteRequest) -> dict[str, Any]:
        # Inside a sandbox an OSWorld-style ``python -c "import pyautogui; ..."`` runs as the code it
        # is (it reaches nothing but its own desktop); on the host only its allowed calls run, as actions.
        code = None if d.sandboxed else _pyautogui_code(req.command)
        if code is not None:
            try:
                actions = parse_pyautogui(code, d.width, d.height)
                for a in actions:
                    check_action(a)
            except ActionError as e:
                return JSONResponse({"status": "error", "message": str(e), "output": "", "error": str(e),
                                     "returncode": 1}, status_code=400)
            errors = [d.execute(a).get("error") for a in actions]
            errors = [e for e in errors if e]
            return {"status": "error" if errors else "success", "output": "", "error": "; ".join(errors),
                    "returncode": 1 if errors else 0}
        if req.shell and not isinstance(req.command, str):
            raise HTTPException(422, "shell=true needs the command as one string")
        argv: list[str] | str = req.command if req.shell else _argv(req.command)
        if req.shell and ("\0" in req.command or not req.command.strip()):
            raise HTTPException(422, "empty command or NUL byte in it")
        return d.run_bounded(argv, shell=req.shell, timeout=max(0.0, min(req.timeout, limits.execute_timeout_s)),
                             max_output=limits.max_output_bytes)

    @app.post("/envs/{did}/execute", dependencies=A)
    def os_execute(did: str, req: ExecuteRequest):
        return _execute(host.get(did), req)

    @app.post("/envs/{did}/setup/execute", dependencies=A)
    def os_setup_execute(did: str, req: ExecuteRequest):
        return _execute(host.get(did), req)

    @app.post("/envs/{did}/setup/launch", dependencies=A)
    def os_launch(did: str, req: LaunchRequest):
        d = host.get(did)
        argv = ["bash", "-c", req.command] if req.shell and isinstance(req.command, str) else _argv(req.command)
        if any("\0" in a for a in argv):
            raise HTTPException(422, "command contains a NUL byte")
        try:
            p = d.launch(argv)
        except DesktopError as e:
            if not d.alive():
                raise
            raise HTTPException(422, str(e)) from e
        return {"status": "success", "message": f"launched pid {p.pid}"}

    @app.post("/envs/{did}/setup/open_file", dependencies=A)
    def os_open_file(did: str, body: dict[str, Any]):
        from agentenv.envs.tasks.setup import run_setup

        d = host.get(did)
        try:
            with d._lock:
                run_setup(d, Task(id="open_file", instruction="-", config=[{"type": "open", "parameters": body}]))
        except TaskSetupError as e:
            raise HTTPException(422, str(e)) from e
        return {"status": "success"}

    @app.post("/envs/{did}/setup/activate_window", dependencies=A)
    def os_activate(did: str, body: dict[str, Any]):
        d = host.get(did)
        name = body.get("window_name")
        if not name:
            raise HTTPException(422, "window_name is required")
        if "\0" in str(name):
            raise HTTPException(422, "window_name contains a NUL byte")
        with d._lock:
            r = d.run(["xdotool", "search", "--name", str(name), "windowactivate"], timeout=10)
        if r.returncode != 0:
            raise HTTPException(404, f"no window named {name!r}")
        return {"status": "success"}

    @app.post("/envs/{did}/setup/upload", dependencies=A)
    async def os_upload(did: str, file_path: str = Form(...), file_data: UploadFile = File(...)):
        import anyio

        d = host.get(did)
        data = await file_data.read()
        await anyio.to_thread.run_sync(_upload, d, file_path, data)
        return {"status": "success"}

    def _upload(d: LocalDesktop, file_path: str, data: bytes) -> None:
        with d._lock:  # not while a reset swaps HOME
            _write_in_home(d, file_path, data)

    def _write_in_home(d: LocalDesktop, file_path: str, data: bytes) -> None:
        try:
            d.write_file(file_path, data)  # component by component, no link followed
        except IsADirectoryError as e:
            raise HTTPException(422, f"{file_path!r} is a directory or not a regular file") from e
        except PermissionError:
            raise
        except OSError as e:  # a file where a folder should be, a symlink, a folder where the file should be...
            raise HTTPException(422, f"cannot write {file_path!r}: {e.strerror or e}") from e

    @app.post("/envs/{did}/file", dependencies=A)
    def os_file(did: str, file_path: str = Form(...)):
        d = host.get(did)
        with d._lock:
            return _read_in_home(d, file_path)

    def _read_in_home(d: LocalDesktop, file_path: str) -> Response:
        try:
            data = d.read_file(file_path, limits.max_file_bytes)  # component by component, no link followed
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise HTTPException(404, f"no file {file_path!r}") from e
        except PermissionError:
            raise
        except OSError as e:  # a name too long, a symlink swapped in...
            raise HTTPException(422, f"cannot open {file_path!r}: {e.strerror or e}") from e
        if len(data) > limits.max_file_bytes:
            raise HTTPException(413, f"{file_path!r} is over the limit of {limits.max_file_bytes} bytes "
                                     "(serve-envs --max-file-bytes)")
        return Response(data, media_type="application/octet-stream")

    @app.post("/envs/{did}/screen_size", dependencies=A)
    def os_screen_size(did: str):
        d = host.get(did)
        return {"width": d.width, "height": d.height}

    @app.get("/envs/{did}/platform", dependencies=A)
    def os_platform(did: str):
        host.get(did)
        return Response("Linux", media_type="text/plain")

    def _sandboxed(d: LocalDesktop, route: str) -> None:
        if not d.sandboxed:
            raise HTTPException(403, f"{route} runs arbitrary code: it is served by sandboxed desktops only "
                                     "(serve-envs --sandbox)")

    @app.post("/envs/{did}/run_python", dependencies=A)
    def os_run_python(did: str, req: RunPythonRequest):
        d = host.get(did)
        _sandboxed(d, "/run_python")
        if "\0" in req.code:
            raise HTTPException(422, "code contains a NUL byte")
        r = d.run_bounded(["python3", "-c", req.code], shell=False, timeout=limits.execute_timeout_s,
                          max_output=limits.max_output_bytes)
        ok = r["status"] == "success" and r["returncode"] == 0
        return {"status": "success" if ok else "error", "message": r["output"] if ok else r["error"],
                "output": r["output"], "error": r["error"], "return_code": r["returncode"]}

    @app.post("/envs/{did}/run_bash_script", dependencies=A)
    def os_run_bash(did: str, req: RunBashRequest):
        d = host.get(did)
        _sandboxed(d, "/run_bash_script")
        if "\0" in req.script or (req.working_dir and "\0" in req.working_dir):
            raise HTTPException(422, "script or working_dir contains a NUL byte")
        script = (f"cd {shlex.quote(req.working_dir)} || exit 1\n" if req.working_dir else "") + req.script
        r = d.run_bounded(["bash", "-c", script], shell=False, timeout=max(0.0, min(req.timeout, limits.execute_timeout_s)),
                          max_output=limits.max_output_bytes)
        return {"status": "success" if r["returncode"] == 0 else "error", "output": r["output"],
                "error": r["error"], "returncode": r["returncode"]}

    @app.post("/envs/{did}/list_directory", dependencies=A)
    def os_list_directory(did: str, req: PathRequest):
        import json

        d = host.get(did)
        if "\0" in req.path:
            raise HTTPException(422, "path contains a NUL byte")
        with d._lock:
            r = d.run(["python3", "-c", _LIST_DIRECTORY, req.path], timeout=30)
        try:
            out = json.loads(r.stdout)
        except ValueError:
            raise HTTPException(500, f"cannot list {req.path!r}: {r.stderr.strip()[-300:]}") from None
        if "error" in out:
            raise HTTPException(404, out["error"])
        return out

    @app.get("/envs/{did}/terminal", dependencies=A)
    def os_terminal(did: str):
        d = host.get(did)
        with d._lock:
            text = d.terminal_output()
        if text is None:
            raise HTTPException(501, "reading a terminal's text needs AT-SPI, which the sandboxed desktop has "
                                     "(serve-envs --sandbox)")
        return {"output": text or None}  # null when there is no terminal, as OSWorld's server answers

    @app.get("/envs/{did}/accessibility", dependencies=A)
    def os_accessibility(did: str):
        from agentenv.envs.sandbox import A11yError

        d = host.get(did)
        try:
            with d._lock:  # a reset would end the reader mid-walk
                tree = d.accessibility_tree()
        except A11yError as e:
            raise HTTPException(503, f"no accessibility tree: {e}") from e
        if tree is None:
            raise HTTPException(501, "no accessibility tree: plain desktops run their apps without AT-SPI; "
                                     "the sandboxed desktop has it (serve-envs --sandbox)")
        return {"AT": tree}

    @app.post("/envs/{did}/setup/close_window", dependencies=A)
    def os_close_window(did: str, req: CloseWindowRequest):
        d = host.get(did)
        if d._input is None:
            raise DesktopError(f"desktop {did} is closed")
        if d._input.close_windows(req.window_name, req.strict, req.by_class) == 0:
            raise HTTPException(404, f"no window named {req.window_name!r}")
        return {"status": "success"}

    @app.post("/envs/{did}/setup/change_wallpaper", dependencies=A)
    def os_change_wallpaper(did: str, req: PathRequest):
        d = host.get(did)
        if "\0" in req.path:
            raise HTTPException(422, "path contains a NUL byte")
        path = req.path.replace("~", "/home/user" if d.sandboxed else str(d.home), 1) if req.path.startswith("~") \
            else req.path
        # As OSWorld's server on GNOME: the setting (what an evaluator reads with gsettings).
        with d._lock:
            r = d.run(["gsettings", "set", "org.gnome.desktop.background", "picture-uri", f"file://{path}"], timeout=10)
        if r.returncode != 0:
            raise HTTPException(422, f"cannot set the wallpaper: {r.stderr.strip()[-300:]}")
        return {"status": "success"}

    @app.post("/envs/{did}/cursor_position", dependencies=A)
    def os_cursor(did: str):
        d = host.get(did)
        return list(d._input.pointer()) if d._input else [0, 0]

    return app


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


def serve(num: int, host: str = "127.0.0.1", port: int = 8100, token: str | None = None,
          token_file: str | None = None, settings: EnvServiceConfig | None = None,
          osworld_port: int | None = None) -> None:
    """Run the service with ``settings`` (``agentenv serve-envs``' flags). The token is never printed
    or logged: it is given (``--token``, ``ENV_TOKEN``) or generated and written to ``token_file``
    (mode 600)."""
    import uvicorn

    settings = settings or EnvServiceConfig()
    os.environ.update(settings.downloads.to_env())  # what the setup steps read (DownloadCache.from_config)

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
    if settings.sandbox:
        from agentenv.envs.sandbox import SandboxError, check_sandbox

        try:
            check_sandbox()  # before any desktop: a missing tool is named, not found halfway
        except SandboxError as e:
            raise SystemExit(f"agentenv serve-envs: {e}") from None
    else:
        logger.warning("desktops are NOT sandboxed (--no-sandbox): tasks and agents run commands on this "
                       "host as the desktop user and can reach its loopback services")
    if settings.sandbox and settings.sandbox_network:
        logger.warning("sandboxed desktops share this host's network (--sandbox-network): their commands can "
                       "reach its loopback services")
    # ``num`` OSWorld ports: a desktop takes the lowest free one when created, frees it when closed.
    ports = [osworld_port + i for i in range(num)] if osworld_port else []
    app = create_app(num, token, settings, osworld_ports=ports)
    sockets = []
    for p in [port, *ports]:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, p))
        except OSError as e:
            raise SystemExit(f"agentenv serve-envs: cannot listen on {host}:{p}: {e}") from None
        sockets.append(s)
    if ports:
        print(f"# OSWorld-style clients: desktop i at http://agentenv:$ENV_TOKEN@{host}:{osworld_port}+i "
              f"(ports {osworld_port}-{osworld_port + num - 1}; GET /envs says each desktop's osworld_port)",
              flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=sockets)
