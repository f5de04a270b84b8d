"""Clients of the env service: ``AsyncEnvClient`` (one service), ``AsyncDesktopEnv`` (one desktop,
for the scheduler) and ``DesktopEnv`` (a synchronous ``gymnasium.Env``).

Errors say where and what: ``EnvDeadError`` (the desktop or its service is gone: replace it),
``EnvRequestError`` (the request was wrong: 4xx), ``EnvTimeoutError``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, TypeVar

import gymnasium
import httpx
from pydantic import BaseModel

from agentenv.envs import wire
from agentenv.types import Action, Task


class EnvError(RuntimeError):
    def __init__(self, where: str, reason: str, status: int | None = None):
        self.where, self.reason, self.status = where, reason, status
        super().__init__(f"{where}: {'HTTP %d: ' % status if status else ''}{reason}")


class EnvDeadError(EnvError):
    """The desktop died or its service cannot be reached."""


class EnvRequestError(EnvError):
    """The service refused the request (bad action, bad task, failed setup...)."""


class EnvTimeoutError(EnvDeadError):
    """The service did not answer in time; treated as dead."""


@dataclass
class Observation:
    png: bytes                      # the screenshot, PNG, at ``size``
    size: tuple[int, int]           # image size (may be resized for the model)
    screen: tuple[int, int]         # the desktop's real screen size
    info: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _transport_errors(where: str) -> Iterator[None]:
    """Network failures talking to the service: a timeout or no connection means dead."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise EnvTimeoutError(where, f"timed out ({type(e).__name__})") from e
    except httpx.TransportError as e:
        raise EnvDeadError(where, f"cannot reach the env service: {e}") from e


def _checked(r: httpx.Response, where: str) -> httpx.Response:
    """Map an error response to EnvDeadError (5xx, or a desktop the service says is gone: replace
    it) or EnvRequestError (4xx: the request was wrong), with the service's own message."""
    if r.status_code < 400:
        return r
    body: Any = None
    try:
        body = r.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = r.text[:300]
    if r.status_code >= 500 or (isinstance(body, dict) and body.get("dead")):
        raise EnvDeadError(where, str(detail), r.status_code)
    raise EnvRequestError(where, str(detail), r.status_code)


# A blip (connection refused or reset before an answer) is retried this many times, after these
# pauses, before the desktop counts as dead and its trajectory is rerun.
RETRY_DELAYS_S = (0.2, 0.5, 1.0)


def _body(req: BaseModel) -> dict[str, Any]:
    return req.model_dump(mode="json")


def _env_defaults(url: str | None, token: str | None) -> tuple[str, str | None]:
    url = url or os.environ.get("ENV_SERVER_URL")
    if not url:
        raise ValueError("no env service URL: pass one or set ENV_SERVER_URL")
    return url.rstrip("/"), token if token is not None else os.environ.get("ENV_TOKEN")



_M = TypeVar("_M", bound=BaseModel)

def _reply(model: type[_M], r: httpx.Response) -> _M:
    """The service's answer as ``model``. A body that is not JSON raises json.JSONDecodeError (a
    garbled answer: the trajectory ends as an error naming it); one of the wrong shape, pydantic's
    ValidationError."""
    return model.model_validate(r.json())

