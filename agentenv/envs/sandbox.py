"""SandboxProcesses: the processes of a sandboxed desktop. Its X server, window manager, apps and
every command a task or an agent runs live in Linux namespaces of their own, built with bubblewrap
(``bwrap``).

Inside, it looks like OSWorld's VM: user ``user`` (uid 1000) with HOME ``/home/user``, ``sudo``
that takes the password ``password`` and makes a command root in a user namespace nested in the
sandbox (root there, the desktop user on the host), ``python`` with pyautogui on the desktop's own
display, a D-Bus session bus (so ``gsettings`` saves through dconf), ``xdg-settings``, and AT-SPI
(the accessibility bus; the tree and the terminal's text are read inside, by sandbox_a11y.py).

How the sandbox is built (namespaces, what is mounted where): agentenv/envs/sandbox_bwrap.py.

The service talks to the sandbox through two host folders: the X socket (``/tmp/.X11-unix/X<n>``
on the host is a link to it) and the runner's socket (agentenv/envs/sandbox_runner.py), which
starts every process inside.
"""

from __future__ import annotations

import glob
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

from agentenv import procs
from agentenv.envs import sandbox_vm
from agentenv.envs.apps import app_argv
from agentenv.envs.desktop_types import (A11Y_LIMITS, OSWORLD_HOME, A11yError, A11yLimits, DesktopError,
                                         Processes, Seat, as_user, desktop_user)
from agentenv.envs.sandbox_bwrap import INNER, SANDBOX_SITE, bwrap_argv, sandbox_env, write_sys_folder
from agentenv.procs import spawn_tied

TERMINAL_MAX_BYTES = 4 << 20  # the terminal reader's answer (VTE gives the text on screen)


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
    if not os.path.exists("/usr/libexec/at-spi-bus-launcher") or not glob.glob("/usr/lib/*/girepository-1.0/Atspi-2.0.typelib") \
            or not os.path.isdir("/usr/lib/python3/dist-packages/gi"):
        logger.warning("AT-SPI for the sandbox is not installed (Debian packages at-spi2-core, python3-gi, "
                       "gir1.2-atspi-2.0; scripts/install.sh installs them): /accessibility and the terminal's "
                       "text will fail")


def _as_desktop_user() -> dict[str, Any]:
    return as_user(desktop_user())


@dataclass
class RemoteProcess:
    """An app started inside the sandbox (its pid is the sandbox's)."""

    pid: int


