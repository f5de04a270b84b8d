"""SandboxDesktop: a desktop whose X server, window manager, apps and every command a task or an
agent runs live in Linux namespaces of their own, built with bubblewrap (``bwrap``).

Inside, it looks like OSWorld's VM: user ``user`` (uid 1000) with HOME ``/home/user``, ``sudo``
that takes the password ``password`` and makes a command root in a user namespace nested in the
sandbox (root there, the desktop user on the host), ``python`` with pyautogui on the desktop's own
display, a D-Bus session bus (so ``gsettings`` saves through dconf), ``xdg-settings``, and AT-SPI
(the accessibility bus; the tree and the terminal's text are read inside, by sandbox_a11y.py).

Namespaces: user, mount, PID, IPC, UTS, cgroup and network are all new (``--unshare-all``), so from
inside there is no network (the host's loopback services included), no host process to signal and
no other desktop's X socket (abstract sockets are per network namespace, the path is not mounted).
The host's ``/usr`` is read-only; ``/``, ``/tmp`` and ``/run`` are the sandbox's own tmpfs, wiped at
every reset by the runner; ``/etc`` and ``/var`` are tmpfs too, holding the runner's copy of the
host's (what the desktop user can read, host secrets left out, the sandbox's own passwd and group),
made again at every reset, touching only what changed; HOME is a host folder restored from its
template at reset, as for the plain desktop. bwrap runs as the unprivileged desktop user, so even a
way out of the namespaces lands as that user.

The service talks to the sandbox through two host folders: the X socket (``/tmp/.X11-unix/X<n>``
on the host is a link to it) and the runner's socket (agentenv/envs/sandbox_runner.py), which
starts every process inside.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from agentenv.envs.xvfb import OSWORLD_HOME, DesktopError, LocalDesktop
from agentenv.procs import spawn_tied

UID = 1000
# pyautogui and its pure-Python dependencies for the sandbox's python3 (scripts/install.sh).
SANDBOX_SITE = Path(os.environ.get("AGENTENV_SANDBOX_SITE", "/opt/agentenv/sandbox-site"))
INNER = "/opt/agentenv"       # where the sandbox sees the runner, the shims and openbox's files
PATH = f"{INNER}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

PASSWD = f"""root:x:0:0:root:/root:/bin/bash
user:x:{UID}:{UID}:user:{OSWORLD_HOME}:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = f"""root:x:0:
sudo:x:27:user
user:x:{UID}:
nogroup:x:65534:
"""

# /etc and /var inside: the sandbox's tmpfs with the runner's copy of the host's (sandbox_runner.sync;
# on disk, making ~1,500 files took 0.5-4 s a desktop here, on tmpfs 50-70 ms). Left out of the copies
# even where the desktop user could read them: the host's password and group databases and their
# backups, sudo's rules, ssh host keys, private TLS keys. The biggest parts of /var (the package
# cache and databases, 2.4 GB and 60 MB here) stay the host's, read-only, inside the copy: `dpkg -l`
# works, a task without network cannot install anything anyway.
ETC_LEFT_OUT = ("shadow", "shadow-", "gshadow", "gshadow-", "passwd-", "group-", "subuid*", "subgid*",
                "sudoers", "sudoers.d", "ssh/ssh_host_*", "ssl/private", "security/opasswd")
VAR_FROM_HOST = ("cache", "lib/apt", "lib/dpkg")