class AsyncEnvClient:
    """Async client of one env service."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 120.0,
                 connect_timeout_s: float = 5.0):
        self.url, self.token = _env_defaults(url, token)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers,
                                       timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
                                       limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    async def _req(self, method: str, path: str, *, timeout: float | None = None, idempotent: bool | None = None,
                   **kw: Any) -> httpx.Response:
        """One request. A connection that could not be made is retried (the request never left);
        a connection lost before the answer is retried only for idempotent requests (GET, reset,
        evaluate), since a repeated step would act twice."""
        where = f"{self.url}{path}"
        idempotent = method == "GET" if idempotent is None else idempotent
        for delay in (*RETRY_DELAYS_S, None):
            try:
                with _transport_errors(where):
                    r = await self._http.request(method, path, timeout=timeout or httpx.USE_CLIENT_DEFAULT, **kw)
                return _checked(r, where)
            except EnvDeadError as e:
                cause = e.__cause__
                blip = isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout)) or (
                    idempotent and isinstance(cause, (httpx.ReadError, httpx.RemoteProtocolError)))
                if delay is None or not blip:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def health(self) -> wire.Health:
        return _reply(wire.Health, (await self._req("GET", "/health", timeout=5.0)))

    async def list(self) -> list[wire.DesktopInfo]:
        r = await self._req("GET", "/envs")
        return [wire.DesktopInfo.model_validate(e) for e in r.json()]

    async def create(self, width: int | None = None, height: int | None = None) -> wire.Created:
        """Start a desktop; returns its id, screen size and OSWorld port."""
        r = await self._req("POST", "/envs", json=_body(wire.CreateRequest(width=width, height=height)), timeout=60.0)
        return _reply(wire.Created, r)

    async def close(self, env_id: str) -> None:
        await self._req("DELETE", f"/envs/{env_id}")

    async def alive(self, env_id: str) -> bool:
        try:
            r = await self._req("GET", f"/envs/{env_id}/alive", timeout=5.0)
            return _reply(wire.Alive, r).alive
        except EnvError:
            return False

    async def reset(self, env_id: str, task: Task | dict | None,
                    image_size: tuple[int, int] | None = None) -> Observation:
        task_d = task.to_dict() if isinstance(task, Task) else task
        r = await self._req("POST", f"/envs/{env_id}/reset",
                            json=_body(wire.ResetRequest(task=task_d, image_size=image_size)), idempotent=True)
        d = _reply(wire.ResetReply, r)
        return Observation(png=base64.b64decode(d.screenshot), size=d.size, screen=d.screen, info=d.info)

    async def step(self, env_id: str, action: Action | dict, image_size: tuple[int, int] | None = None,
                   screen: tuple[int, int] = (0, 0)) -> tuple[Observation | None, dict[str, Any], bool]:
        """One action; the screenshot after it (``screen``: the desktop's, which a step does not say)."""
        a = action.to_dict() if isinstance(action, Action) else action
        r = await self._req("POST", f"/envs/{env_id}/step", json=_body(wire.StepRequest(action=a, image_size=image_size)))
        d = _reply(wire.StepReply, r)
        obs = None if d.screenshot is None else Observation(png=base64.b64decode(d.screenshot),
                                                            size=d.size or screen, screen=screen, info=d.info)
        return obs, d.info, d.terminated

    async def evaluate(self, env_id: str, task: Task | dict, last_action: str | None = None) -> float:
        task_d = task.to_dict() if isinstance(task, Task) else task
        r = await self._req("POST", f"/envs/{env_id}/evaluate",
                            json=_body(wire.EvaluateRequest(task=task_d, last_action=last_action)), idempotent=True)
        return _reply(wire.EvaluateReply, r).reward

    async def screenshot(self, env_id: str) -> bytes:
        return (await self._req("GET", f"/envs/{env_id}/screenshot")).content

    async def aclose(self) -> None:
        await self._http.aclose()


class AsyncDesktopEnv:
    """One desktop on an env service, for async callers (the scheduler)."""

    def __init__(self, client: AsyncEnvClient, env_id: str, screen: tuple[int, int]):
        self.client, self.id = client, env_id
        self.screen = screen

    @property
    def name(self) -> str:
        return f"{self.client.url}/envs/{self.id}"

    async def reset(self, task: Task | None, image_size: tuple[int, int] | None = None) -> Observation:
        obs = await self.client.reset(self.id, task, image_size)
        self.screen = obs.screen
        return obs

    async def step(self, action: Action, image_size: tuple[int, int] | None = None):
        return await self.client.step(self.id, action, image_size, self.screen)

    async def evaluate(self, task: Task, last_action: str | None = None) -> float:
        return await self.client.evaluate(self.id, task, last_action)

    async def alive(self) -> bool:
        return await self.client.alive(self.id)


class DesktopEnv(gymnasium.Env):
    """A synchronous ``gymnasium.Env`` over one desktop of an env service.

    Observation: the screenshot as a ``uint8`` array (H, W, 3). Action: an ``Action`` (or its dict).
    ``reset(options={"task": task})`` runs the task's setup; the reward is 0 until a terminal action
    (``finished``/``call_user``), whose step returns the task's evaluation.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(self, url: str | None = None, token: str | None = None, env_id: str | None = None,
                 *, timeout_s: float = 120.0, render_mode: str | None = "rgb_array"):
        import numpy as np

        from agentenv.envs.spaces import ActionSpace

        self.url, self.token = _env_defaults(url, token)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._owns = env_id is None
        self.env_id = env_id or _reply(wire.Created, self._call("POST", "/envs", json={})).id
        info = _reply(wire.DesktopInfo, self._call("GET", f"/envs/{self.env_id}"))
        self.width, self.height = info.width, info.height
        self.observation_space = gymnasium.spaces.Box(0, 255, (self.height, self.width, 3), np.uint8)
        self.action_space = ActionSpace(self.width, self.height)
        self.render_mode = render_mode
        self.task: Task | None = None
        self._last: Any = None

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        where = f"{self.url}{path}"
        with _transport_errors(where):
            r = self._http.request(method, path, **kw)
        return _checked(r, where)

    def _array(self, b64: str):
        import numpy as np
        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
        self._last = np.asarray(img, dtype=np.uint8)
        return self._last

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task = (options or {}).get("task")
        self.task = Task.from_dict(task) if isinstance(task, dict) else task
        req = wire.ResetRequest(task=self.task.to_dict() if self.task else None)
        d = _reply(wire.ResetReply, self._call("POST", f"/envs/{self.env_id}/reset", json=_body(req)))
        return self._array(d.screenshot), {"task_id": self.task.id if self.task else None, **d.info}

    def step(self, action: Action | dict):
        a = action if isinstance(action, Action) else Action.from_dict(action)
        r = self._call("POST", f"/envs/{self.env_id}/step", json=_body(wire.StepRequest(action=a.to_dict())))
        d = _reply(wire.StepReply, r)
        obs = self._array(d.screenshot or "")
        terminated = d.terminated
        reward = 0.0
        if terminated and self.task is not None and self.task.evaluator:
            req = wire.EvaluateRequest(task=self.task.to_dict(), last_action=a.type)
            r = self._call("POST", f"/envs/{self.env_id}/evaluate", json=_body(req))
            reward = _reply(wire.EvaluateReply, r).reward
        info = {k: v for k, v in d.info.items() if not k.endswith("_s")}  # timings vary run to run
        return obs, reward, terminated, False, info

    def render(self):
        return self._last

    def close(self) -> None:
        if getattr(self, "_owns", False) and getattr(self, "env_id", None):
            try:
                self._call("DELETE", f"/envs/{self.env_id}")
            except EnvError:
                pass
            self._owns = False
        if hasattr(self, "_http"):
            self._http.close()