class SandboxProcesses(Processes):
    sandboxed = True
    osworld_like = True
    terminal = f"{INNER}/bin/terminal"

    def __init__(self, seat: Seat):
        super().__init__(seat)
        self.homes = seat.root / "homes"          # /home inside
        self.home = self.homes / "user"
        self.ctl = seat.root / "ctl"              # /run/agentenv inside: the runner's socket, logs
        self.x11 = seat.root / "x11"              # /tmp/.X11-unix inside
        self.sys = seat.root / "sys"              # /opt/agentenv inside (read-only)
        self._x_link: Path | None = None
        self._x_lock: Path | None = None
        self._key = b""

    # ------------------------------------------------------------------ X server, window manager
    def start_server(self) -> None:
        for d in (self.homes, self.ctl, self.x11, self.sys / "bin", self.sys / "site"):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.homes, self.ctl, self.x11):
            self.seat.chown(d)
        os.chmod(self.x11, 0o1777)
        self.home.mkdir(exist_ok=True)
        self.seat.chown(self.home)
        write_sys_folder(self.sys, self.seat.user, self.terminal)
        argv = bwrap_argv(self.seat, self.homes, self.ctl, self.x11, self.sys)
        # Tied to this service's life; the sandbox (its PID namespace) ends with bwrap.
        proc = spawn_tied(argv, sig=signal.SIGKILL, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, stderr=open(self.seat.root / "bwrap.log", "wb"),
                          start_new_session=True, **_as_desktop_user())
        self.server = proc
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
        n = self.seat.display_num
        x11 = Path("/tmp/.X11-unix")
        x11.mkdir(mode=0o1777, exist_ok=True)
        self._x_lock = Path(f"/tmp/.X{n}-lock")
        self._x_lock.write_text(f"{proc.pid:>10}\n")
        self._x_link = x11 / f"X{n}"
        self._x_link.unlink(missing_ok=True)
        self._x_link.symlink_to(self.x11 / f"X{n}")

    def server_log(self) -> str:
        out = []
        for f in (self.seat.root / "bwrap.log", self.ctl / "xvfb.log", self.ctl / "runner.log"):
            try:
                out.append(f"{f.name}: {f.read_text(errors='replace')[-400:]}")
            except OSError:
                pass
        return " | ".join(out) or "(no log)"

    def _x_server_pid(self) -> int | None:
        """The host pid of the Xvfb inside the sandbox."""
        return next((pid for pid in self.pids() if procs.command_name(pid) == "Xvfb"), None)

    def start_wm(self) -> None:
        xpid = self._x_server_pid()
        if xpid is not None and self._x_lock is not None:
            self._x_lock.write_text(f"{xpid:>10}\n")
        deadline = time.monotonic() + 15
        while not (self.ctl / "runner.sock").exists():
            if not self.server_running() or time.monotonic() > deadline:
                raise DesktopError(f"desktop {self.seat.id}: the sandbox's runner did not start: {self.server_log()}")
            time.sleep(0.02)
        self.spawn(["openbox", "--config-file", f"{INNER}/openbox-rc.xml"], log="openbox.log", keep=True)

    def stop(self) -> None:
        if self.server is not None:
            try:
                os.killpg(self.server.pid, signal.SIGKILL)  # bwrap: its PID namespace goes with it
            except ProcessLookupError:
                pass
            self.server.wait(10)
            self.server = None
        for p in (self._x_link, self._x_lock):
            if p is not None:
                p.unlink(missing_ok=True)

    def alive(self) -> bool:
        try:
            return self._call({"op": "ping"}, timeout=5).get("ok") is True
        except DesktopError:
            return False

    def pids(self) -> list[int]:
        """bwrap and every process in its sandbox (host pids)."""
        if not self.server_running():
            return []
        return [self.server.pid, *procs.descendants(self.server.pid)]

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        return sandbox_env(self.seat.display)

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
            except ConnectionRefusedError:
                # The socket file appears at bind(), before listen(): a runner just started (a loaded
                # machine can pause it between the two) refuses; one that died takes bwrap with it.
                s.close()
                if not self.server_running() or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
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
            raise DesktopError(f"desktop {self.seat.id}: the sandbox's runner does not answer ({e})") from e
        try:
            outer = json.loads(buf)
            body, mac = outer["body"], outer["mac"]
            resp = json.loads(body)
        except (ValueError, KeyError, TypeError) as e:
            raise DesktopError(f"desktop {self.seat.id}: the sandbox's runner gave no answer "
                               f"({bytes(buf[:200])!r})") from e
        want = hmac.new(self._key, (nonce + "\n" + body).encode(), hashlib.sha256).hexdigest()
        if not isinstance(mac, str) or not hmac.compare_digest(mac, want):
            raise DesktopError(f"desktop {self.seat.id}: an answer on the runner's socket is not the runner's "
                               "(something inside the sandbox took its place); the desktop is dead")
        return resp

    def spawn(self, argv: list[str], log: str | None = None, keep: bool = False) -> RemoteProcess:
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

    def run(self, argv: list[str] | str, timeout: float, shell: bool) -> subprocess.CompletedProcess:
        """Run a command inside the sandbox (as ``user``, in /home/user) and wait for it."""
        r = self._exec(argv, shell, timeout, 16 << 20)
        if "error" in r:
            raise DesktopError(f"desktop {self.seat.id}: {r['error']}")
        if r.get("spawn_error"):
            raise FileNotFoundError(r["stderr"])
        if r["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout, r["stdout"], r["stderr"])
        return subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])

    def run_bounded(self, argv: list[str] | str, *, shell: bool, timeout: float, max_output: int) -> dict[str, Any]:
        r = self._exec(argv, shell, timeout, max_output)
        if "error" in r:
            raise DesktopError(f"desktop {self.seat.id}: {r['error']}")

        def text(k: str) -> str:
            return r[k] + (f"\n[output cut at {max_output} bytes]" if r.get(k + "_cut") else "")

        if r.get("spawn_error"):
            return {"status": "error", "output": "", "error": r["stderr"], "returncode": 127}
        if r["timed_out"]:
            return {"status": "error", "output": text("stdout"), "error": f"timed out after {timeout}s",
                    "returncode": -1}
        return {"status": "success", "output": text("stdout"), "error": text("stderr"), "returncode": r["returncode"]}

    def launch(self, argv: list[str]) -> RemoteProcess:
        # A file a setup step resolved on the host is named as the sandbox names it (/home/user/...):
        # apps show paths (window titles, the address bar) and must show the same on every desktop.
        # Chromium's own sandbox nests in ours (user namespaces nest); no --no-sandbox, whose
        # warning bar would move the page down.
        argv = [self._inner_path(a) for a in map(str, argv)]
        if argv and argv[0] == "google-chrome":  # Chromium with Chrome's profile folder (sandbox_vm.GOOGLE_CHROME)
            argv = [f"{INNER}/bin/google-chrome"] + argv[1:]
        return self.spawn(app_argv(argv, OSWORLD_HOME, self.terminal), log="apps.log")

    def close_apps(self, include_wm: bool = False) -> None:
        """End every process but the X server, the bus and the window manager; remove what was
        written to the sandbox's own filesystem."""
        if include_wm:
            return  # closing: the whole sandbox goes (``stop``)
        r = self._call({"op": "reset"}, timeout=30)
        if "error" in r:
            raise DesktopError(f"desktop {self.seat.id}: reset inside the sandbox failed: {r['error']}")
        if r.get("left"):
            logger.warning("desktop {}: {} processes survived SIGKILL in the sandbox", self.seat.id, r["left"])

    def clear_homes(self) -> None:
        # /home is the sandbox's too: what a task made beside ``user`` (sudo mkdir /home/x) goes.
        if self.homes.exists():
            for p in self.homes.iterdir():
                if p.name != "user":
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()

    def seed_home(self, home: Path) -> None:
        for p in sandbox_vm.seed_home(home, self.sys):  # the VM's settings (dconf)
            self.seat.chown(p)

    # ------------------------------------------------------------------ paths
    def _inner_path(self, arg: str) -> str:
        for home in {str(self.home), os.path.realpath(self.home)}:
            if arg == home or arg.startswith(home + "/"):
                return OSWORLD_HOME + arg[len(home):]
        return arg

    def realpath(self, p: Path) -> Path:
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

    # ------------------------------------------------------------------ AT-SPI
    def _a11y(self, args: list[str], seconds: float, max_output: int) -> dict[str, Any]:
        """Run the AT-SPI reader inside the sandbox (its output is the answer of a signed runner
        reply, size-capped, then parsed as JSON: never the apps' bytes as anything else)."""
        r = self._exec(["python3", "-I", f"{INNER}/a11y.py", *args], False, seconds + 5, max_output)
        if "error" in r:
            raise DesktopError(f"desktop {self.seat.id}: {r['error']}")
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
            logger.info("desktop {}: accessibility tree cut at {} nodes ({})", self.seat.id, out.get("nodes"),
                        ", ".join(out["truncated"]))
        return out["AT"]

    def terminal_output(self) -> str | None:
        """The text of the terminal (its VTE widget over AT-SPI, as OSWorld's server reads it: a
        focused terminal of the active window first); "" when there is none."""
        try:
            out = self._a11y(["terminal", "5"], 5.0, TERMINAL_MAX_BYTES)
        except A11yError as e:
            logger.warning("desktop {}: cannot read the terminal's text: {}", self.seat.id, e)
            return ""
        return out.get("text") or ""
