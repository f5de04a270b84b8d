"""OSWorld task setup steps (``config``) and ``evaluator.postconfig``, run on a desktop.

Supported types: launch, open, execute / command, sleep, activate_window, close_window,
upload_file, download (through the URL cache), chrome_open_tabs, chrome_close_tabs (Chrome's DevTools
port inside the desktop: cdp.py). A ``python -c "import pyautogui;
..."`` command goes through the pyautogui allow-list (``agentenv.envs.actions``) and runs as our own
actions, never as code. Commands are adapted to a desktop that is not OSWorld's VM
(``agentenv.envs.tasks.commands``). Types we cannot run fail with an error naming the step and
what is missing (``UNSUPPORTED``).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from agentenv.envs.apps import OPENERS
from agentenv.envs.desktop_types import DesktopError
from agentenv.envs.tasks import commands
from agentenv.types import Task


class TaskSetupError(RuntimeError):
    """A setup step of a task failed or is not supported; the message names the step."""


# Setup types OSWorld files use that need something this machine lacks: type -> what is missing.
UNSUPPORTED: dict[str, str] = {
    "googledrive": "network and a Google Drive account",
    "login": "network and a website account",
    "update_browse_history": "Google Chrome's history database",
    "tidy_desktop": "a GNOME desktop",
    "proxy": "network (an HTTP proxy)",
    "change_wallpaper": "a GNOME desktop",
}

# Programs whose launch waits for their first window (so the first action lands on it); others
# (socat, python, bash) are not GUI apps and are not waited for.
GUI_PROGRAMS = {"editor", "terminal", "calculator", "files", "spreadsheet", "browser", "mousepad",
                "xfce4-terminal", "galculator", "pcmanfm", "libreoffice", "soffice", "localc", "lowriter",
                "chromium", "google-chrome", "gedit", "code", "gimp", "vlc", "thunderbird", "nautilus",
                "gnome-terminal"}

# Windows whose first title does not say the app is ready: VS Code's (a Chromium app window,
# sandbox_code.py) is "Visual Studio Code" while its page loads, "<editor> - Visual Studio Code" once
# the workbench shows an editor (a file, or the Welcome page).
LAUNCH_WINDOWS = {"code": " - Visual Studio Code"}


def _step_name(where: str, i: int, step: dict[str, Any]) -> str:
    return f"{where}[{i}] ({step.get('type', '?')})"


def task_cache_dir(desktop: Any, task: Task) -> Path:
    """OSWorld's per-task cache folder, outside the desktop's reach: ``execute`` steps with
    ``stdout``/``stderr`` write there and the ``cache_file`` getter reads it. Emptied when the task
    is set up (a route that runs one setup step, /setup/open_file, has a task of its own)."""
    base = getattr(desktop, "root", None)
    base = Path(base) if base else Path(tempfile.gettempdir()) / f"agentenv-{getattr(desktop, 'id', os.getpid())}"
    return base / "task-cache" / hashlib.sha256(task.id.encode()).hexdigest()[:16]


def run_setup(desktop: Any, task: Task) -> None:
    from agentenv.envs.tasks.network import desktop_has_network, needs_network

    live = needs_network(task)
    if live and not desktop_has_network(desktop):
        raise TaskSetupError(f"task {task.id} needs the network ({live[0]}), which sandboxed desktops have "
                             "only when the operator allows it (env.sandbox_network / --sandbox-network)")
    shutil.rmtree(task_cache_dir(desktop, task), ignore_errors=True)  # made again by a step that writes
    run_steps(desktop, task, task.config, "config")


def run_postconfig(desktop: Any, task: Task) -> None:
    """OSWorld runs ``evaluator.postconfig`` before scoring: sleeps, window activation, a command that
    saves the file the metric reads."""
    steps = task.evaluator.get("postconfig") if isinstance(task.evaluator, dict) else None
    if steps is None:
        return
    if not isinstance(steps, list):
        raise TaskSetupError(f"task {task.id}: evaluator.postconfig must be a list of steps")
    run_steps(desktop, task, steps, "evaluator.postconfig")


def run_steps(desktop: Any, task: Task, steps: list[Any], where: str) -> None:
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or "type" not in step:
            raise TaskSetupError(f"task {task.id}: {_step_name(where, i, step if isinstance(step, dict) else {})}: "
                                 "each setup step needs a 'type'")
        name = _step_name(where, i, step)
        kind = step["type"]
        fn = SETUP_STEPS.get(kind) if isinstance(kind, str) else None
        if fn is None:
            if isinstance(kind, str) and kind in UNSUPPORTED:
                raise TaskSetupError(f"task {task.id}: {name}: needs {UNSUPPORTED[kind]}, which this machine lacks")
            raise TaskSetupError(f"task {task.id}: {name}: unsupported setup type "
                                 f"{kind!r} (supported: {sorted(SETUP_STEPS)})")
        params = step.get("parameters") or {}
        if not isinstance(params, dict):
            raise TaskSetupError(f"task {task.id}: {name}: 'parameters' must be an object")
        try:
            fn(desktop, task, params)
        except TaskSetupError as e:
            raise TaskSetupError(f"task {task.id}: {name}: {e}") from e
        except DesktopError as e:  # an app that is not installed; a dead X server stays a dead desktop
            if not desktop.alive():
                raise
            raise TaskSetupError(f"task {task.id}: {name}: {e}") from e
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RuntimeError,
                subprocess.SubprocessError) as e:  # parameters of the wrong kind, a failed download
            raise TaskSetupError(f"task {task.id}: {name}: {type(e).__name__}: {e}") from e


def _bounded(value: Any, most: float) -> float:
    """A duration from a task file, within [0, most]: a task must not hold a desktop for hours."""
    v = float(value)
    if v != v:
        raise TaskSetupError(f"duration {value!r} is not a number")
    return min(max(v, 0.0), most)


def _argv(command: Any) -> list[str]:
    if isinstance(command, str):
        return shlex.split(command)
    if isinstance(command, list) and command and all(isinstance(c, str) for c in command):
        return list(command)
    raise TaskSetupError(f"command must be a string or a non-empty list of strings, got {command!r}")


def _launch(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    cmd = p.get("command")
    if commands.shell_flag(p.get("shell"), cmd) and isinstance(cmd, str):
        argv = ["bash", "-c", commands.adapt(desktop, cmd, True)]
        prog = Path(commands.program(cmd, True) or "bash").name  # `gedit x &` waits for gedit's window
    else:
        argv = commands.adapt(desktop, _argv(cmd), False)
        prog = Path(argv[0]).name
    before = len(desktop.window_titles())
    desktop.launch([desktop.resolve_path(a) if a.startswith("~/") else a for a in map(str, argv)])
    # Wait for the app's window so the first action lands on it, not on an empty screen.
    wait = p.get("wait", prog in GUI_PROGRAMS)
    window = p.get("window", LAUNCH_WINDOWS.get(prog))
    if wait and not desktop.wait_for_window(window, _bounded(p.get("timeout", 45), 120), before=before):
        raise TaskSetupError(f"no window appeared for {argv[0]!r}")
    time.sleep(_bounded(p.get("settle", 0.3 if wait else 0.0), 10))


# Extensions OSWorld opens that our desktop's OPENERS do not list: the LibreOffice module for each.
OFFICE_MODULES = {".docx": "--writer", ".doc": "--writer", ".odt": "--writer", ".rtf": "--writer",
           ".xls": "--calc", ".pptx": "--impress", ".odp": "--impress"}
OFFICE_PROGRAMS = {"--writer": "lowriter", "--calc": "localc", "--impress": "loimpress"}


def _open(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    path = desktop.resolve_path(commands.map_path(desktop, p["path"]))
    if not path.exists():
        raise TaskSetupError(f"file {p['path']!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv" and task.extra.get("snapshot") not in (None, "agentenv-local"):
        suffix = ".ods"  # OSWorld's VM opens .csv files in LibreOffice Calc
    if p.get("app"):
        argv = [p["app"], str(path)]
    elif suffix in OPENERS:
        argv = [OPENERS[suffix], str(path)]
    elif suffix in OFFICE_MODULES:
        module = OFFICE_MODULES[suffix]
        if shutil.which(OFFICE_PROGRAMS[module], path="/usr/local/bin:/usr/bin:/bin") is None:
            raise TaskSetupError(f"{path.name} needs LibreOffice {module[2:]} ({OFFICE_PROGRAMS[module]}), "
                                 "which is not installed")
        argv = ["libreoffice", module, "--norestore", str(path)]
    else:
        raise TaskSetupError(f"no app opens {suffix!r} files")
    _launch(desktop, task, {**p, "command": argv, "shell": False, "wait": p.get("wait", True),
                            "window": p.get("window", path.name)})


def run_pyautogui(desktop: Any, code: str) -> None:
    """pyautogui code from a task file, through the allow-list, as our own actions."""
    from agentenv.envs.actions import ActionError, parse_pyautogui

    try:
        actions = parse_pyautogui(code, desktop.width, desktop.height)
    except ActionError as e:
        raise TaskSetupError(str(e)) from e
    for a in actions:
        err = desktop.execute(a).get("error")
        if err:
            raise TaskSetupError(f"pyautogui action {a.type}: {err}")


def run_command(desktop: Any, cmd: Any, shell: bool, timeout: float) -> subprocess.CompletedProcess:
    """A task file's command on the desktop (adapted to it), as the desktop user."""
    if shell:
        if not isinstance(cmd, str):
            raise TaskSetupError(f"a shell command must be a string, got {cmd!r}")
        return desktop.run(commands.adapt(desktop, cmd, True), timeout=timeout, shell=True)
    return desktop.run(commands.adapt(desktop, _argv(cmd), False), timeout=timeout, shell=False)


