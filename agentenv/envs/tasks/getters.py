"""Evaluator getters: what a desktop holds at the end of a task (``result``), and what it should
hold (``expected``).

Two dialects share the names of some getters and differ in what they return:

* OSWorld's (task files from OSWorld's ``evaluation_examples``): ``vm_file`` and ``cloud_file``
  return the path of a local copy (the metric opens it), ``vm_command_line`` the command's stdout,
  ``rule`` the rules object as is. These feed OSWorld's own metric functions.
* agentenv's (the built-in suite): ``vm_file`` returns the file's text, plus ``file_exists``,
  ``window_title(s)``, ``clipboard``, ``spreadsheet_cell``, ``literal``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agentenv.envs.desktop_types import A11yError
from agentenv.envs.tasks import commands
from agentenv.types import Action, Task


class EvaluatorError(RuntimeError):
    """The evaluator spec is malformed or names a getter or metric we cannot run (and says why)."""


# The desktop user writes the files evaluators read: a file it made huge (``truncate -s 100G``)
# must not be read whole into the service's memory.
MAX_READ_BYTES = 16 * 2**20


@dataclass
class EvalContext:
    desktop: Any
    task: Task
    tmp: Path                       # local copies of the desktop's files and of gold files
    last_action: str | None = None
    names: set[str] = field(default_factory=set)


# ----------------------------------------------------------------------------- reading the desktop

def wallpaper_path(desktop: Any) -> str:
    """The file GNOME's wallpaper setting names, as OSWorld's server reads it ('' when none)."""
    r = desktop.run(["gsettings", "get", "org.gnome.desktop.background", "picture-uri"], timeout=10)
    return r.stdout.strip().strip("'").removeprefix("file://") if r.returncode == 0 else ""


def read_desktop_file(desktop: Any, path: str) -> bytes | None:
    """A file of the desktop (a task file's path), or None if it is not there or not a regular file.
    The desktop reads it without following a link (``Desktop.read_file``)."""
    path = commands.map_path(desktop, path)
    try:
        data = desktop.read_file(path, MAX_READ_BYTES)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if len(data) > MAX_READ_BYTES:
        raise EvaluatorError(f"{path!r} is over {MAX_READ_BYTES} bytes: not read")
    return data


def _local_copy(ctx: EvalContext, name: str, data: bytes | Path) -> str:
    """``data`` (bytes, or a file to copy) as ``ctx.tmp/<name>``: metrics read the extension."""
    # dest names come from the task file: keep only the last component, and never one used twice
    base = Path(str(name)).name or "file"
    dest = ctx.tmp / base
    n = 1
    while dest.name in ctx.names:
        n += 1
        dest = ctx.tmp / f"{n}-{base}"
    ctx.names.add(dest.name)
    if isinstance(data, Path):
        shutil.copyfile(data, dest)
    else:
        dest.write_bytes(data)
    return str(dest)


def _files(spec: dict) -> list[tuple[str, str]]:
    if spec.get("multi"):
        paths, dests = spec["path"], spec.get("dest") or [Path(p).name for p in spec["path"]]
        if not isinstance(paths, list) or not isinstance(dests, list) or len(paths) != len(dests):
            raise EvaluatorError("multi: 'path' and 'dest' must be lists of the same length")
        return list(zip(paths, dests))
    return [(spec["path"], spec.get("dest") or Path(str(spec["path"])).name)]


def _gives(spec: dict, values: list[Any]) -> Any:
    gives = spec.get("gives", [0])
    out = [values[i] for i in gives]
    return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------- OSWorld's getters

def os_vm_file(ctx: EvalContext, spec: dict) -> Any:
    values = []
    for path, dest in _files(spec):
        data = read_desktop_file(ctx.desktop, path)
        values.append(None if data is None else _local_copy(ctx, dest, data))
    return _gives(spec, values)


def os_cloud_file(ctx: EvalContext, spec: dict) -> Any:
    from agentenv.envs.tasks.cache import DownloadCache, DownloadError

    cache = DownloadCache.from_config()
    values = []
    for url, dest in _files(spec):
        try:
            src = cache.get(url)
        except DownloadError as e:
            raise EvaluatorError(f"cloud_file: {e}") from e
        values.append(_local_copy(ctx, dest, src))
    return _gives(spec, values)


def _command_result(ctx: EvalContext, spec: dict) -> subprocess.CompletedProcess | None:
    from agentenv.envs.tasks.setup import TaskSetupError, run_command

    cmd = spec["command"]
    shell = commands.shell_flag(spec.get("shell"), cmd)
    try:
        return run_command(ctx.desktop, cmd, shell, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    except (TaskSetupError, ValueError) as e:
        raise EvaluatorError(f"vm_command_line: {e}") from e


def os_vm_command_line(ctx: EvalContext, spec: dict) -> str | None:
    r = _command_result(ctx, spec)
    return None if r is None else r.stdout


def os_vm_command_error(ctx: EvalContext, spec: dict) -> str | None:
    r = _command_result(ctx, spec)
    return None if r is None else r.stderr


def terminal_text(desktop: Any) -> str | None:
    """The text of the desktop's terminal window: on a sandboxed desktop the terminal's text over
    AT-SPI (``terminal_output``, as OSWorld's server reads it); where that gives nothing (a plain
    desktop, or no terminal found) the terminal selects all and copies (xfce4-terminal:
    Ctrl+Shift+A, Ctrl+Shift+C) and the clipboard is read: it changes the selection, nothing else."""
    text = desktop.terminal_output()
    if text:
        return text
    r = desktop.run(["xdotool", "search", "--onlyvisible", "--limit", "1", "--class", "xfce4-terminal",
                     "windowactivate", "--sync"],
                    timeout=10)
    if r.returncode != 0:
        return None
    for keys in (["ctrl", "shift", "a"], ["ctrl", "shift", "c"]):
        desktop.execute(Action("hotkey", keys=keys))
        time.sleep(0.2)
    return desktop.clipboard()


def os_vm_terminal_output(ctx: EvalContext, spec: dict) -> str | None:
    return terminal_text(ctx.desktop)


def os_accessibility_tree(ctx: EvalContext, spec: dict) -> str | None:
    """OSWorld's ``accessibility_tree``: the desktop's AT-SPI tree as XML (sandboxed desktops)."""
    try:
        tree = ctx.desktop.accessibility_tree()
    except A11yError as e:
        raise EvaluatorError(f"accessibility_tree: {e}") from e
    if tree is None:
        raise EvaluatorError(f"accessibility_tree needs {OSWORLD_LIKE_NEEDS['accessibility_tree']}: "
                             "this desktop is not sandboxed")
    return tree


def os_list_directory(ctx: EvalContext, spec: dict) -> dict | None:
    """OSWorld's directory tree: {"type": "directory", "name", "children": [...]}; files
    {"type": "file", "name"}. Symlinks are listed as files and not followed."""
    path = commands.map_path(ctx.desktop, spec["path"])
    root = ctx.desktop.resolve_path(path)
    if not root.is_dir():
        return None
    budget = [10_000]

    def tree(p: Path) -> dict:
        node: dict[str, Any] = {"type": "directory", "name": p.name, "children": []}
        with os.scandir(p) as it:
            for e in sorted(it, key=lambda e: e.name):
                budget[0] -= 1
                if budget[0] < 0:
                    raise EvaluatorError(f"list_directory: over 10000 entries under {spec['path']!r}")
                if e.is_dir(follow_symlinks=False):
                    node["children"].append(tree(Path(e.path)))
                else:
                    node["children"].append({"type": "file", "name": e.name})
        return node

    return tree(root)


def os_rule(ctx: EvalContext, spec: dict) -> Any:
    return spec["rules"]


def os_vm_screen_size(ctx: EvalContext, spec: dict) -> dict:
    return {"width": ctx.desktop.width, "height": ctx.desktop.height}


def os_content_from_vm_file(ctx: EvalContext, spec: dict) -> Any:
    import pandas as pd

    if spec.get("file_type") != "xlsx" or spec.get("file_content") != "last_row":
        raise EvaluatorError(f"content_from_vm_file: {spec.get('file_type')}/{spec.get('file_content')} "
                             "is not supported (OSWorld supports xlsx/last_row)")
    path = os_vm_file(ctx, {"path": spec["path"], "dest": Path(spec["path"]).name})
    if path is None:
        return None
    return pd.read_excel(path).iloc[-1].astype(str).tolist()


def os_vscode_config(ctx: EvalContext, spec: dict) -> Any:
    """OSWorld runs a VS Code command (command palette) and then reads the file it wrote."""
    d = ctx.desktop
    if d.run(["sh", "-c", "command -v code"], timeout=10).returncode != 0:  # the desktop's own PATH
        raise EvaluatorError("vscode_config needs Visual Studio Code (`code`), which this desktop lacks "
                             "(a sandboxed desktop has it once scripts/install.sh installed code-server)")
    for a in (Action("hotkey", keys=["ctrl", "shift", "p"]), Action("type", text=spec["vscode_extension_command"]),
              Action("key", keys=["enter"])):
        d.execute(a)
        time.sleep(0.3)
    time.sleep(1.0)
    return os_vm_file(ctx, {"path": spec["path"], "dest": spec["dest"]})


def os_cache_file(ctx: EvalContext, spec: dict) -> str | None:
    """A file an ``execute`` step with ``stdout``/``stderr`` saved (setup.task_cache_dir)."""
    from agentenv.envs.tasks.setup import task_cache_dir

    p = task_cache_dir(ctx.desktop, ctx.task) / Path(str(spec["path"])).name
    return _local_copy(ctx, p.name, p) if p.is_file() else None


OSWORLD_GETTERS: dict[str, Callable[[EvalContext, dict], Any]] = {
    "vm_file": os_vm_file, "cloud_file": os_cloud_file, "vm_command_line": os_vm_command_line,
    "vm_command_error": os_vm_command_error, "vm_terminal_output": os_vm_terminal_output,
    "list_directory": os_list_directory, "rule": os_rule, "vm_screen_size": os_vm_screen_size,
    "content_from_vm_file": os_content_from_vm_file, "vscode_config": os_vscode_config,
    "cache_file": os_cache_file, "accessibility_tree": os_accessibility_tree,
}
# OSWorld getters that only a desktop looking like OSWorld's VM (the sandboxed one) can run.
OSWORLD_LIKE_NEEDS: dict[str, str] = {"accessibility_tree": "an AT-SPI accessibility tree (sandboxed desktops)"}
# OSWorld getters this machine cannot run: name -> what is missing. (The apps' getters: app_getters.py.)
GETTER_NEEDS: dict[str, str] = {
    "googledrive_file": "network and a Google Drive account",
    "info_from_website": "network", "page_info": "network", "pdf_from_url": "network",
    "number_of_search_results": "network", "gotoRecreationPage_and_get_html_content": "network",
    "replay": "an OSWorld replay trajectory",
    "conference_city_in_order": "network",
}
for _n in ("default_search_engine", "cookie_data", "bookmarks", "open_tabs_info", "shortcuts_on_desktop",
           "history", "enabled_experiments", "chrome_language", "chrome_font_size", "profile_name",
           "active_tab_info", "enable_do_not_track", "enable_enhanced_safety_browsing", "enable_safe_browsing",
           "new_startup_page", "find_unpacked_extension_path", "data_delete_automacally",
           "active_tab_html_parse", "active_tab_url_parse", "url_dashPart", "active_url_from_accessTree",
           "find_installed_extension_name", "macys_product_url_parse", "url_path_parse",
           "extensions_installed_from_shop", "chrome_saved_address"):
    # desktop-env's own (chrome_getters.py) where it loads; this says why where it does not
    GETTER_NEEDS[_n] = "Google Chrome's profile and DevTools protocol (desktop-env's getters/chrome.py)"
    OSWORLD_LIKE_NEEDS[_n] = "Chrome's DevTools port in the desktop's own network (sandboxed desktops)"


# ----------------------------------------------------------------------------- agentenv's getters

def ae_vm_file(ctx: EvalContext, spec: dict) -> str | None:
    data = read_desktop_file(ctx.desktop, spec["path"])
    return None if data is None else data.decode("utf-8", "replace")


def ae_file_exists(ctx: EvalContext, spec: dict) -> bool:
    return ctx.desktop.resolve_path(commands.map_path(ctx.desktop, spec["path"])).exists()


def ae_vm_command_line(ctx: EvalContext, spec: dict) -> str:
    cmd = spec["command"]
    try:
        r = ctx.desktop.run(cmd, shell=isinstance(cmd, str), timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    return r.stdout


def read_sheet_cells(path: str | Path) -> dict[str, dict[str, str]]:
    """A spreadsheet's cells: {sheet: {"A1": value as text}}, read with pandas (odfpy for .ods,
    openpyxl for .xlsx). Numbers as Python writes them (1200, 12.5), dates ISO, booleans TRUE/FALSE."""
    import datetime

    import pandas as pd

    from openpyxl.utils import get_column_letter

    engine = "odf" if str(path).lower().endswith(".ods") else None
    sheets = pd.read_excel(path, sheet_name=None, header=None, engine=engine)
    out: dict[str, dict[str, str]] = {}
    for name, df in sheets.items():
        cells: dict[str, str] = {}
        for r, row in enumerate(df.itertuples(index=False)):
            for c, v in enumerate(row):
                if v is None or (isinstance(v, float) and v != v):
                    continue
                if isinstance(v, bool):
                    text = "TRUE" if v else "FALSE"
                elif isinstance(v, float) and v.is_integer():
                    text = str(int(v))
                elif isinstance(v, (datetime.datetime, pd.Timestamp)):
                    text = v.date().isoformat() if v == v.normalize() else v.isoformat()
                else:
                    text = str(v)
                cells[f"{get_column_letter(c + 1)}{r + 1}"] = text
        out[str(name)] = cells
    return out


def ae_spreadsheet_cell(ctx: EvalContext, spec: dict) -> str | None:
    data = read_desktop_file(ctx.desktop, spec["path"])
    if data is None:
        return None
    local = _local_copy(ctx, Path(str(spec["path"])).name, data)
    try:
        sheets = read_sheet_cells(local)
    except Exception:  # not a spreadsheet (anymore): the task is not done
        return None
    sheet = sheets.get(spec["sheet"]) if spec.get("sheet") else next(iter(sheets.values()), {})
    return (sheet or {}).get(str(spec["cell"]).upper())


AGENTENV_GETTERS: dict[str, Callable[[EvalContext, dict], Any]] = {
    "vm_file": ae_vm_file, "file_exists": ae_file_exists, "vm_command_line": ae_vm_command_line,
    "window_title": lambda ctx, spec: ctx.desktop.active_window_title(),
    "window_titles": lambda ctx, spec: "\n".join(ctx.desktop.window_titles()),
    "clipboard": lambda ctx, spec: ctx.desktop.clipboard(),
    "spreadsheet_cell": ae_spreadsheet_cell,
}
