"""OSWorld's own Chrome getters (desktop-env's ``evaluators/getters/chrome.py``) on our desktops.

Each getter takes OSWorld's ``env`` (a ``DesktopEnv``) and reads through it: ``env.controller``
(``get_file``, ``execute_python_command``, ``get_accessibility_tree``) for the profile's files
(``~/.config/google-chrome/Default``: Bookmarks, History, Preferences, Cookies) and
``env.vm_ip``/``env.chromium_port`` for Playwright's ``connect_over_cdp``. :class:`OSWorldEnv` is that
object for one of our desktops; the getter runs inside the desktop's network namespace
(``cdp.in_desktop_network``), where ``127.0.0.1:1337`` is the Chrome the task launched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from agentenv.envs.tasks import cdp, osworld_lib
from agentenv.envs.tasks.getters import EvalContext, EvaluatorError, read_desktop_file

# Getters of desktop-env's chrome.py that are not offered: name -> what is missing.
NOT_OFFERED = {"googledrive_file": "network and a Google Drive account (pydrive)"}
SERVER_PORT = 5000  # OSWorld's in-VM server: nothing listens there inside our desktops


class _Controller:
    """The part of desktop-env's ``PythonController`` OSWorld's Chrome getters call."""

    def __init__(self, desktop: Any):
        self.desktop = desktop

    def execute_python_command(self, command: str) -> dict[str, Any]:
        r = self.desktop.run(["python3", "-c", command], timeout=30)
        return {"status": "success" if r.returncode == 0 else "error", "output": r.stdout,
                "error": r.stderr, "returncode": r.returncode}

    def get_file(self, file_path: str) -> bytes | None:
        return read_desktop_file(self.desktop, file_path)

    def get_accessibility_tree(self) -> str | None:
        return self.desktop.accessibility_tree()

    def get_vm_desktop_path(self) -> str:
        return self.execute_python_command("import os; print(os.path.expanduser('~/Desktop'))")["output"].strip()


@dataclass
class OSWorldEnv:
    """What OSWorld's getters read of their ``env``, for one of our desktops."""

    controller: _Controller
    cache_dir: str
    vm_ip: str = "127.0.0.1"
    chromium_port: int = cdp.CDP_PORT  # the port itself: OSWorld's 9222 is a socat forward to it
    server_port: int = SERVER_PORT
    vm_platform: str = "Linux"
    current_use_proxy: bool = False


def osworld_getter(name: str) -> Callable[..., Any] | None:
    """desktop-env's ``get_<name>`` of chrome.py, or None if it has none."""
    if name in NOT_OFFERED:
        return None
    try:
        mod = osworld_lib.getter_module("chrome")
    except ImportError as e:
        raise EvaluatorError(f"desktop-env's getters/chrome.py does not load here ({e})") from e
    fn = getattr(mod, f"get_{name}", None)
    return fn if callable(fn) else None


def getter_names() -> set[str]:
    """The Chrome getter names we offer (task files' ``type``)."""
    try:
        mod = osworld_lib.getter_module("chrome")
    except ImportError:
        return set()
    return {n[4:] for n, f in vars(mod).items()
            if n.startswith("get_") and callable(f) and f.__module__ == mod.__name__} - set(NOT_OFFERED)


def run_getter(ctx: EvalContext, name: str, spec: dict) -> Any:
    fn = osworld_getter(name)
    if fn is None:
        raise EvaluatorError(f"getter {name!r} is not one of desktop-env's Chrome getters we offer")
    env = OSWorldEnv(_Controller(ctx.desktop), str(ctx.tmp))
    try:
        return cdp.in_desktop_network(ctx.desktop, lambda: fn(env, spec))
    except cdp.CdpError as e:
        raise EvaluatorError(f"{name}: {e}") from e


def getter(name: str) -> Callable[[EvalContext, dict], Any]:
    return lambda ctx, spec: run_getter(ctx, name, spec)