# sudo inside the sandbox: checks OSWorld's password, then runs the command as uid 0 of a user
# namespace nested in the sandbox's (bwrap again), i.e. root inside the sandbox only.
SUDO = r"""#!/bin/bash
# agentenv sandbox sudo: root in a nested user namespace, never on the host.
stdin_pw=0
as=root
while [ $# -gt 0 ]; do
  case "$1" in
    -S|--stdin) stdin_pw=1; shift ;;
    -k|-K|-E|-H|-n|-v|-i|-s|--login|--shell|--preserve-env|--preserve-env=*|--reset-timestamp) shift ;;
    -u|--user) as="$2"; shift 2 ;;
    -u*) as="${1#-u}"; shift ;;
    --user=*) as="${1#--user=}"; shift ;;
    -g|-p|--group|--prompt) shift 2 ;;
    -g*|-p*|--group=*|--prompt=*) shift ;;
    -SE|-ES|-Sk|-kS|-SH|-HS) stdin_pw=1; shift ;;
    --) shift; break ;;
    -*) echo "sudo: option $1 is not supported in this sandbox" >&2; exit 1 ;;
    *) break ;;
  esac
done
if [ "$stdin_pw" = 1 ]; then
  printf '[sudo] password for user: ' >&2; IFS= read -r pw
elif [ -t 0 ]; then
  printf '[sudo] password for user: ' >&2; IFS= read -rs pw; echo >&2
else
  echo "sudo: a terminal is required to read the password; either use the -S option to read from standard input or configure an askpass helper" >&2
  exit 1
fi
if [ "$pw" != "password" ]; then
  echo "sudo: 1 incorrect password attempt" >&2; exit 1
fi
[ $# -eq 0 ] && set -- /bin/bash
case "$as" in
  user|1000|'#1000') exec "$@" ;;
  root|0|'#0') ;;
  *) echo "sudo: unknown user $as" >&2; exit 1 ;;
esac
exec bwrap --unshare-user --uid 0 --gid 0 --bind / / --setenv SUDO_USER user --setenv SUDO_UID 1000 -- "$@"
"""


# The terminal (Ctrl+Alt+T, the menu, the `terminal` app, and `gnome-terminal` as OSWorld's tasks
# name it). /terminal reads its text over AT-SPI (sandbox_a11y.py), as OSWorld's server does.
TERMINAL = r"""#!/bin/bash
exec xfce4-terminal --disable-server -T Terminal
"""


@dataclass(frozen=True)
class A11yLimits:
    """Bounds on one accessibility tree (OSWorld's server has the first three); a tree past one is cut
    there and says so (the root's ``truncated`` attribute)."""

    max_nodes: int = 5000          # OSWorld: MAX_CALLS
    max_depth: int = 50            # OSWorld: MAX_DEPTH
    max_children: int = 1024       # OSWorld: MAX_WIDTH
    max_text_chars: int = 100_000  # one node's text
    max_bytes: int = 8 << 20       # the whole tree, roughly; the runner ends the reader a little past it
    seconds: float = 10.0          # the reader's own deadline; it is killed 5 s after


A11Y_LIMITS = A11yLimits()
TERMINAL_MAX_BYTES = 4 << 20  # the terminal reader's answer (VTE gives the text on screen)


class A11yError(RuntimeError):
    """The accessibility tree or the terminal's text could not be read; the message says why."""


class SandboxError(RuntimeError):
    """The sandbox cannot be built on this machine; the message names what is missing."""


