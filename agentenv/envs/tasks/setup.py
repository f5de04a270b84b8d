"""OSWorld task setup steps (``config``), run on a LocalDesktop.

Supported types: launch, open, execute / command, sleep, activate_window, upload_file.
``download`` needs a network we do not have: it fails with an error naming the step, as does any
unknown type.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from agentenv.types import Task


class TaskSetupError(RuntimeError):
    """A setup step of a task failed or is not supported; the message names the step."""


def _step_name(i: int, step: dict[str, Any]) -> str:
    return f"config[{i}] ({step.get('type', '?')})"


def run_setup(desktop: Any, task: Task) -> None:
    from agentenv.envs.xvfb import DesktopError

    for i, step in enumerate(task.config):
        if not isinstance(step, dict) or "type" not in step:
            raise TaskSetupError(f"task {task.id}: {_step_name(i, step if isinstance(step, dict) else {})}: "
                                 "each setup step needs a 'type'")
        fn = SETUP_STEPS.get(step["type"]) if isinstance(step["type"], str) else None
        if fn is None:
            raise TaskSetupError(f"task {task.id}: {_step_name(i, step)}: unsupported setup type "
                                 f"{step['type']!r} (supported: {sorted(SETUP_STEPS)})")
        params = step.get("parameters") or {}
        if not isinstance(params, dict):
            raise TaskSetupError(f"task {task.id}: {_step_name(i, step)}: 'parameters' must be an object")
        try:
            fn(desktop, task, params)
        except TaskSetupError as e:
            raise TaskSetupError(f"task {task.id}: {_step_name(i, step)}: {e}") from e
        except DesktopError as e:  # an app that is not installed; a dead X server stays a dead desktop
            if not desktop.alive():
                raise
            raise TaskSetupError(f"task {task.id}: {_step_name(i, step)}: {e}") from e
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError,
                subprocess.SubprocessError) as e:  # parameters of the wrong kind
            raise TaskSetupError(f"task {task.id}: {_step_name(i, step)}: {type(e).__name__}: {e}") from e


def _bounded(value: Any, most: float) -> float:
    """A duration from a task file, within [0, most]: a task must not hold a desktop for hours."""
    v = float(value)
    if v != v:
        raise TaskSetupError(f"duration {value!r} is not a number")
    return min(max(v, 0.0), most)


def _argv(command: Any) -> list[str]:
    if isinstance(command, str):
        return shlex.split(command)
    if isinstance(command, list) and all(isinstance(c, str) for c in command):
        return list(command)
    raise TaskSetupError(f"command must be a string or a list of strings, got {command!r}")


def _launch(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    argv = _argv(p.get("command"))
    before = len(desktop.window_titles())
    desktop.launch([desktop.resolve_path(a) if a.startswith("~/") else a for a in map(str, argv)])
    # Wait for the app's window so the first action lands on it, not on an empty screen.
    if p.get("wait", True) and not desktop.wait_for_window(p.get("window"), _bounded(p.get("timeout", 45), 120),
                                                           before=before):
        raise TaskSetupError(f"no window appeared for {argv[0]!r}")
    time.sleep(_bounded(p.get("settle", 0.3), 10))


def _open(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    from agentenv.envs.xvfb import OPENERS

    path = desktop.resolve_path(p["path"])
    if not path.exists():
        raise TaskSetupError(f"file {p['path']!r} does not exist")
    app = p.get("app") or OPENERS.get(path.suffix.lower())
    if app is None:
        raise TaskSetupError(f"no app opens {path.suffix!r} files")
    _launch(desktop, task, {**p, "command": [app, str(path)], "window": p.get("window", path.name)})


def _execute(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    cmd = p.get("command")
    shell = bool(p.get("shell", isinstance(cmd, str)))
    if shell and not isinstance(cmd, str):
        raise TaskSetupError(f"a shell command must be a string, got {cmd!r}")
    r = desktop.run(cmd if shell else _argv(cmd), timeout=_bounded(p.get("timeout", 60), 300), shell=shell)
    if r.returncode != 0 and not p.get("ignore_errors"):
        raise TaskSetupError(f"command exited {r.returncode}: {r.stderr.strip()[:300]}")


def _sleep(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    time.sleep(_bounded(p.get("seconds", 1), 30))


def _activate_window(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    name = p.get("window_name")
    if not name:
        raise TaskSetupError("activate_window needs window_name")
    r = desktop.run(["xdotool", "search", "--name", name, "windowactivate", "--sync"], timeout=10)
    if r.returncode != 0:
        raise TaskSetupError(f"no window named {name!r}")


def _upload_file(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    # A task ships its files in its own folder; it does not read the host's. Its ``source`` comes
    # with the request, so the folder must also lie under a root the operator allowed.
    if not task.source:
        raise TaskSetupError("upload_file needs a task loaded from a file: its files lie beside it")
    base = Path(task.source).parent.resolve()
    roots = desktop.upload_roots()
    for f in p.get("files") or []:
        local = Path(f["local_path"])
        local = (local if local.is_absolute() else base / local).resolve()
        if base not in local.parents:
            raise TaskSetupError(f"local file {f['local_path']!r} is outside the task's folder {str(base)!r}")
        if not any(r in local.parents for r in roots):
            raise TaskSetupError(f"local file {str(local)!r} is outside the folders tasks may upload from "
                                 f"({', '.join(map(str, roots))}; serve-envs --upload-root adds one)")
        if not local.is_file():
            raise TaskSetupError(f"local file {str(local)!r} not found")
        desktop.write_file(f["path"], local.read_bytes())  # no link in HOME followed


def _download(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    urls = [f.get("url") for f in p.get("files") or []]
    raise TaskSetupError(f"download needs network access, which this machine does not have ({urls}); "
                         "ship the files with the task and use upload_file")


SETUP_STEPS = {
    "launch": _launch,
    "open": _open,
    "execute": _execute,
    "command": _execute,
    "sleep": _sleep,
    "activate_window": _activate_window,
    "upload_file": _upload_file,
    "download": _download,
}
