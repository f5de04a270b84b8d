"""What the OSWorld routes run inside a desktop (as its user; inside its sandbox when it has one):
commands as argv, OSWorld's ``/execute`` answer, the directory tree and files read there."""

from __future__ import annotations

import base64
import shlex
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from agentenv.envs.actions import ActionError, check_action, parse_pyautogui
from agentenv.config import ServiceLimits
from agentenv.envs.wire import ExecuteReply, ExecuteRequest
from agentenv.envs.desktop import Desktop

# /list_directory: run inside the desktop (its own view of the filesystem, its user's rights).
LIST_DIRECTORY = r"""
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

# A regular file's bytes, as base64 (the runner's answers are text), after its size is checked.
_READ = r"""
f=$1; max=$2
[ -f "$f" ] || { echo "no file $f" >&2; exit 44; }
n=$(stat -L -c %s -- "$f") || exit 45
[ "$n" -le "$max" ] || { echo "$f is $n bytes" >&2; exit 46; }
exec base64 -w0 -- "$f"
"""


def argv_of(command: list[str] | str) -> list[str]:
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


def pyautogui_code(command: list[str] | str) -> str | None:
    """The code of an OSWorld-style ``python -c "import pyautogui; ..."`` command, else None."""
    argv = argv_of(command)
    if len(argv) == 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-c" \
            and "pyautogui" in argv[2]:
        return argv[2].replace("; ", "\n")
    return None


def execute(d: Desktop, req: ExecuteRequest, limits: ServiceLimits) -> ExecuteReply | JSONResponse:
    """OSWorld's ``/execute``. Inside a sandbox an OSWorld-style ``python -c "import pyautogui; ..."``
    runs as the code it is (it reaches nothing but its own desktop); on the host only its allowed
    calls run, as actions."""
    code = None if d.sandboxed else pyautogui_code(req.command)
    if code is not None:
        try:
            actions = parse_pyautogui(code, d.width, d.height)
            for a in actions:
                check_action(a)
        except ActionError as e:
            return JSONResponse({"status": "error", "message": str(e), "output": "", "error": str(e),
                                 "returncode": 1}, status_code=400)
        errors = [e for e in (d.execute(a).get("error") for a in actions) if e]
        return ExecuteReply(status="error" if errors else "success", output="", error="; ".join(errors),
                            returncode=1 if errors else 0)
    if req.shell and not isinstance(req.command, str):
        raise HTTPException(422, "shell=true needs the command as one string")
    argv: list[str] | str = req.command if req.shell else argv_of(req.command)
    if req.shell and ("\0" in req.command or not req.command.strip()):
        raise HTTPException(422, "empty command or NUL byte in it")
    r = d.run_bounded(argv, shell=req.shell, timeout=max(0.0, min(req.timeout, limits.execute_timeout_s)),
                      max_output=limits.max_output_bytes)
    return ExecuteReply(**r)


def read_inside(d: Desktop, path: str, max_bytes: int) -> bytes:
    """A file as the desktop's user sees it inside its sandbox (any path it may read there: what
    its commands can already ``cat``). 404 when it is not a regular file there, 413 over ``max_bytes``."""
    if "\0" in path:
        raise HTTPException(422, "path contains a NUL byte")
    r = d.run_bounded(["bash", "-c", _READ, "read", path, str(max_bytes)], shell=False, timeout=60,
                      max_output=max_bytes * 4 // 3 + 16)
    if r["returncode"] == 44:
        raise HTTPException(404, f"no file {path!r}")
    if r["returncode"] == 46:
        raise HTTPException(413, f"{path!r} is over the limit of {max_bytes} bytes (serve-envs --max-file-bytes)")
    if r["returncode"] != 0:
        raise HTTPException(422, f"cannot read {path!r}: {(r['error'] or '').strip()[-300:]}")
    return base64.b64decode(r["output"])


def read_in_home(d: Desktop, path: str, max_bytes: int) -> bytes:
    """A file in the desktop's HOME, read by the service without following a link."""
    try:
        data = d.read_file(path, max_bytes)  # component by component, no link followed
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise HTTPException(404, f"no file {path!r}") from e
    except PermissionError:
        raise
    except OSError as e:  # a name too long, a symlink swapped in...
        raise HTTPException(422, f"cannot open {path!r}: {e.strerror or e}") from e
    if len(data) > max_bytes:
        raise HTTPException(413, f"{path!r} is over the limit of {max_bytes} bytes (serve-envs --max-file-bytes)")
    return data


def write_in_home(d: Desktop, path: str, data: bytes) -> None:
    try:
        d.write_file(path, data)  # component by component, no link followed
    except IsADirectoryError as e:
        raise HTTPException(422, f"{path!r} is a directory or not a regular file") from e
    except PermissionError:
        raise
    except OSError as e:  # a file where a folder should be, a symlink, a folder where the file should be...
        raise HTTPException(422, f"cannot write {path!r}: {e.strerror or e}") from e


def sandboxed_only(d: Desktop, route: str) -> None:
    if not d.sandboxed:
        raise HTTPException(403, f"{route} runs arbitrary code: it is served by sandboxed desktops only "
                                 "(serve-envs --sandbox)")