def check_sandbox() -> None:
    """Raise SandboxError naming what is missing when a sandbox cannot start here."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("sandboxed desktops need bubblewrap: install the Debian package 'bubblewrap' "
                           "(scripts/install.sh does), or run the desktops unsandboxed with "
                           "serve-envs --no-sandbox / env.serve.sandbox: false")
    r = subprocess.run([bwrap, "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
                        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "true"],
                       capture_output=True, text=True, timeout=30, cwd="/", **_as_desktop_user())
    if r.returncode != 0:
        raise SandboxError(f"bwrap cannot create namespaces here ({r.stderr.strip()[:300]}): unprivileged user "
                           "namespaces must be enabled (sysctl kernel.unprivileged_userns_clone=1, "
                           "user.max_user_namespaces > 0), or run with --no-sandbox")
    if not (SANDBOX_SITE / "pyautogui").is_dir():
        logger.warning("pyautogui for the sandbox's python is not at {} (scripts/install.sh puts it there): "
                       "`python -c 'import pyautogui'` inside desktops will fail", SANDBOX_SITE)
    import glob

    if not os.path.exists("/usr/libexec/at-spi-bus-launcher") or not glob.glob("/usr/lib/*/girepository-1.0/Atspi-2.0.typelib") \
            or not os.path.isdir("/usr/lib/python3/dist-packages/gi"):
        logger.warning("AT-SPI for the sandbox is not installed (Debian packages at-spi2-core, python3-gi, "
                       "gir1.2-atspi-2.0; scripts/install.sh installs them): /accessibility and the terminal's "
                       "text will fail")


def _as_desktop_user() -> dict[str, Any]:
    from agentenv.envs.xvfb import _desktop_user

    u = _desktop_user()
    return {} if u is None else dict(user=u.pw_uid, group=u.pw_gid, extra_groups=[])


@dataclass
class RemoteProcess:
    """An app started inside the sandbox (its pid is the sandbox's)."""

    pid: int


class SandboxDesktop(LocalDesktop):
    sandboxed = True
    osworld_like = True  # task commands run as written: python, sudo -S, /home/user (tasks/commands.py)
    terminal = f"{INNER}/bin/terminal"

    def __init__(self, desktop_id: str, spec: Any = None):
        super().__init__(desktop_id, spec)
        self.homes = self.root / "homes"          # /home inside
        self.home = self.homes / "user"
        self.ctl = self.root / "ctl"              # /run/agentenv inside: the runner's socket, logs
        self.x11 = self.root / "x11"              # /tmp/.X11-unix inside
        self.sys = self.root / "sys"              # /opt/agentenv inside (read-only)
        self._x_link: Path | None = None
        self._x_lock: Path | None = None
        self._key = b""

    # ------------------------------------------------------------------ lifecycle
    def _start_x_server(self) -> subprocess.Popen:
        for d in (self.homes, self.ctl, self.x11, self.sys / "bin", self.sys / "site"):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.homes, self.ctl, self.x11):
            self._chown(d)
        os.chmod(self.x11, 0o1777)
        self.home.mkdir(exist_ok=True)
        self._chown(self.home)
        shutil.copyfile(Path(__file__).with_name("sandbox_runner.py"), self.sys / "runner.py")
        shutil.copyfile(Path(__file__).with_name("sandbox_a11y.py"), self.sys / "a11y.py")
        (self.sys / "passwd").write_text(PASSWD)
        (self.sys / "group").write_text(GROUP)
        (self.sys / "copies.json").write_text(json.dumps(self._copies()))
        (self.sys / "empty").touch()  # bound over host files the copies leave out (_hide_left_out)
        for top in ("etc", "var"):
            (self.sys / "host" / top).mkdir(parents=True)  # where the host's are bound, read-only
        sudo = self.sys / "bin" / "sudo"
        sudo.write_text(SUDO)
        sudo.chmod(0o755)
        (self.sys / "bin" / "python").symlink_to("/usr/bin/python3")
        term = self.sys / "bin" / "terminal"
        term.write_text(TERMINAL)
        term.chmod(0o755)
        (self.sys / "bin" / "gnome-terminal").symlink_to("terminal")
        self._openbox_files(self.sys, INNER)

        argv = ["bwrap", "--unshare-all", *(["--share-net"] if self.spec.network else []),
                "--die-with-parent", "--new-session",
                "--ro-bind", "/usr", "/usr"]
        for link in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
            target = Path("/") / link
            if target.is_symlink():
                argv += ["--symlink", os.readlink(target), f"/{link}"]
            elif target.is_dir():
                argv += ["--ro-bind", str(target), f"/{link}"]
        argv += ["--tmpfs", "/etc", "--tmpfs", "/var"]  # filled by the runner before anything starts
        for sub in VAR_FROM_HOST:
            if (Path("/var") / sub).is_dir():
                argv += ["--ro-bind", f"/var/{sub}", f"/var/{sub}"]
        argv += ["--proc", "/proc", "--dev", "/dev",
                 "--tmpfs", "/tmp", "--bind", str(self.x11), "/tmp/.X11-unix",
                 "--tmpfs", "/run", "--bind", str(self.ctl), "/run/agentenv",
                 "--ro-bind", str(self.xauth), "/run/Xauthority",
                 "--bind", str(self.homes), "/home",
                 # HOME also at its host path: a path the service resolved (a setup step's file)
                 # means the same file inside.
                 "--bind", str(self.homes), str(self.homes),
                 "--ro-bind", str(self.sys), INNER,
                 "--ro-bind", "/etc", f"{INNER}/host/etc", "--ro-bind", "/var", f"{INNER}/host/var"]
        argv += self._hide_left_out()
        if (SANDBOX_SITE / "pyautogui").is_dir():
            argv += ["--ro-bind", str(SANDBOX_SITE), f"{INNER}/site"]
        argv += ["--uid", str(UID), "--gid", str(UID), "--chdir", OSWORLD_HOME, "--clearenv"]
        for k, v in self.env().items():
            argv += ["--setenv", k, v]
        argv += ["--", "/usr/bin/python3", "-I", f"{INNER}/runner.py", self.display, str(self.width),
                 str(self.height), self.id]
        # Tied to this service's life; the sandbox (its PID namespace) ends with bwrap.
        proc = spawn_tied(argv, sig=signal.SIGKILL, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, stderr=open(self.root / "bwrap.log", "wb"),
                          start_new_session=True, **_as_desktop_user())
        # The key the runner signs its answers with, on its stdin (then closed): never in a file,
        # an argument or the environment, which the sandbox's user could read.
        self._key = secrets.token_bytes(32)
        try:
            proc.stdin.write(self._key.hex().encode() + b"\n")
            proc.stdin.close()
        except OSError:
            pass  # bwrap failed at once: the wait for the X socket reports it, with bwrap's log
        # The host side of the display: its lock names bwrap until the X server inside is up (then
        # the X server's host pid, as for a plain desktop), and /tmp/.X11-unix/X<n> leads to the
        # socket inside, for this service's own X connections.
        x11 = Path("/tmp/.X11-unix")
        x11.mkdir(mode=0o1777, exist_ok=True)
        self._x_lock = Path(f"/tmp/.X{self.display_num}-lock")
        self._x_lock.write_text(f"{proc.pid:>10}\n")
        self._x_link = x11 / f"X{self.display_num}"
        self._x_link.unlink(missing_ok=True)
        self._x_link.symlink_to(self.x11 / f"X{self.display_num}")
        return proc

    def _hide_left_out(self) -> list[str]:
        """bwrap arguments that cover what the copies leave out or replace (passwd, group) in the
        runner's read-only view of the host's /etc and /var too (an empty file or folder over it)."""
        import glob

        out: list[str] = []
        for top, c in self._copies().items():
            for pat in [*c["skip"], *c.get("files", {})]:
                for path in sorted(glob.glob(os.path.join(top, pat))):
                    inner = f"{INNER}/host{path}"
                    if os.path.islink(path):
                        continue  # a link shows nothing of its own; its target is covered or not
                    empty = ["--tmpfs", inner] if os.path.isdir(path) else ["--ro-bind", str(self.sys / "empty"), inner]
                    out += empty
        return out

    def _copies(self) -> dict[str, Any]:
        """What the runner copies into /etc and /var (sandbox_runner.sync's skip and files)."""
        var_skip = []
        if self.user is not None and self.user.pw_dir.startswith("/var/"):
            var_skip.append(self.user.pw_dir[len("/var/"):])  # the desktop user's own host HOME
        return {"/etc": {"skip": list(ETC_LEFT_OUT),
                         "files": {"passwd": f"{INNER}/passwd", "group": f"{INNER}/group"}},
                "/var": {"skip": var_skip}}

    def _server_log(self) -> str:
        out = []
        for f in (self.root / "bwrap.log", self.ctl / "xvfb.log", self.ctl / "runner.log"):
            try:
                out.append(f"{f.name}: {f.read_text(errors='replace')[-400:]}")
            except OSError:
                pass
        return " | ".join(out) or "(no log)"

    def _x_server_pid(self) -> int | None:
        """The host pid of the Xvfb inside the sandbox."""
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "Xvfb":
                    return pid
            except OSError:
                pass
        return None

    def _start_wm(self) -> None:
        xpid = self._x_server_pid()
        if xpid is not None and self._x_lock is not None:
            self._x_lock.write_text(f"{xpid:>10}\n")
        deadline = time.monotonic() + 15
        while not (self.ctl / "runner.sock").exists():
            if self._xvfb.poll() is not None or time.monotonic() > deadline:
                raise DesktopError(f"desktop {self.id}: the sandbox's runner did not start: {self._server_log()}")
            time.sleep(0.02)
        self._wm = self._spawn(["openbox", "--config-file", f"{INNER}/openbox-rc.xml"], log="openbox.log",
                               keep=True)

    def _close(self) -> None:
        with self._lock:
            if self._input is not None:
                self._input.close()
                self._input = None
            if self._xvfb is not None:
                try:
                    os.killpg(self._xvfb.pid, signal.SIGKILL)  # bwrap: its PID namespace goes with it
                except ProcessLookupError:
                    pass
                self._xvfb.wait(10)
                self._xvfb = None
            for p in (self._x_link, self._x_lock):
                if p is not None:
                    p.unlink(missing_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        if not super().alive():
            return False
        try:
            return self._call({"op": "ping"}, timeout=5).get("ok") is True
        except DesktopError:
            return False

    def pids(self) -> list[int]:
        """bwrap and every process in its sandbox (host pids)."""
        if self._xvfb is None or self._xvfb.poll() is not None:
            return []
        from agentenv.procs import _children

        kids, out, todo = _children(), [], [self._xvfb.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += kids.get(pid, [])
        return out

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        """The environment inside the sandbox (the runner's, which every process inherits)."""
        return {
            "PATH": PATH,
            "SHELL": "/bin/bash",
            "HOME": OSWORLD_HOME,
            "USER": "user",
            "LOGNAME": "user",
            "DISPLAY": self.display,
            "XAUTHORITY": "/run/Xauthority",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            # GTK3 apps load the accessibility bridge by themselves; GTK2 ones (pcmanfm) need these
            # modules (GTK3 skips both names: it has them built in).
            "GTK_MODULES": "gail:atk-bridge",
            "XDG_RUNTIME_DIR": "/run/user/1000",
            "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus",
            "PYTHONPATH": f"{INNER}/site",
        }

    def _connect_runner(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + min(timeout, 10.0)
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(str(self.ctl / "runner.sock"))
                return s
            except BlockingIOError:  # a full backlog answers EAGAIN at once, not after a wait
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            except OSError:
                s.close()
                raise

    def _call(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request to the runner inside the sandbox; its answer must be signed with our key."""
        nonce = secrets.token_hex(16)
        req = {**req, "nonce": nonce}
        try:
            with self._connect_runner(timeout) as s:
                s.sendall(json.dumps(req).encode() + b"\n")
                buf = bytearray()
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            raise DesktopError(f"desktop {self.id}: the sandbox's runner does not answer ({e})") from e
        try:
            outer = json.loads(buf)
            body, mac = outer["body"], outer["mac"]
            resp = json.loads(body)
        except (ValueError, KeyError, TypeError) as e:
            raise DesktopError(f"desktop {self.id}: the sandbox's runner gave no answer "
                               f"({bytes(buf[:200])!r})") from e
        want = hmac.new(self._key, (nonce + "\n" + body).encode(), hashlib.sha256).hexdigest()
        if not isinstance(mac, str) or not hmac.compare_digest(mac, want):
            raise DesktopError(f"desktop {self.id}: an answer on the runner's socket is not the runner's "
                               "(something inside the sandbox took its place); the desktop is dead")
        return resp

    def _spawn(self, argv: list[str], log: str | None = None, cwd: Path | None = None,
               keep: bool = False) -> RemoteProcess:  # type: ignore[override]
        resp = self._call({"op": "spawn", "argv": [str(a) for a in argv], "keep": keep,
                           "log": log or "apps.log"}, timeout=10)
        if "error" in resp:
            raise DesktopError(f"cannot start {argv[0]!r} in the sandbox: {resp['error']}")
        return RemoteProcess(resp["pid"])

    def _exec(self, argv: list[str] | str, shell: bool, timeout: float, max_output: int) -> dict[str, Any]:
        if isinstance(argv, str) and not shell:
            argv = [argv]
        return self._call({"op": "run", "argv": argv, "shell": shell, "timeout": timeout,
                           "max_output": max_output}, timeout=timeout + 15)

    def run(self, argv: list[str] | str, timeout: float = 60.0, shell: bool = False) -> subprocess.CompletedProcess:
        """Run a command inside the sandbox (as ``user``, in /home/user) and wait for it."""
        r = self._exec(argv, shell, timeout, 16 << 20)
        if "error" in r:
            raise DesktopError(f"desktop {self.id}: {r['error']}")
        if r.get("spawn_error"):
            raise FileNotFoundError(r["stderr"])
        if r["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout, r["stdout"], r["stderr"])
        return subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])

    def run_bounded(self, argv: list[str] | str, *, shell: bool, timeout: float, max_output: int) -> dict[str, Any]:
        r = self._exec(argv, shell, timeout, max_output)
        if "error" in r:
            raise DesktopError(f"desktop {self.id}: {r['error']}")

        def text(k: str) -> str:
            return r[k] + (f"\n[output cut at {max_output} bytes]" if r.get(k + "_cut") else "")

        if r.get("spawn_error"):
            return {"status": "error", "output": "", "error": r["stderr"], "returncode": 127}
        if r["timed_out"]:
            return {"status": "error", "output": text("stdout"), "error": f"timed out after {timeout}s",
                    "returncode": -1}
        return {"status": "success", "output": text("stdout"), "error": text("stderr"), "returncode": r["returncode"]}

    def launch(self, argv: list[str]) -> RemoteProcess:  # type: ignore[override]
        from agentenv.envs.xvfb import APPS

        # A file a setup step resolved on the host is named as the sandbox names it (/home/user/...):
        # apps show paths (window titles, the address bar) and must show the same on every desktop.
        argv = [self._inner_path(a) for a in map(str, argv)]
        if argv and argv[0] == "terminal":
            argv = [self.terminal] + argv[1:]
        if argv and argv[0] in APPS:
            argv = APPS[argv[0]] + argv[1:]
        if argv and argv[0] in ("chromium", "google-chrome"):
            # Chromium's own sandbox nests in ours (user namespaces nest); no --no-sandbox, whose
            # warning bar would move the page down.
            argv = ["chromium", f"--user-data-dir={OSWORLD_HOME}/.config/chromium"] + \
                [a for a in APPS["browser"][1:] if a not in argv] + argv[1:]
        return self._spawn(argv, log="apps.log")

    def close_apps(self, include_wm: bool = False) -> None:
        """End every process but the X server, the bus and the window manager; remove what was
        written to the sandbox's own filesystem."""
        if include_wm:
            return  # closing: the whole sandbox goes (``_close``)
        r = self._call({"op": "reset"}, timeout=30)
        if "error" in r:
            raise DesktopError(f"desktop {self.id}: reset inside the sandbox failed: {r['error']}")
        if r.get("left"):
            logger.warning("desktop {}: {} processes survived SIGKILL in the sandbox", self.id, r["left"])

    def _inner_path(self, arg: str) -> str:
        for home in {str(self.home), os.path.realpath(self.home)}:
            if arg == home or arg.startswith(home + "/"):
                return OSWORLD_HOME + arg[len(home):]
        return arg

    def _realpath(self, p: Path) -> Path:
        """Links followed as inside the sandbox: an absolute target under /home/user is this
        HOME; any other absolute target leads out of HOME (and is refused by the caller)."""
        home = Path(os.path.realpath(self.home))
        try:
            todo = list(Path(os.path.normpath(p)).relative_to(home).parts)
        except ValueError:
            return Path(os.path.realpath(p))
        cur, hops = home, 0
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                cur = cur.parent
                continue
            nxt = cur / name
            if not nxt.is_symlink():
                cur = nxt
                continue
            hops += 1
            if hops > 40:
                raise PermissionError(f"too many links in {str(p)!r}")
            target = os.readlink(nxt)
            if target.startswith("/"):
                if target != OSWORLD_HOME and not target.startswith(OSWORLD_HOME + "/"):
                    return Path(target)  # out of HOME, as inside the sandbox
                cur, todo = home, [*Path(target[len(OSWORLD_HOME):].lstrip("/")).parts, *todo]
            else:
                todo = [*Path(target).parts, *todo]
        return cur

    def _a11y(self, args: list[str], seconds: float, max_output: int) -> dict[str, Any]:
        """Run the AT-SPI reader inside the sandbox (its output is the answer of a signed runner
        reply, size-capped, then parsed as JSON: never the apps' bytes as anything else)."""
        r = self._exec(["python3", "-I", f"{INNER}/a11y.py", *args], False, seconds + 5, max_output)
        if "error" in r:
            raise DesktopError(f"desktop {self.id}: {r['error']}")
        if r.get("timed_out"):
            raise A11yError(f"the accessibility reader did not finish in {seconds + 5:.0f} s")
        if r.get("stdout_cut"):
            raise A11yError(f"the accessibility reader's answer is over {max_output} bytes")
        if r["returncode"] != 0:
            raise A11yError(f"the accessibility reader failed: {r['stderr'].strip()[-400:]}")
        try:
            return json.loads(r["stdout"])
        except ValueError as e:
            raise A11yError(f"the accessibility reader gave no answer: {r['stdout'][:200]!r}") from e

    def accessibility_tree(self, limits: A11yLimits = A11Y_LIMITS) -> str | None:
        """The desktop's AT-SPI tree as OSWorld's server gives it (XML), read inside the sandbox."""
        out = self._a11y(["tree", str(limits.max_nodes), str(limits.max_depth), str(limits.max_children),
                          str(limits.max_text_chars), str(limits.max_bytes), str(limits.seconds)],
                         limits.seconds, limits.max_bytes + (1 << 20))
        if out.get("truncated"):
            logger.info("desktop {}: accessibility tree cut at {} nodes ({})", self.id, out.get("nodes"),
                        ", ".join(out["truncated"]))
        return out["AT"]

    def terminal_output(self) -> str | None:
        """The text of the terminal (its VTE widget over AT-SPI, as OSWorld's server reads it: a
        focused terminal of the active window first); "" when there is none."""
        try:
            out = self._a11y(["terminal", "5"], 5.0, TERMINAL_MAX_BYTES)
        except A11yError as e:
            logger.warning("desktop {}: cannot read the terminal's text: {}", self.id, e)
            return ""
        return out.get("text") or ""

    def _restore_home(self) -> None:
        # /home is the sandbox's too: what a task made beside ``user`` (sudo mkdir /home/x) goes.
        if self.homes.exists():
            for p in self.homes.iterdir():
                if p.name != "user":
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        super()._restore_home()
