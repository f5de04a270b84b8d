"""``agentenv tasks check DIR`` and ``agentenv tasks fetch DIR``: which task files run on this machine,
and exactly what the others miss (an app, a setup type, an evaluator function or getter, network,
a cached file); and filling the download cache.

Nothing here starts a desktop: the check reads the task files, the installed programs and the
download cache. A file that does not load is reported with its reason, never a crash.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from agentenv.envs import sandbox_vm
from agentenv.envs.tasks import NotATask, TaskLoadError, commands, load_task_file
from agentenv.envs.tasks.cache import DownloadCache
from agentenv.envs.tasks.network import needs_network
from agentenv.envs.tasks.setup import OFFICE_MODULES, OFFICE_PROGRAMS, SETUP_STEPS, UNSUPPORTED
from agentenv.types import Task

DESKTOP_PATH = "/usr/local/bin:/usr/bin:/bin"  # a desktop's PATH (host.HostProcesses.env)

# OSWorld's related_apps -> the program that must be installed
APP_PROGRAMS = {
    "libreoffice_calc": "localc", "libreoffice_writer": "lowriter", "libreoffice_impress": "loimpress",
    "vs_code": "code", "vscode": "code", "chrome": "chromium", "google-chrome": "chromium", "gimp": "gimp",
    "vlc": "vlc", "thunderbird": "thunderbird", "terminal": "xfce4-terminal",
}
# Programs OSWorld launches that our desktops run as another one (apps.app_argv, APPS)
PROGRAM_ALIASES = {"google-chrome": "chromium", "editor": "mousepad", "terminal": "xfce4-terminal",
                   "calculator": "galculator", "files": "pcmanfm", "spreadsheet": "localc", "browser": "chromium",
                   "gnome-terminal": "xfce4-terminal"}
_WINDOWS_PATH = re.compile(r'"[A-Za-z]:\\\\')  # "c:\\users\\..." as json.dumps writes it
# What a task's commands need that only a desktop looking like OSWorld's VM from inside has (the
# sandboxed desktop: desktop.osworld_like); a plain desktop lacks them.
OSWORLD_VM_NEEDS = [
    (re.compile(r"gsettings\s+(?:get|set|reset)\s+org\.gnome"), "GNOME settings schemas (gsettings org.gnome.*)"),
    (re.compile(r"xdg-settings"), "xdg-settings with a desktop environment"),
    (re.compile(r"(?:^|[\s;&|\"])su\s|useradd|usermod|chpasswd"), "other users (su, useradd)"),
    (re.compile(r"'ctrl',\s*'alt',\s*'t'"), "Ctrl+Alt+T opening a terminal"),
    (re.compile(r"\bpactl\b"), "audio (pactl)"),
]
# What no desktop of ours has, sandboxed or not: no init system runs in it, and installing packages
# needs the network and a writable /usr (the sandbox's /usr and dpkg database are the host's, read-only).
NO_DESKTOP_HAS = [
    (re.compile(r"timedatectl|systemctl"), "systemd (timedatectl, systemctl): desktops run no init system"),
    (re.compile(r"\b(?:apt-get|apt)\s+(?:-\S+\s+)*(?:install|update|upgrade|remove)\b|\bdpkg\s+(?:-i|--install)\b"),
     "installing packages (apt-get, dpkg -i): network and a writable /usr"),
]


NETWORK = "network: "  # a missing thing the operator's network (--sandbox-network) provides: live web pages


@dataclass
class TaskReport:
    file: str
    id: str
    domain: str
    status: str                        # runs | needs_fetch | needs_network | missing | broken | skipped
    missing: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)   # files it downloads (download, cloud_file)
    note: str = ""


def _installed(program: str, osworld_like: bool = True) -> bool:
    program = PROGRAM_ALIASES.get(program, program)
    if program == "code":  # VS Code: code-server, run by `code` inside sandboxed desktops only
        return osworld_like and sandbox_vm.code_server_installed()
    if "/" in program:
        return os.access(program, os.X_OK)
    return shutil.which(program, path=DESKTOP_PATH) is not None


# Words a shell command may start with that are not programs to install; scripts a task makes itself.
_SHELL_WORDS = {"cd", "export", "source", ".", "set", "unset", "alias", "eval", "exec", "if", "for", "while",
                "true", "false", "test", "[", "echo", "printf", "read", "ulimit", "umask", "{", "("}


def _program_need(argv: list[str], osworld_like: bool = True) -> str | None:
    if not argv or argv[0] in _SHELL_WORDS or (argv[0].startswith(".") and "/" in argv[0]) \
            or argv[0].endswith(".sh"):
        return None
    prog = Path(argv[0]).name
    if prog in ("libreoffice", "soffice"):
        for a in argv[1:]:
            if a in OFFICE_PROGRAMS and not _installed(OFFICE_PROGRAMS[a]):
                return f"app: {OFFICE_PROGRAMS[a]} (LibreOffice {a[2:]})"
    if prog and not _installed(prog, osworld_like):
        return f"app: {prog}"
    return None


def _outside_home(path: Any) -> bool:
    """A path a plain desktop cannot reach: only its HOME (``/home/user``, ``~``, relative) is there."""
    if not isinstance(path, str) or not path:
        return False
    p = path.replace("\\", "/")
    return p.startswith("/") and not (p == commands.OSWORLD_HOME or p.startswith(commands.OSWORLD_HOME + "/"))


def _steps_needs(steps: Any, where: str, urls: list[str], osworld_like: bool = False) -> list[str]:
    from agentenv.envs.actions import ActionError, parse_pyautogui

    out: list[str] = []
    if not isinstance(steps, list):
        return [f"{where}: not a list of steps"]
    for s in steps:
        kind = s.get("type") if isinstance(s, dict) else None
        p = s.get("parameters") if isinstance(s, dict) and isinstance(s.get("parameters"), dict) else {}
        if not isinstance(kind, str) or kind not in SETUP_STEPS:
            out.append(f"setup type: {kind} ({UNSUPPORTED[kind]})" if isinstance(kind, str) and kind in UNSUPPORTED
                       else f"setup type: {kind!r}")
            continue
        try:
            if kind in ("download", "upload_file", "open"):
                paths = [f.get("path") for f in p.get("files") or [] if isinstance(f, dict)] + [p.get("path")]
                outside = [x for x in paths if _outside_home(x)]
                if outside and not osworld_like:
                    out.append(f"OSWorld-like desktop: a file outside HOME ({outside[0]})")
            if kind == "download":
                urls.extend(str(f.get("url")) for f in p.get("files") or [] if isinstance(f, dict))
            elif kind in ("execute", "command", "launch"):
                cmd = p.get("command")
                code = commands.pyautogui_code(cmd)
                if code is not None:
                    parse_pyautogui(code)
                    continue
                if not isinstance(cmd, (str, list)) or not cmd:
                    out.append(f"{where}: malformed {kind} step (no command)")
                    continue
                shell = commands.shell_flag(p.get("shell"), cmd)
                if shell and isinstance(cmd, str):
                    prog = commands.program(cmd, True)
                    need = _program_need([prog], osworld_like) if prog else None
                else:
                    argv = commands.adapt_argv([str(c) for c in cmd] if isinstance(cmd, list) else
                                               shlex.split(cmd), commands.OSWORLD_HOME)
                    need = _program_need(argv, osworld_like)
                if need:
                    out.append(need)
            elif kind == "open":
                suffix = Path(str(p.get("path", ""))).suffix.lower()
                if suffix in OFFICE_MODULES and not _installed(OFFICE_PROGRAMS[OFFICE_MODULES[suffix]]):
                    out.append(f"app: {OFFICE_PROGRAMS[OFFICE_MODULES[suffix]]} (opens {suffix} files)")
        except ActionError as e:
            if not osworld_like:  # an OSWorld-like desktop runs it as code, as OSWorld does
                out.append(f"{where}: pyautogui code the allow-list refuses ({e})")
        except (ValueError, TypeError, AttributeError) as e:
            out.append(f"{where}: malformed {kind} step ({type(e).__name__}: {e})")
    return out


def _evaluator_needs(task: Task, urls: list[str], osworld_like: bool = False) -> list[str]:
    from agentenv.envs.tasks import getters
    from agentenv.envs.tasks.evaluate import EvaluatorError, getter_for, dialect, validate_evaluator

    ev = task.evaluator
    out = _steps_needs(ev.get("postconfig") or [], "evaluator.postconfig", urls, osworld_like) \
        if isinstance(ev, dict) else []
    dia = dialect(task)
    funcs = ev.get("func") if isinstance(ev, dict) else None
    if funcs in (None, "", []):
        return out + ["evaluator: no 'func' (a draft)"]
    if funcs == "infeasible":
        return out
    for f in (funcs if isinstance(funcs, list) else [funcs]):
        sub = dict(ev, func=f, result=None, expected=None)
        try:
            validate_evaluator(sub, dia)
        except EvaluatorError as e:
            out.append(f"evaluator: {e}")
    for role in ("result", "expected"):
        specs = ev.get(role) if isinstance(ev, dict) else None
        for r in specs if isinstance(specs, list) else [specs]:
            if not isinstance(r, dict):
                continue
            try:
                if not (dia == "agentenv" and role == "expected" and r.get("type") in ("rule", "literal")):
                    getter_for(r.get("type"), dia, role)
                if r.get("type") == "vscode_config" and not _installed("code", osworld_like):
                    out.append("app: code (vscode_config runs a VS Code command)")
            except EvaluatorError as e:
                out.append(f"evaluator: {e}")
            if r.get("type") in getters.OSWORLD_LIKE_NEEDS and not osworld_like:
                out.append(f"OSWorld-like desktop: {getters.OSWORLD_LIKE_NEEDS[r['type']]}")
            if r.get("type") in ("vm_file", "list_directory") and not osworld_like:
                paths = r.get("path") if isinstance(r.get("path"), list) else [r.get("path")]
                outside = [x for x in paths if _outside_home(x)]
                if outside:
                    out.append(f"OSWorld-like desktop: a file outside HOME ({outside[0]})")
            if r.get("type") == "cloud_file":
                paths = r.get("path")
                urls.extend(str(u) for u in (paths if isinstance(paths, list) else [paths]))
    return out


def _domain(path: Path, root: Path, task: Task | None) -> str:
    rel = path.relative_to(root) if root in path.parents else Path(path.name)
    if len(rel.parts) > 1:
        return rel.parts[-2]
    if task is not None and task.related_apps:
        return str(task.related_apps[0])
    return "-"


def iter_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
    else:
        yield from sorted(root.rglob("*.json"))


def check_tasks(root: str | Path, cache: DownloadCache | None = None, osworld_like: bool = False,
                network: bool = False) -> list[TaskReport]:
    """``osworld_like``: the desktops that will run the tasks look like OSWorld's VM from inside
    (the sandboxed desktop), so what only such a desktop has is not missing. ``network``: the
    desktops have the network (env.sandbox_network), so live web pages are not missing."""
    root = Path(root)
    cache = cache or DownloadCache.from_config()
    reports: list[TaskReport] = []
    for f in iter_files(root):
        try:
            tasks = load_task_file(f)
        except NotATask as e:
            reports.append(TaskReport(str(f), f.stem, _domain(f, root, None), "skipped", note=str(e)))
            continue
        except TaskLoadError as e:
            reports.append(TaskReport(str(f), f.stem, _domain(f, root, None), "broken", [f"load: {e}"]))
            continue
        if not tasks:
            reports.append(TaskReport(str(f), f.stem, _domain(f, root, None), "skipped", note="holds no task"))
        for t in tasks:
            reports.append(check_task(t, f, root, cache, osworld_like, network))
    _note_duplicates(reports)
    return reports


def _note_duplicates(reports: list[TaskReport]) -> None:
    """The ids the loader gives (``sources.dedupe_ids``): the file nearest the root keeps the id."""
    groups: dict[str, list[TaskReport]] = defaultdict(list)
    for r in reports:
        if r.status not in ("broken", "skipped"):
            groups[r.id].append(r)
    for tid, rs in groups.items():
        rs = sorted(rs, key=lambda r: (len(Path(r.file).parts), r.file))
        for k, r in enumerate(rs[1:], start=2):
            r.note = f"duplicate id of {rs[0].file}: loaded as {tid}~{k}"


def check_task(t: Task, f: Path, root: Path, cache: DownloadCache, osworld_like: bool = False,
               network: bool = False) -> TaskReport:
    urls: list[str] = []
    try:
        text = json.dumps([t.config, t.evaluator])
        missing = ["Windows (the task's paths are Windows paths)"] if _WINDOWS_PATH.search(text) else []
        missing += [why for rx, why in NO_DESKTOP_HAS if rx.search(text)]
        if not osworld_like:
            missing += [f"OSWorld-like desktop: {why}" for rx, why in OSWORLD_VM_NEEDS if rx.search(text)]
        missing += _steps_needs(t.config, "config", urls, osworld_like)
        missing += _evaluator_needs(t, urls, osworld_like)
        if not network:  # live web pages (network.needs_network): env.sandbox_network runs them
            missing += [f"{NETWORK}{why}" for why in needs_network(t)]
        for app in t.related_apps:
            prog = APP_PROGRAMS.get(str(app))
            if prog and not _installed(prog, osworld_like):
                missing.append(f"app: {prog} ({app})")
    except Exception as e:  # a quirk nobody foresaw: reported, never a crash of the whole check
        missing = [f"check failed: {type(e).__name__}: {e}"]
    # one line per missing thing: "app: code" and "app: code (vs_code)" are the same app
    missing = list({(m.split(" (")[0] if m.startswith("app: ") else m): m for m in reversed(missing)}.values())[::-1]
    uncached = [u for u in dict.fromkeys(urls) if not cache.cached(u)]
    if any(not m.startswith(NETWORK) for m in missing):
        status = "missing"
    elif missing:  # only live web pages: it runs with env.serve.sandbox_network
        status = "needs_network"
    elif uncached:
        status = "needs_fetch"
    else:
        status = "runs"
    if uncached:
        missing.append(f"{'cached file' if cache.offline else 'network or cached file'}: "
                       f"{len(uncached)} URL(s) not cached, e.g. {uncached[0]}")
    return TaskReport(str(f), t.id, _domain(f, root, t), status, missing, list(dict.fromkeys(urls)))


def summarize(reports: list[TaskReport]) -> dict[str, Any]:
    by_domain: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    for r in reports:
        by_domain[r.domain][r.status] += 1
        for m in r.missing:
            reasons[m.split(": ")[0] + ": URL not cached" if "URL(s) not cached" in m else m] += 1
    tasks = [r for r in reports if r.status != "skipped"]
    return {
        "files": len({r.file for r in reports}), "tasks": len(tasks),
        "runs": sum(r.status == "runs" for r in tasks),
        "needs_fetch": sum(r.status == "needs_fetch" for r in tasks),
        "needs_network": sum(r.status == "needs_network" for r in tasks),
        "missing": sum(r.status == "missing" for r in tasks),
        "broken": sum(r.status == "broken" for r in tasks),
        "skipped": sum(r.status == "skipped" for r in reports),
        "duplicates": sum(bool(r.note) for r in reports if r.status != "skipped"),
        "domains": {d: dict(c) for d, c in sorted(by_domain.items())},
        "top_missing": dict(reasons.most_common(15)),
    }


def render(reports: list[TaskReport], verbose: bool = True) -> str:
    lines = []
    if verbose:
        for r in reports:
            why = "; ".join(r.missing) if r.missing else ""
            note = f" [{r.note}]" if r.note else ""
            lines.append(f"{r.status:<11} {r.domain}/{r.id}{note}{': ' + why if why else ''}")
        lines.append("")
    s = summarize(reports)
    cols = ("runs", "needs_fetch", "needs_network", "missing", "broken", "skipped")
    lines.append(f"{'domain':<22}{'tasks':>6}" + "".join(f"{c:>15}" for c in cols))
    for d, c in s["domains"].items():
        lines.append(f"{d:<22}{sum(v for k, v in c.items() if k != 'skipped'):>6}"
                     + "".join(f"{c.get(k, 0):>15}" for k in cols))
    lines.append(f"{'all':<22}{s['tasks']:>6}" + "".join(f"{s[k]:>15}" for k in cols))
    if s["top_missing"]:
        lines.append("")
        lines.append("most often missing:")
        lines += [f"  {n:>4}  {m}" for m, n in s["top_missing"].items()]
    return "\n".join(lines)


def fetch_all(root: str | Path, cache: DownloadCache | None = None) -> dict[str, Any]:
    """Fetch every URL the task files under ``root`` download into the cache."""
    cache = cache or DownloadCache.from_config()
    from agentenv.envs.tasks.cache import DownloadError

    urls: list[str] = []
    for r in check_tasks(root, cache):
        urls.extend(r.urls)
    urls = list(dict.fromkeys(urls))
    fetched, had, failed = 0, 0, {}
    for u in urls:
        if cache.cached(u):
            had += 1
            continue
        try:
            cache.get(u)
            fetched += 1
        except DownloadError as e:
            failed[u] = str(e)
    return {"urls": len(urls), "fetched": fetched, "already_cached": had, "failed": failed,
            "cache_dir": str(cache.root)}


def reports_json(reports: list[TaskReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in reports]