# desktop-env's SetupController (1.0.2, the one installed) runs an `execute` step once, or with `until`
# again every 0.3 s until any one of its conditions holds or 5 requests have failed (a command that
# could not run or timed out; an exit status is an answer, not a failure); then setup goes on either
# way. With conditions that never hold it would retry for ever: ours stops after UNTIL_MAX_S and fails
# the task, naming the condition.
MAX_FAILED_RUNS = 5
UNTIL_MAX_S = 60.0
UNTIL_PAUSE_S = 0.3


def _until_met(until: dict[str, Any], r: subprocess.CompletedProcess) -> bool:
    """desktop-env's rule: any one of the conditions given (returncode, stdout, stderr) ends the loop."""
    return ("returncode" in until and r.returncode == until["returncode"]) \
        or ("stdout" in until and str(until["stdout"]) in r.stdout) \
        or ("stderr" in until and str(until["stderr"]) in r.stderr)


def _run_until(desktop: Any, task: Task, cmd: Any, shell: bool, timeout: float,
               until: dict[str, Any]) -> subprocess.CompletedProcess | None:
    """Run ``cmd`` as desktop-env's ``_execute_setup`` does; None when the last run failed."""
    failed = 0
    deadline = time.monotonic() + UNTIL_MAX_S
    while True:
        r = None
        try:
            r = run_command(desktop, cmd, shell, timeout)
        except (subprocess.TimeoutExpired, FileNotFoundError, PermissionError, NotADirectoryError) as e:
            failed += 1
            logger.warning("task {}: setup command {!r} could not run ({}/{}): {}: {}", task.id, cmd, failed,
                           MAX_FAILED_RUNS, type(e).__name__, e)
        if not until or (r is not None and _until_met(until, r)) or failed >= MAX_FAILED_RUNS:
            return r
        if r is not None and time.monotonic() > deadline:
            raise TaskSetupError(f"command never met its 'until' condition {until!r} in {UNTIL_MAX_S:.0f} s "
                                 f"(last exit status {r.returncode})")
        time.sleep(UNTIL_PAUSE_S)


