"""OSWorld commands on a desktop that is not OSWorld's VM.

OSWorld's task files assume an Ubuntu VM: ``python`` (not only ``python3``), HOME ``/home/user``,
``echo password | sudo -S ...``, and ``python -c "import pyautogui; ..."`` run as code. A desktop
that says it looks like OSWorld's VM from inside (``desktop.osworld_like`` true: the sandboxed
desktop) gets every command unchanged. On any other desktop, :func:`adapt` rewrites a command so
it means the same there: ``python`` becomes ``python3``, ``/home/user`` the desktop's HOME, and
``sudo`` is dropped (the command then runs as the desktop user, which is all a desktop without a
sandbox may do: a step that really needs root fails with its own error). pyautogui code never runs
as code on either: :func:`pyautogui_code` finds it and the caller sends it through the allow-list.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

OSWORLD_HOME = "/home/user"
OSWORLD_PASSWORD = "password"

# `echo password | sudo -S cmd`, `echo 'password' | sudo -S -k cmd`, `sudo -S cmd`, `sudo cmd`
_SUDO_PIPE = re.compile(r"""echo\s+(['"]?)%s\1\s*\|\s*""" % OSWORLD_PASSWORD)
_SUDO = re.compile(r"(?<![\w/.-])sudo((?:\s+-[A-Za-z]+)*)\s+")


def osworld_like(desktop: Any) -> bool:
    """True when the desktop looks like OSWorld's VM from inside: commands go through unchanged."""
    return bool(getattr(desktop, "osworld_like", False))


def pyautogui_code(command: Any) -> str | None:
    """The code of an OSWorld-style ``python -c "import pyautogui; ..."`` command, else None."""
    try:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
    except (ValueError, TypeError):
        return None
    if len(argv) == 3 and isinstance(argv[0], str) and Path(argv[0]).name.startswith("python") \
            and argv[1] == "-c" and isinstance(argv[2], str) and "pyautogui" in argv[2]:
        return argv[2]
    return None


def substitute(command: Any, width: int, height: int) -> Any:
    """desktop-env's placeholders in a setup ``execute``/``command`` step's command (a string or each
    string of a list): the VM's password and the screen's size and half size."""
    values = {"{CLIENT_PASSWORD}": OSWORLD_PASSWORD, "{SCREEN_WIDTH_HALF}": str(width // 2),
              "{SCREEN_HEIGHT_HALF}": str(height // 2), "{SCREEN_WIDTH}": str(width), "{SCREEN_HEIGHT}": str(height)}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    if isinstance(command, str):
        return fill(command)
    if isinstance(command, list):
        return [fill(c) if isinstance(c, str) else c for c in command]
    return command


def _map_home(text: str, home: str) -> str:
    # /home/user and /home/user/... only: not /home/username
    return re.sub(r"%s(?=/|\b|$)(?![\w-])" % re.escape(OSWORLD_HOME), home, text)


def adapt_shell(cmd: str, home: str) -> str:
    """A shell command string as it means the same on a desktop without OSWorld's VM layout."""
    cmd = _SUDO_PIPE.sub("", cmd)
    cmd = _SUDO.sub("", cmd)
    cmd = re.sub(r"(?<![\w/.-])python(?=\s|$)", "python3", cmd)
    return _map_home(cmd, home)


def adapt_argv(argv: list[str], home: str) -> list[str]:
    """An argv list as it means the same on a desktop without OSWorld's VM layout."""
    argv = list(argv)
    while argv and Path(argv[0]).name == "sudo":  # sudo [-S] [-k] cmd ...
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    if argv and argv[0] == "python":
        argv[0] = "python3"
    return [_map_home(a, home) for a in argv]


def adapt(desktop: Any, command: Any, shell: bool) -> Any:
    """``command`` (argv list or shell string) as it should run on ``desktop``."""
    if osworld_like(desktop):
        return command
    home = str(desktop.home)
    if shell:
        return adapt_shell(command, home)
    return adapt_argv(command, home)


def map_path(desktop: Any, path: str) -> str:
    """A path from a task file (``/home/user/x``, ``~/x``) as the desktop knows it."""
    if osworld_like(desktop) or not isinstance(path, str):
        return path
    return _map_home(path, str(desktop.home))


def shell_flag(value: Any, command: Any) -> bool:
    """OSWorld files say ``"shell": true``, ``"shell": "true"`` or nothing (then a string is a shell
    command only for our own files; OSWorld splits it)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if value is None:
        return False
    return bool(value)


def program(command: Any, shell: bool) -> str | None:
    """The program a command runs, for reports (``tasks check``): sudo and env assignments skipped."""
    try:
        if shell and isinstance(command, str):
            words = shlex.split(adapt_shell(command, OSWORLD_HOME))
        else:
            words = adapt_argv(shlex.split(command) if isinstance(command, str) else [str(c) for c in command],
                               OSWORLD_HOME)
    except (ValueError, TypeError):
        return None
    while words and "=" in words[0] and not words[0].startswith("="):
        words = words[1:]
    return words[0] if words else None
