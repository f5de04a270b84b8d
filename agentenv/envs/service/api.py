"""Our own API: desktops (``/envs``), reset, step, screenshot and evaluate; ``/health``, ``/settings``
and ``/metrics``. Every route but ``/health`` needs the bearer token."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from agentenv.config import DownloadConfig
from agentenv.envs.actions import check_action, parse_pyautogui
from agentenv.envs.service.deps import Desktop, Host, Limits, authorized
from agentenv.envs.service.limits import check_image_size, check_screen
from agentenv.envs.tasks.evaluate import EvaluatorError, evaluate
from agentenv.envs.tasks.setup import TaskSetupError
from agentenv.envs.wire import (Alive, Closed, Created, CreateRequest, DesktopInfo, EvaluateReply, EvaluateRequest,
                                Health, ResetReply, ResetRequest, StepReply, StepRequest)
from agentenv.envs.desktop_types import DesktopError
from agentenv.types import Action, Task

public = APIRouter()
router = APIRouter(dependencies=[Depends(authorized)])


def encode_png(img: Any, image_size: tuple[int, int] | None) -> tuple[str, tuple[int, int]]:
    """A screenshot as base64 PNG, resized to ``image_size`` when given; and its size."""
    from PIL import Image

    if image_size and tuple(image_size) != img.size:
        img = img.resize(tuple(image_size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode(), img.size


@public.get("/health")
def health(host: Host) -> Health:
    return Health(status="ok", desktops=len(host.desktops))


@router.get("/settings")
def effective_settings(request: Request) -> dict[str, Any]:
    """The settings this service runs with (config.EnvServiceConfig); the downloads as its setup steps read them."""
    s = request.app.state.settings
    return s.model_copy(update={"downloads": DownloadConfig.from_env()}).model_dump(mode="json")


@router.get("/metrics")
def metrics(host: Host) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(host.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/envs")
def list_envs(host: Host) -> list[DesktopInfo]:
    # a copy: others create and close desktops meanwhile
    return [host.info(d) for d in list(host.desktops.values())]


@router.post("/envs")
def create_env(host: Host, limits: Limits, req: CreateRequest | None = None) -> Created:
    req = req or CreateRequest()
    check_screen(limits, req.width, req.height)
    d = host.create(req.width, req.height)
    return Created(id=d.id, width=d.width, height=d.height, osworld_port=host.osworld_port(d.id))


@router.get("/envs/{did}")
def env_info(host: Host, d: Desktop) -> DesktopInfo:
    return host.info(d)


@router.delete("/envs/{did}")
def close_env(host: Host, d: Desktop) -> Closed:
    host.close(d.id)
    return Closed(closed=d.id)


@router.get("/envs/{did}/alive")
def alive(d: Desktop) -> Alive:
    return Alive(alive=d.alive())


@router.post("/envs/{did}/reset")
def reset(host: Host, limits: Limits, d: Desktop, req: ResetRequest) -> ResetReply:
    check_image_size(limits, req.image_size)
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
    png, size = encode_png(d.screenshot(), req.image_size)
    return ResetReply(screenshot=png, size=size, screen=(d.width, d.height), info={"reset_s": reset_s})


@router.post("/envs/{did}/step", response_model=StepReply, response_model_exclude_none=True)
def step(host: Host, limits: Limits, d: Desktop, req: StepRequest) -> StepReply:
    check_image_size(limits, req.image_size)
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
    out = StepReply(info=info, terminated=action.is_terminal)
    if req.screenshot:
        out.screenshot, out.size = encode_png(d.screenshot(), req.image_size)
    host.m_steps.inc()
    host.m_step_s.observe(time.perf_counter() - t0)
    return out


@router.get("/envs/{did}/screenshot")
def screenshot(d: Desktop) -> Response:
    return Response(d.screenshot_png(), media_type="image/png")


@router.post("/envs/{did}/evaluate")
def evaluate_env(d: Desktop, req: EvaluateRequest) -> EvaluateReply:
    with d.locked():  # a desktop's HOME is swapped by reset: never read it halfway through one
        try:
            task = Task.from_dict(req.task)
            return EvaluateReply(reward=evaluate(d, task, req.last_action))
        except (ValueError, EvaluatorError) as e:
            raise HTTPException(422, f"cannot evaluate: {e}") from e
