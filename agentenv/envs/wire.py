"""What crosses the wire between the env service and its clients: the requests and replies of its
routes, defined once, imported by the service (``agentenv.envs.service``) and by its client
(``agentenv.envs.client``).

Our own API first (``/health``, ``/envs``, ``/envs/{id}/reset|step|evaluate``), then OSWorld's in-VM
routes, whose shapes are OSWorld's server's (``desktop_env/server/main.py``): its client
(``PythonController``) reads them as they are.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Reply(BaseModel):
    # A newer service may say more than this client knows: keep reading, never refuse the reply.
    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------- our API
class Health(_Reply):
    status: str = "ok"
    desktops: int = 0


class CreateRequest(BaseModel):
    width: int | None = None
    height: int | None = None


class Created(_Reply):
    """A desktop just started (``POST /envs``)."""

    id: str
    width: int
    height: int
    osworld_port: int | None = None

    @property
    def screen(self) -> tuple[int, int]:
        return self.width, self.height


class DesktopInfo(Created):
    """One desktop of a service (``GET /envs``, ``GET /envs/{id}``)."""

    display: str = ""
    task: str | None = None
    alive: bool = True
    sandboxed: bool = False


class Closed(_Reply):
    closed: str


class Alive(_Reply):
    alive: bool


class ResetRequest(BaseModel):
    task: dict[str, Any] | None = None
    image_size: tuple[int, int] | None = Field(None, description="resize the screenshot to (w, h)")


class StepRequest(BaseModel):
    action: dict[str, Any]
    image_size: tuple[int, int] | None = None
    screenshot: bool = True


class ResetReply(_Reply):
    screenshot: str                 # PNG, base64
    size: tuple[int, int]           # of the PNG (resized when the request asked)
    screen: tuple[int, int]         # the desktop's own
    info: dict[str, Any] = Field(default_factory=dict)


class StepReply(_Reply):
    info: dict[str, Any] = Field(default_factory=dict)   # the action's error, if any, and timings
    terminated: bool = False
    screenshot: str | None = None   # absent when the request said screenshot=false
    size: tuple[int, int] | None = None


class EvaluateRequest(BaseModel):
    task: dict[str, Any]
    last_action: str | None = None


class EvaluateReply(_Reply):
    reward: float


# ----------------------------------------------------------------------------- OSWorld's in-VM routes
class ExecuteRequest(BaseModel):
    command: list[str] | str
    shell: bool = False
    timeout: float = Field(120.0, allow_inf_nan=False)


class ExecuteReply(_Reply):
    """``/execute``, ``/setup/execute``, ``/run_bash_script`` (``message`` only on a refused action)."""

    status: str
    output: str = ""
    error: str = ""
    returncode: int = 0
    message: str | None = None


class LaunchRequest(BaseModel):
    command: list[str] | str
    shell: bool = False


class RunPythonRequest(BaseModel):
    code: str


class RunPythonReply(_Reply):
    status: str
    message: str
    output: str
    error: str
    return_code: int


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


class Status(_Reply):
    status: str = "success"
    message: str | None = None


class ScreenSize(_Reply):
    width: int
    height: int


class DesktopPath(_Reply):
    desktop_path: str


class Terminal(_Reply):
    output: str | None


class AccessibilityTree(_Reply):
    AT: str