def _execute(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    # desktop-env fills in {CLIENT_PASSWORD}, {SCREEN_WIDTH}... in these steps' commands only.
    cmd = commands.substitute(p.get("command"), desktop.width, desktop.height)
    code = commands.pyautogui_code(cmd)
    if code is not None:
        try:
            run_pyautogui(desktop, code)
            return
        except TaskSetupError:
            # Code the allow-list refuses runs as code only where that is harmless: inside a desktop
            # that looks like OSWorld's VM (the sandbox), as OSWorld runs it.
            if not commands.osworld_like(desktop):
                raise
    # A string without "shell" is a shell command in our own files; OSWorld's server splits it,
    # which for the commands its files hold is the same thing.
    shell = commands.shell_flag(p.get("shell"), cmd) if "shell" in p else isinstance(cmd, str)
    until = p.get("until") if isinstance(p.get("until"), dict) else {}
    r = _run_until(desktop, task, cmd, shell, _bounded(p.get("timeout", 60), 300), until)
    if r is None:
        return  # logged; desktop-env goes on too
    for stream in ("stdout", "stderr"):  # OSWorld keeps a command's output for the cache_file getter
        name = p.get(stream)
        if isinstance(name, str) and name:
            dest = task_cache_dir(desktop, task) / Path(name).name
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest.write_text(getattr(r, stream))
    if r.returncode != 0:  # desktop-env logs it and goes on: the task's next steps or its metric decide
        logger.info("task {}: setup command {!r} exited {}: {}", task.id, cmd, r.returncode, r.stderr.strip()[:300])


def _sleep(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    time.sleep(_bounded(p.get("seconds", 1), 30))


def _xdotool_search(p: dict[str, Any]) -> list[str]:
    name = p.get("window_name")
    if not name or not isinstance(name, str) or "\0" in name:
        raise TaskSetupError("window_name must be a non-empty string")
    pattern = "^" + name + "$" if commands.shell_flag(p.get("strict"), None) else name
    by = "--class" if commands.shell_flag(p.get("by_class"), None) else "--name"
    return ["xdotool", "search", "--onlyvisible", "--limit", "1", by, pattern]


# Window names OSWorld's files use for apps that are another one here: google-chrome is Chromium,
# whose windows are titled "... - Chromium".
WINDOW_ALIASES = {"Google Chrome": "Chromium"}


def _activate_window(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    r = desktop.run(_xdotool_search(p) + ["windowactivate", "--sync"], timeout=10)
    if r.returncode != 0 and p.get("window_name") in WINDOW_ALIASES:
        alias = {**p, "window_name": WINDOW_ALIASES[p["window_name"]]}
        r = desktop.run(_xdotool_search(alias) + ["windowactivate", "--sync"], timeout=10)
    if r.returncode != 0:
        raise TaskSetupError(f"no window named {p['window_name']!r}")


def _close_window(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    r = desktop.run(_xdotool_search(p) + ["windowkill"], timeout=10)
    if r.returncode != 0:
        raise TaskSetupError(f"no window named {p['window_name']!r}")


def write_desktop_file(desktop: Any, path: str, src: Path) -> None:
    """Copy ``src`` to ``path`` on the desktop (a path of the task file: ``/home/user/x``, ``~/x``);
    the desktop writes it without following a link in HOME."""
    desktop.write_file(commands.map_path(desktop, path), src.read_bytes())


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
        write_desktop_file(desktop, f["path"], local)


def _download(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    from agentenv.envs.tasks.cache import DownloadCache, DownloadError

    cache = DownloadCache.from_config()
    files = p.get("files")
    if not isinstance(files, list) or not files:
        raise TaskSetupError("download needs 'files': [{url, path}, ...]")
    for f in files:
        try:
            src = cache.get(f["url"])
        except DownloadError as e:
            raise TaskSetupError(str(e)) from e
        write_desktop_file(desktop, f["path"], src)


def _urls(p: dict[str, Any], key: str) -> list[str]:
    urls = p.get(key)
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise TaskSetupError(f"needs {key!r}: a list of URLs")
    return urls


def _chrome_open_tabs(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    """Tabs opened through Chrome's DevTools port (1337) inside the desktop, as OSWorld's setup does;
    the task's earlier ``launch`` step started google-chrome with it. Where no Chrome runs, one is
    launched with the port (as OSWorld's getters do); a plain desktop has no port (it would be the
    host's): the pages open as the browser's arguments."""
    from agentenv.envs.tasks import cdp

    urls = _urls(p, "urls_to_open")
    if not getattr(desktop, "sandboxed", False):
        _launch(desktop, task, {"command": ["browser", *urls], "wait": True})
        return
    if desktop.run(["pgrep", "-x", "chromium"], timeout=10).returncode != 0:
        _launch(desktop, task, {"command": ["google-chrome", f"--remote-debugging-port={cdp.CDP_PORT}"]})
    try:
        cdp.open_tabs(desktop, urls)
    except cdp.CdpError as e:
        raise TaskSetupError(str(e)) from e


def _chrome_close_tabs(desktop: Any, task: Task, p: dict[str, Any]) -> None:
    from agentenv.envs.tasks import cdp

    try:
        cdp.close_tabs(desktop, _urls(p, "urls_to_close"))
    except cdp.CdpError as e:
        raise TaskSetupError(str(e)) from e


SETUP_STEPS: dict[str, Callable[[Any, Task, dict[str, Any]], None]] = {
    "launch": _launch,
    "open": _open,
    "execute": _execute,
    "command": _execute,
    "sleep": _sleep,
    "activate_window": _activate_window,
    "close_window": _close_window,
    "upload_file": _upload_file,
    "download": _download,
    "chrome_open_tabs": _chrome_open_tabs,
    "chrome_close_tabs": _chrome_close_tabs,
}
