"""OSWorld's in-VM server routes, per desktop: under ``/envs/{id}`` on the service's port, and at
OSWorld's own paths on the desktop's OSWorld port (``serve-envs --osworld-port``; ``service.app``
maps one onto the other). Shapes as OSWorld's server answers them (``desktop_env/server/main.py``),
so its client (``PythonController``) reads them unchanged.

Unlike OSWorld's server these are authenticated, commands run as the unprivileged desktop user,
and on plain desktops ``python -c "import pyautogui; ..."`` goes through the pyautogui allow-list
instead of running as code; /run_python and /run_bash_script are served by sandboxed desktops only.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import anyio
from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse, Response

from agentenv.envs.desktop import Desktop as DesktopObject
from agentenv.envs.desktop_types import A11yError, DesktopError
from agentenv.envs.service import recording
from agentenv.envs.service.deps import Desktop, Limits, authorized
from agentenv.envs.service.inside import (LIST_DIRECTORY, argv_of, execute, read_in_home, read_inside,
                                          sandboxed_only, write_in_home)
from agentenv.envs.tasks.getters import wallpaper_path
from agentenv.envs.tasks.setup import TaskSetupError
from agentenv.envs.wire import (AccessibilityTree, CloseWindowRequest, DesktopPath, ExecuteReply, ExecuteRequest,
                                LaunchRequest, PathRequest, RunBashRequest, RunPythonReply, RunPythonRequest,
                                ScreenSize, Status, Terminal)
from agentenv.types import Task

router = APIRouter(prefix="/envs/{did}", dependencies=[Depends(authorized)])
_EXCLUDE_NONE: dict[str, Any] = dict(response_model_exclude_none=True)

# OSWorld server routes this service does not serve, and why (answered 501, not "not found").
UNSUPPORTED = {
    "/setup/download_file": "the desktops have no network: a task's files come from the cache that "
                            "`agentenv tasks fetch` fills, through the task's download step",
    "/setup/execute_with_verification": "not served: use /setup/execute, then check",
    "/execute_with_verification": "not served: use /execute, then check",
    "/window_size": "not served: read a window's geometry with /execute (xdotool getwindowgeometry)",
}


def _inner_home(d: DesktopObject) -> str:
    return "/home/user" if d.sandboxed else str(d.home)


@router.post("/execute", response_model=ExecuteReply, **_EXCLUDE_NONE)
@router.post("/setup/execute", response_model=ExecuteReply, **_EXCLUDE_NONE)
def os_execute(d: Desktop, limits: Limits, req: ExecuteRequest):
    return execute(d, req, limits)


@router.post("/setup/launch")
def os_launch(d: Desktop, req: LaunchRequest) -> Status:
    argv = ["bash", "-c", req.command] if req.shell and isinstance(req.command, str) else argv_of(req.command)
    if any("\0" in a for a in argv):
        raise HTTPException(422, "command contains a NUL byte")
    try:
        p = d.launch(argv)
    except DesktopError as e:
        if not d.alive():
            raise
        raise HTTPException(422, str(e)) from e
    return Status(message=f"launched pid {p.pid}")


@router.post("/setup/open_file", **_EXCLUDE_NONE)
def os_open_file(d: Desktop, body: dict[str, Any]) -> Status:
    from agentenv.envs.tasks.setup import run_setup

    try:
        with d.locked():
            run_setup(d, Task(id="open_file", instruction="-", config=[{"type": "open", "parameters": body}]))
    except TaskSetupError as e:
        raise HTTPException(422, str(e)) from e
    return Status()


@router.post("/setup/activate_window", **_EXCLUDE_NONE)
def os_activate(d: Desktop, body: dict[str, Any]) -> Status:
    name = body.get("window_name")
    if not name:
        raise HTTPException(422, "window_name is required")
    if "\0" in str(name):
        raise HTTPException(422, "window_name contains a NUL byte")
    with d.locked():
        r = d.run(["xdotool", "search", "--name", str(name), "windowactivate"], timeout=10)
    if r.returncode != 0:
        raise HTTPException(404, f"no window named {name!r}")
    return Status()


@router.post("/setup/close_window", **_EXCLUDE_NONE)
def os_close_window(d: Desktop, req: CloseWindowRequest) -> Status:
    if d.close_windows(req.window_name, req.strict, req.by_class) == 0:
        if not d.alive():
            raise DesktopError(f"desktop {d.id} is closed")
        raise HTTPException(404, f"no window named {req.window_name!r}")
    return Status()


@router.post("/setup/upload", **_EXCLUDE_NONE)
async def os_upload(d: Desktop, file_path: str = Form(...), file_data: UploadFile = File(...)) -> Status:
    data = await file_data.read()

    def upload() -> None:
        with d.locked():  # not while a reset swaps HOME
            write_in_home(d, file_path, data)

    await anyio.to_thread.run_sync(upload)
    return Status()


@router.post("/file")
def os_file(d: Desktop, limits: Limits, file_path: str = Form(...)) -> Response:
    with d.locked():
        data = read_in_home(d, file_path, limits.max_file_bytes)
    return Response(data, media_type="application/octet-stream")


@router.post("/screen_size")
def os_screen_size(d: Desktop) -> ScreenSize:
    return ScreenSize(width=d.width, height=d.height)


@router.get("/platform")
def os_platform(d: Desktop) -> Response:
    return Response("Linux", media_type="text/plain")


@router.post("/cursor_position")
@router.get("/cursor_position")
def os_cursor(d: Desktop) -> list[int]:
    return list(d.pointer())


@router.post("/desktop_path")
def os_desktop_path(d: Desktop) -> DesktopPath:
    if not (d.home / "Desktop").is_dir():
        raise HTTPException(404, "the desktop user has no Desktop folder")
    return DesktopPath(desktop_path=f"{_inner_home(d)}/Desktop")


@router.post("/run_python")
def os_run_python(d: Desktop, limits: Limits, req: RunPythonRequest) -> RunPythonReply:
    sandboxed_only(d, "/run_python")
    if "\0" in req.code:
        raise HTTPException(422, "code contains a NUL byte")
    r = d.run_bounded(["python3", "-c", req.code], shell=False, timeout=limits.execute_timeout_s,
                      max_output=limits.max_output_bytes)
    ok = r["status"] == "success" and r["returncode"] == 0
    return RunPythonReply(status="success" if ok else "error", message=r["output"] if ok else r["error"],
                          output=r["output"], error=r["error"], return_code=r["returncode"])


@router.post("/run_bash_script", response_model=ExecuteReply, **_EXCLUDE_NONE)
def os_run_bash(d: Desktop, limits: Limits, req: RunBashRequest):
    sandboxed_only(d, "/run_bash_script")
    if "\0" in req.script or (req.working_dir and "\0" in req.working_dir):
        raise HTTPException(422, "script or working_dir contains a NUL byte")
    script = (f"cd {shlex.quote(req.working_dir)} || exit 1\n" if req.working_dir else "") + req.script
    r = d.run_bounded(["bash", "-c", script], shell=False, timeout=max(0.0, min(req.timeout, limits.execute_timeout_s)),
                      max_output=limits.max_output_bytes)
    return ExecuteReply(status="success" if r["returncode"] == 0 else "error", output=r["output"],
                        error=r["error"], returncode=r["returncode"])


@router.post("/list_directory")
def os_list_directory(d: Desktop, req: PathRequest) -> dict[str, Any]:
    if "\0" in req.path:
        raise HTTPException(422, "path contains a NUL byte")
    with d.locked():
        r = d.run(["python3", "-c", LIST_DIRECTORY, req.path], timeout=30)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        raise HTTPException(500, f"cannot list {req.path!r}: {r.stderr.strip()[-300:]}") from None
    if "error" in out:
        raise HTTPException(404, out["error"])
    return out


@router.get("/terminal")
def os_terminal(d: Desktop) -> Terminal:
    with d.locked():
        text = d.terminal_output()
    if text is None:
        raise HTTPException(501, "reading a terminal's text needs AT-SPI, which the sandboxed desktop has "
                                 "(serve-envs --sandbox)")
    return Terminal(output=text or None)  # null when there is no terminal, as OSWorld's server answers


@router.get("/accessibility")
def os_accessibility(d: Desktop) -> AccessibilityTree:

    try:
        with d.locked():  # a reset would end the reader mid-walk
            tree = d.accessibility_tree()
    except A11yError as e:
        raise HTTPException(503, f"no accessibility tree: {e}") from e
    if tree is None:
        raise HTTPException(501, "no accessibility tree: plain desktops run their apps without AT-SPI; "
                                 "the sandboxed desktop has it (serve-envs --sandbox)")
    return AccessibilityTree(AT=tree)


@router.post("/setup/change_wallpaper", **_EXCLUDE_NONE)
def os_change_wallpaper(d: Desktop, req: PathRequest) -> Status:
    if "\0" in req.path:
        raise HTTPException(422, "path contains a NUL byte")
    path = req.path.replace("~", _inner_home(d), 1) if req.path.startswith("~") else req.path
    # As OSWorld's server on GNOME: the setting (what an evaluator reads with gsettings).
    with d.locked():
        r = d.run(["gsettings", "set", "org.gnome.desktop.background", "picture-uri", f"file://{path}"], timeout=10)
    if r.returncode != 0:
        raise HTTPException(422, f"cannot set the wallpaper: {r.stderr.strip()[-300:]}")
    return Status()


@router.post("/wallpaper")
def os_wallpaper(d: Desktop, limits: Limits) -> Response:
    """The wallpaper's image, as OSWorld's server reads it: the file GNOME's setting names."""
    with d.locked():
        path = wallpaper_path(d)
        if not path:
            raise HTTPException(404, "no wallpaper is set")
        if d.sandboxed:  # read as the desktop's user inside its sandbox: what its commands can read
            data = read_inside(d, path, limits.max_file_bytes)
        else:
            data = read_in_home(d, path, limits.max_file_bytes)
    return Response(data, media_type="image/png")


@router.post("/start_recording", **_EXCLUDE_NONE)
def os_start_recording(d: Desktop, limits: Limits) -> Status:
    recording.start(d, max(2**20, limits.max_file_bytes * 9 // 10))
    return Status(message="Started recording successfully.")


@router.post("/end_recording")
def os_end_recording(d: Desktop, limits: Limits) -> Response:
    data = recording.end(d, limits.max_file_bytes)
    return Response(data, media_type="video/mp4",
                    headers={"Content-Disposition": 'attachment; filename="recording.mp4"'})


def _unsupported(path: str, why: str):
    def route(did: str) -> JSONResponse:
        return JSONResponse({"detail": f"{path}: {why}"}, status_code=501)
    return route


for _path, _why in UNSUPPORTED.items():
    router.add_api_route(_path, _unsupported(_path, _why), methods=["POST"], include_in_schema=False)
