"""The env service: N real desktops behind an authenticated HTTP API (FastAPI + uvicorn).

    agentenv serve-envs --num 4 --host 127.0.0.1 --port 8100 [--token T]

Routes (all but /health need ``Authorization: Bearer <token>``):

    GET  /health                         liveness, desktop count
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
/setup/activate_window, /setup/upload, /file, /screen_size, /platform, /cursor_position.
Unlike OSWorld's server these are authenticated, commands run as the unprivileged desktop user,
and ``python -c "import pyautogui; ..."`` commands go through the pyautogui allow-list instead of
running as code.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import secrets
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel, Field

from agentenv.envs.actions import ActionError, parse_pyautogui
from agentenv.envs.tasks.evaluate import EvaluatorError, evaluate
from agentenv.envs.tasks.setup import TaskSetupError
from agentenv.envs.xvfb import DesktopError, DesktopSpec, LocalDesktop
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
    timeout: float = 120.0


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


def _pyautogui_code(command: list[str] | str) -> str | None:
    """The code of an OSWorld-style ``python -c "import pyautogui; ..."`` command, else None."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if len(argv) == 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-c" \
            and "pyautogui" in argv[2]:
        return argv[2].replace("; ", "\n")
    return None


class UnknownDesktop(LookupError):
    """A desktop id this service does not have: for a client, that desktop is gone."""


class DesktopHost:
    """Owns the desktops of one service process."""

    def __init__(self, num: int, spec: DesktopSpec):
        self.spec = spec
        self.desktops: dict[str, LocalDesktop] = {}
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
        spec = DesktopSpec(width=width or self.spec.width, height=height or self.spec.height,
                           scratch=self.spec.scratch, template=self.spec.template)
        d = LocalDesktop(did, spec).start()
        with self._lock:
            self.desktops[did] = d
        self.m_desktops.set(len(self.desktops))
        return d

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
        self.m_desktops.set(len(self.desktops))

    def close_all(self) -> None:
        for did in list(self.desktops):
            self.close(did)


def create_app(num: int = 1, token: str | None = None, spec: DesktopSpec | None = None):
    host = DesktopHost(num, spec or DesktopSpec())

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

    def auth(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    A = [Depends(auth)]

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

    @app.get("/metrics", dependencies=A)
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(host.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/envs", dependencies=A)
    def list_envs():
        return [{"id": d.id, "display": d.display, "width": d.width, "height": d.height,
                 "task": d.task_id, "alive": d.alive()} for d in host.desktops.values()]

    @app.post("/envs", dependencies=A)
    def create_env(req: CreateRequest | None = None):
        req = req or CreateRequest()
        d = host.create(req.width, req.height)
        return {"id": d.id, "width": d.width, "height": d.height}

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
        host.m_resets.labels("ok").inc()
        reset_s = time.perf_counter() - t0
        host.m_reset_s.observe(reset_s)
        png, size = _encode(d.screenshot(), req.image_size)
        return {"screenshot": png, "size": size, "screen": [d.width, d.height],
                "info": {"reset_s": reset_s}}

    @app.post("/envs/{did}/step", dependencies=A)
    def step(did: str, req: StepRequest):
        d = host.get(did)
        try:
            action = Action.from_dict(req.action)
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
        try:
            task = Task.from_dict(req.task)
            return {"reward": evaluate(d, task, req.last_action)}
        except (ValueError, EvaluatorError) as e:
            raise HTTPException(422, f"cannot evaluate: {e}") from e

    # ------------------------------------------------------------- OSWorld in-VM server paths
    def _execute(d: LocalDesktop, req: ExecuteRequest) -> dict[str, Any]:
        code = _pyautogui_code(req.command)
        if code is not None:
            try:
                actions = parse_pyautogui(code, d.width, d.height)
            except ActionError as e:
                return JSONResponse({"status": "error", "message": str(e), "output": "", "error": str(e),
                                     "returncode": 1}, status_code=400)
            errors = [d.execute(a).get("error") for a in actions]
            errors = [e for e in errors if e]
            return {"status": "error" if errors else "success", "output": "", "error": "; ".join(errors),
                    "returncode": 1 if errors else 0}
        import subprocess

        try:
            r = d.run(req.command, timeout=min(req.timeout, 120.0), shell=req.shell)
        except subprocess.TimeoutExpired:
            return {"status": "error", "output": "", "error": "timed out", "returncode": -1}
        except FileNotFoundError as e:
            return {"status": "error", "output": "", "error": str(e), "returncode": 127}
        return {"status": "success", "output": r.stdout, "error": r.stderr, "returncode": r.returncode}

    @app.post("/envs/{did}/execute", dependencies=A)
    def os_execute(did: str, req: ExecuteRequest):
        return _execute(host.get(did), req)

    @app.post("/envs/{did}/setup/execute", dependencies=A)
    def os_setup_execute(did: str, req: ExecuteRequest):
        return _execute(host.get(did), req)

    @app.post("/envs/{did}/setup/launch", dependencies=A)
    def os_launch(did: str, req: LaunchRequest):
        d = host.get(did)
        argv = ["bash", "-c", req.command] if req.shell and isinstance(req.command, str) else \
            (shlex.split(req.command) if isinstance(req.command, str) else req.command)
        p = d.launch(argv)
        return {"status": "success", "message": f"launched pid {p.pid}"}

    @app.post("/envs/{did}/setup/open_file", dependencies=A)
    def os_open_file(did: str, body: dict[str, Any]):
        from agentenv.envs.tasks.setup import run_setup

        d = host.get(did)
        try:
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
        r = d.run(["xdotool", "search", "--name", str(name), "windowactivate"], timeout=10)
        if r.returncode != 0:
            raise HTTPException(404, f"no window named {name!r}")
        return {"status": "success"}

    @app.post("/envs/{did}/setup/upload", dependencies=A)
    async def os_upload(did: str, file_path: str = Form(...), file_data: UploadFile = File(...)):
        d = host.get(did)
        dest = d.resolve_path(file_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(await file_data.read())
        d._chown(dest)
        return {"status": "success"}

    @app.post("/envs/{did}/file", dependencies=A)
    def os_file(did: str, file_path: str = Form(...)):
        d = host.get(did)
        p = d.resolve_path(file_path)
        if not p.is_file():
            raise HTTPException(404, f"no file {file_path!r}")
        return Response(p.read_bytes(), media_type="application/octet-stream")

    @app.post("/envs/{did}/screen_size", dependencies=A)
    def os_screen_size(did: str):
        d = host.get(did)
        return {"width": d.width, "height": d.height}

    @app.get("/envs/{did}/platform", dependencies=A)
    def os_platform(did: str):
        host.get(did)
        return Response("Linux", media_type="text/plain")

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


def serve(num: int, host: str = "127.0.0.1", port: int = 8100, token: str | None = None,
          width: int = 1920, height: int = 1080, token_file: str | None = None) -> None:
    import uvicorn

    token = token or os.environ.get("ENV_TOKEN")
    if not token:
        if not is_loopback(host):
            raise SystemExit(f"refusing to serve desktops on non-loopback address {host} without a token "
                             "(--token or ENV_TOKEN)")
        token = secrets.token_urlsafe(24)
        logger.warning("no token given; generated one for this run")
    if token_file:
        Path(token_file).write_text(token)
        os.chmod(token_file, 0o600)
    print(f"export ENV_SERVER_URL=http://{host}:{port} ENV_TOKEN={token}", flush=True)
    app = create_app(num, token, DesktopSpec(width=width, height=height))
    uvicorn.run(app, host=host, port=port, log_level="warning")
