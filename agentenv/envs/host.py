"""HostProcesses: a desktop's processes on this host, as the unprivileged desktop user
(``agentenv-desk``, created by scripts/install.sh) when the service runs as root.

Every process it starts carries ``AGENTENV_DESKTOP=<id>`` in its environment and lives in a
session of its own; closing apps ends exactly those processes (found through /proc), never
processes picked by name.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
from typing import Any

from agentenv import procs
from agentenv.envs.apps import app_argv, write_openbox_files
from agentenv.envs.desktop_types import DesktopError, Processes, Seat, as_user
from agentenv.procs import spawn_tied

MARK = "AGENTENV_DESKTOP"  # the variable every process of a desktop carries: its id


class HostProcesses(Processes):
    terminal = "xfce4-terminal --disable-server"

    def __init__(self, seat: Seat):
        super().__init__(seat)
        self._wm: subprocess.Popen | None = None

    # ------------------------------------------------------------------ X server, window manager
    def start_server(self) -> None:
        s = self.seat
        # Tied to this service's life (its apps exit with their display), and with an
        # environment of its own: nothing of the service's (its token) reaches it.
        self.server = spawn_tied(
            ["Xvfb", s.display, "-screen", "0", f"{s.spec.width}x{s.spec.height}x24",
             "-nolisten", "tcp", "-auth", str(s.xauth), "-noreset"],
            sig=signal.SIGKILL, env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=open(s.root / "xvfb.log", "wb"),
            start_new_session=True,
        )

    def server_log(self) -> str:
        try:
            return (self.seat.root / "xvfb.log").read_text(errors="replace")[-500:]
        except OSError:
            return "(no log)"

    def start_wm(self) -> None:
        root = self.seat.root
        write_openbox_files(root, str(root), self.terminal)
        self._wm = self.spawn(["openbox", "--config-file", str(root / "openbox-rc.xml")], log="openbox.log")

    def stop(self) -> None:
        if self.server is not None:
            procs.terminate(self.server)
            self.server = None

    def pids(self) -> list[int]:
        """Xvfb plus everything it launched."""
        out = [self.server.pid] if self.server_running() else []
        return out + procs.marked(MARK, self.seat.id)

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        s, user = self.seat, self.seat.user
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "SHELL": "/bin/bash",  # the desktop user's login shell is nologin
            "HOME": str(self.home),
            "USER": user.pw_name if user else os.environ.get("USER", "root"),
            "LOGNAME": user.pw_name if user else os.environ.get("USER", "root"),
            "DISPLAY": s.display,
            "XAUTHORITY": str(s.xauth),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "NO_AT_BRIDGE": "1",
            "GSK_RENDERER": "cairo",  # GTK4 apps: see sandbox_bwrap.sandbox_env
            "XDG_RUNTIME_DIR": str(s.root / "xdg-runtime"),
            MARK: s.id,
        }

    def spawn(self, argv: list[str], log: str | None = None) -> subprocess.Popen:
        if argv and argv[0] == "chromium" and self.seat.user is None and os.geteuid() == 0:
            argv = argv + ["--no-sandbox"]  # Chromium refuses root with its sandbox on
        out = open(self.seat.root / log, "ab") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(argv, env=self.env(), cwd=str(self.home), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True, **as_user(self.seat.user))
        except FileNotFoundError as e:
            raise DesktopError(f"cannot start {argv[0]!r}: not installed (run scripts/install.sh)") from e

    def launch(self, argv: list[str]) -> subprocess.Popen:
        argv = app_argv(argv, str(self.home))
        if argv and argv[0] == "chromium":  # no DevTools port here: it would be the host's, open to every local user
            argv = [a for a in argv if not a.startswith("--remote-debugging-")]
        return self.spawn(argv, log="apps.log")

    def run(self, argv: list[str] | str, timeout: float, shell: bool) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env(), cwd=str(self.home), shell=shell, capture_output=True,
                              text=True, errors="replace", timeout=timeout, start_new_session=True,
                              **as_user(self.seat.user))

    def run_bounded(self, argv: list[str] | str, *, shell: bool, timeout: float, max_output: int) -> dict[str, Any]:
        """The streams go to files capped by RLIMIT_FSIZE, so a command that prints without end is
        stopped (SIGXFSZ) instead of filling the service's memory or disk."""

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_output + 1, max_output + 1))

        root = self.seat.root
        with tempfile.TemporaryFile(dir=root) as out, tempfile.TemporaryFile(dir=root) as err:
            try:
                p = subprocess.Popen(argv, env=self.env(), cwd=str(self.home), shell=shell, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=err, start_new_session=True, preexec_fn=cap,
                                     **as_user(self.seat.user))
            except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
                return {"status": "error", "output": "", "error": str(e), "returncode": 127}
            try:
                rc = p.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc, timed_out = p.wait(), True

            def read(f: Any) -> str:
                f.seek(0)
                data = f.read(max_output + 1)
                text = data[:max_output].decode("utf-8", "replace")
                return text + (f"\n[output cut at {max_output} bytes]" if len(data) > max_output else "")

            if timed_out:
                return {"status": "error", "output": read(out), "error": f"timed out after {timeout}s",
                        "returncode": -1}
            return {"status": "success", "output": read(out), "error": read(err), "returncode": rc}

    def close_apps(self, include_wm: bool = False) -> None:
        wm = self._wm.pid if self._wm and not include_wm else None
        procs.kill_all([p for p in procs.marked(MARK, self.seat.id) if p != wm])
        if include_wm:
            self._wm = None
