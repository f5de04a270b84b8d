"""OSWorld's getters for the Impress, GIMP, VLC and Thunderbird tasks.

desktop-env's own getter functions where they read files or run Python in the VM: they are called
with ``OSWorldEnvView``, the part of desktop-env's env and ``PythonController`` they use, answered
by our desktop. Ours where theirs talk HTTP to the VM from outside: VLC's HTTP interface listens
inside the desktop's network namespace (no one outside it can reach it), so it is read from inside.
"""

from __future__ import annotations

import contextlib
import copy
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from agentenv.envs.tasks import commands
from agentenv.envs.tasks.getters import EvalContext, EvaluatorError, read_desktop_file, wallpaper_path

# What OSWorld's VM gives VLC (its vlcrc, our app_defaults.py): the HTTP interface on this port,
# this password; desktop-env's vlc getter reads it as ``env.vlc_port`` with that password.
VLC_HTTP_PORT = 8080
VLC_HTTP_PASSWORD = "password"


class _Controller:
    """What desktop-env's getters call on its ``PythonController``, done on our desktop."""

    def __init__(self, desktop: Any) -> None:
        self.desktop = desktop

    def get_file(self, file_path: str) -> bytes | None:
        return read_desktop_file(self.desktop, file_path)

    def get_vm_wallpaper(self) -> bytes:
        """The wallpaper's image: the file GNOME's setting names, as OSWorld's server reads it."""
        path = wallpaper_path(self.desktop)
        data = read_desktop_file(self.desktop, path) if path else None
        if data is None:
            raise EvaluatorError(f"vm_wallpaper: no wallpaper image (picture-uri {path!r})")
        return data

    def execute_python_command(self, command: str) -> dict[str, Any]:
        r = self.desktop.run(["python3", "-c", command], timeout=30)
        return {"status": "success" if r.returncode == 0 else "error", "output": r.stdout,
                "error": r.stderr, "returncode": r.returncode}


class OSWorldEnvView:
    """What desktop-env's getters read from its ``DesktopEnv``: the platform, a cache folder for the
    files they fetch, and the controller."""

    vm_platform = "Linux"

    def __init__(self, ctx: EvalContext) -> None:
        self.cache_dir = str(ctx.tmp)
        self.controller = _Controller(ctx.desktop)


def _safe_dest(spec: dict, key: str = "dest") -> dict:
    """Their getters join ``dest`` to the cache folder: keep only its last component."""
    if key not in spec:
        return dict(spec)
    return {**spec, key: Path(str(spec[key])).name or "file"}


def _theirs(module: str, func: str) -> Callable[[EvalContext, dict], Any]:
    def getter(ctx: EvalContext, spec: dict) -> Any:
        from agentenv.envs.tasks.osworld_lib import getter_module

        try:
            fn = getattr(getter_module(module), func)
        except ImportError as e:
            raise EvaluatorError(f"desktop-env's getters/{module}.py does not load here: {e}") from e
        with contextlib.redirect_stdout(sys.stderr):  # theirs print (the gimp one, its platform)
            # a deep copy: some write into their config (rule_relativeTime puts the date it computed
            # into the rules), which would change the task's evaluator for the next evaluation
            return fn(OSWorldEnvView(ctx), _safe_dest(copy.deepcopy(spec)))

    getter.__name__ = f"os_{func}"
    return getter


def os_vlc_playing_info(ctx: EvalContext, spec: dict) -> str | None:
    """VLC's ``/requests/status.xml`` (its HTTP interface, inside the desktop), saved as ``dest``."""
    url = f"http://127.0.0.1:{VLC_HTTP_PORT}/requests/status.xml"
    r = ctx.desktop.run(["curl", "-sS", "-m", "5", "-u", f":{VLC_HTTP_PASSWORD}", "-w", "\n%{http_code}", url],
                        timeout=15)
    body, _, code = r.stdout.rpartition("\n")
    if r.returncode != 0 or code.strip() != "200":
        return None  # as desktop-env's getter: no status, no file (the metric then fails the task)
    dest = ctx.tmp / _safe_dest(spec)["dest"]
    dest.write_text(body)
    return str(dest)


def os_vm_window_size(ctx: EvalContext, spec: dict) -> dict | None:
    """The size of the first visible window of X class ``app_class_name``: {"width", "height"}."""
    r = ctx.desktop.run(["xdotool", "search", "--onlyvisible", "--limit", "1", "--class",
                         str(spec["app_class_name"]), "getwindowgeometry", "--shell"], timeout=10)
    geo = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    if r.returncode != 0 or "WIDTH" not in geo:
        return None
    return {"width": int(geo["WIDTH"]), "height": int(geo["HEIGHT"])}


# The video types desktop-env's default_video_player asks xdg-mime about.
_VIDEO_TYPES = ("3gp", "3gpp", "3gpp2", "avi", "divx", "dv", "fli", "flv", "mp2t", "mp4", "mp4v-es", "mpeg",
                "mpeg-system", "msvideo", "ogg", "quicktime", "vnd.divx", "vnd.mpegurl", "vnd.rn-realvideo",
                "webm", "x-anim", "x-avi", "x-flc", "x-fli", "x-flv", "x-m4v", "x-matroska", "x-mpeg",
                "x-mpeg-system", "x-mpeg2", "x-ms-asf", "x-ms-asf-plugin", "x-ms-asx", "x-ms-wm", "x-ms-wmv",
                "x-ms-wmx", "x-ms-wvx", "x-msvideo", "x-nsv", "x-ogm", "x-ogm+ogg", "x-theora", "x-theora+ogg")


def os_default_video_player(ctx: EvalContext, spec: dict) -> str:
    """The app most video types open with (``xdg-mime query default``), 'unknown' when none."""
    script = "; ".join(f"xdg-mime query default {shlex.quote('video/' + t)}" for t in _VIDEO_TYPES)
    r = ctx.desktop.run(commands.adapt(ctx.desktop, script, True), shell=True, timeout=30)
    apps = [line + "\n" for line in r.stdout.splitlines() if line.strip()]  # theirs keeps the newline
    return Counter(apps).most_common(1)[0][0] if apps else "unknown"


APP_GETTERS: dict[str, Callable[[EvalContext, dict], Any]] = {
    "gimp_config_file": _theirs("gimp", "get_gimp_config_file"),
    "vlc_config": _theirs("vlc", "get_vlc_config"),
    "audio_in_slide": _theirs("impress", "get_audio_in_slide"),
    "background_image_in_slide": _theirs("impress", "get_background_image_in_slide"),
    "vm_wallpaper": _theirs("info", "get_vm_wallpaper"),
    "rule_relativeTime": _theirs("misc", "get_rule_relativeTime"),  # dates relative to today
    "time_diff_range": _theirs("misc", "get_time_diff_range"),
    "vlc_playing_info": os_vlc_playing_info,
    "vm_window_size": os_vm_window_size,
    "default_video_player": os_default_video_player,
}
