"""The first process inside a desktop's sandbox (standard library only: it runs on the system's
python3, not the service's environment).

    python3 -I /opt/agentenv/runner.py DISPLAY WIDTH HEIGHT DESKTOP_ID

It starts the desktop's X server, its D-Bus session bus and the accessibility (AT-SPI) bus, then
answers the env service on the unix socket /run/agentenv/runner.sock (a folder the service sees
from the host): one JSON request
per connection, one JSON line back. Everything a task or an agent runs is started here, so it
lives in the sandbox's namespaces. Requests:

    {"op": "ping"}
    {"op": "run", "argv": [...] | "cmd", "shell": bool, "timeout": s, "max_output": bytes}
    {"op": "spawn", "argv": [...], "keep": bool}       an app (keep: the window manager)
    {"op": "reset"}       end every process but the X server, the buses and kept ones; remove what
                          was written to the sandbox's own filesystem (/, /tmp, /dev/shm, /run, /run/user)
                          and make /etc and /var copies of the host's again (``sync``)

/etc and /var are the sandbox's own tmpfs: before anything else starts the runner fills them with a
copy of the host's (bound read-only at /opt/agentenv/host), as COPIES (/opt/agentenv/copies.json,
written by the service) says: what to leave out, which files are the sandbox's own.

Nothing here is a privilege boundary: anything inside may talk to this socket, and it can do
nothing the sandbox's user cannot do. But what the runner answers decides scores (evaluator
commands run through it), so an answer carries an HMAC of the request's nonce and the answer, with
a key the service wrote on the runner's stdin. The runner is not dumpable, so nothing else inside
(same uid) can ptrace it or read its memory or descriptors: a fake runner put in the socket's
place cannot forge an answer.
"""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import hmac
import json
import os
import shutil
import signal
import socketserver
import stat
import subprocess
import sys
import threading
import time

CTL = "/run/agentenv"
SOCK = CTL + "/runner.sock"
RUNTIME = "/run/user/1000"
PULSE_SCRIPT = "/opt/agentenv/pulse.pa"  # commands the sound server runs at start
BUS = RUNTIME + "/bus"
# What the sandbox's writable places hold at start; a reset removes everything else (/run: sudo's
# remembered passwords in /run/sudo, what a task made there).
WRITABLE = ("/", "/tmp", "/dev/shm", "/run", RUNTIME)
# /etc and /var: the sandbox's tmpfs, copies of the host's (read-only here) that a reset makes again.
HOST = "/opt/agentenv/host"
COPIES = "/opt/agentenv/copies.json"  # {"/etc": {"skip": [patterns], "files": {"passwd": path}}, ...}

_lock = threading.Lock()
_keep: set[int] = set()
# Kept with every descendant: the accessibility bus launcher (and the dbus-daemon it starts).
_keep_tree: set[int] = set()
_children: list[subprocess.Popen] = []
_initial: dict[str, set[str]] = {}
_copies: dict[str, dict] = {}
_synced: dict[str, dict[str, tuple[int, int]]] = {}  # per copy: what the last sync left (``sync``)
# Apps and commands (not the X server, the bus or the runner) carry AGENTENV_DESKTOP=<id>, as on a
# plain desktop: the host finds a desktop's apps by it.
_app_env: dict[str, str] = dict(os.environ)


def _log(msg: str) -> None:
    with open(CTL + "/runner.log", "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")


def _popen(argv: list[str] | str, keep: bool = False, log: str = "apps.log", cwd: str | None = None,
           **kw) -> subprocess.Popen:
    out = open(os.path.join(CTL, log), "ab")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                             cwd=cwd or os.environ.get("HOME", "/"), env=None if keep else _app_env, **kw)
    finally:
        out.close()
    with _lock:
        _children.append(p)
        if keep:
            _keep.add(p.pid)
    return p


def _reap_forever() -> None:
    # Apps the runner started are its children: poll them so none stays a zombie.
    while True:
        time.sleep(0.5)
        with _lock:
            _children[:] = [p for p in _children if p.poll() is None]


def _start_bus() -> None:
    _popen(["dbus-daemon", "--session", "--nofork", "--nopidfile", "--address=unix:path=" + BUS],
           keep=True, log="dbus.log")
    deadline = time.monotonic() + 5
    while not os.path.exists(BUS) and time.monotonic() < deadline:
        time.sleep(0.01)


def _start_audio() -> None:
    # A sound server with a null sink, so `pactl` (OSWorld's volume tasks) has something to set;
    # not kept: a reset ends it with the apps and starts a fresh one (volumes back to the VM's).
    if shutil.which("pulseaudio") is None:
        return
    # Its volume: the VM's, not 100 % (OSWorld's os/28cc3b7e, "turn up to the max volume", expects
    # 100), set by a script the sandbox was given (sandbox_vm.py), in the server: no pactl to wait for.
    script = ["-F", PULSE_SCRIPT] if os.path.exists(PULSE_SCRIPT) else []
    _popen(["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit", "--log-target=stderr",
            "-n", "--load=module-null-sink", "--load=module-native-protocol-unix",
            "--load=module-always-sink", *script], log="pulse.log")
    deadline = time.monotonic() + 3  # ready before a task's first pactl
    while not os.path.exists(RUNTIME + "/pulse/native") and time.monotonic() < deadline:
        time.sleep(0.01)


def _start_a11y_bus() -> None:
    # AT-SPI: apps (GTK's bridge) register on this bus and /accessibility and /terminal read them.
    # Started here, not by D-Bus activation, so that it is part of the initial state (its socket in
    # /run/user/1000/at-spi) and survives resets; --a11y=1 tells toolkits that ask that it is on.
    launcher = "/usr/libexec/at-spi-bus-launcher"
    if not os.path.exists(launcher):
        _log("no AT-SPI bus launcher (at-spi2-core): no accessibility tree")
        return
    # In /: the service swaps HOME while this starts (its first restore, once X is up).
    p = _popen([launcher, "--launch-immediately", "--a11y=1"], keep=True, log="a11y.log", cwd="/")
    with _lock:
        _keep_tree.add(p.pid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if os.listdir(RUNTIME + "/at-spi"):
                break
        except OSError:
            pass
        time.sleep(0.01)
    else:
        _log("the AT-SPI bus did not start in 5 s")
        return
    # The registry (the apps' list) would be started by the bus when the first app registers, as
    # an orphan that a reset ends and the next app waits for; started here it is kept.
    _popen(["/usr/libexec/at-spi2-registryd"], keep=True, log="a11y.log", cwd="/")


def _descendants(roots: set[int]) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += kids.get(pid, [])
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_others(grace: float = 1.0) -> int:
    me = os.getpid()
    with _lock:
        keep = set(_keep) | {1, me} | _descendants(_keep_tree)
    victims = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) not in keep]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with _lock:
                for p in _children:
                    p.poll()
            victims = [p for p in victims if _alive(p)]
            if not victims:
                break
            time.sleep(0.01)
    return len(victims)


def _remove(path: str) -> None:
    def fix(func, p, exc):  # a folder made unreadable by its owner (us) inside the sandbox
        try:
            os.chmod(os.path.dirname(p) or "/", 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=fix)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _ident(st: os.stat_result) -> tuple[int, int]:
    # A file's inode and ctime change with every write, chmod, rename or link to it, and no one
    # can set them back: a file whose pair is what the last sync left is that file, unchanged.
    return st.st_ino, st.st_ctime_ns


def _listing(s: str, rel: str, skip: tuple[str, ...], instead: dict[str, str]) -> dict[str, str]:
    """The entries of folder ``s`` (``rel`` under the copy's root) to copy: name -> path."""
    try:
        srcs = {name: os.path.join(s, name) for name in os.listdir(s)}
    except OSError:
        srcs = {}
    srcs = {name: sp for name, sp in srcs.items()  # left out: removed if a task made one
            if not any(fnmatch.fnmatchcase(f"{rel}/{name}" if rel else name, pat) for pat in skip)}
    srcs.update(instead)
    return srcs


def _copy_entry(sp: str, p: str, st: os.stat_result) -> bool:
    """Copy the link or regular file ``sp`` (whose lstat is ``st``) to ``p``; False if it is left out."""
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(sp), p)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            shutil.copyfile(sp, p, follow_symlinks=False)  # copy2's xattr calls cost more than
            os.chmod(p, stat.S_IMODE(st.st_mode))          # the copy itself
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        else:
            return False  # a device, fifo or socket: not a file a task reads
    except OSError:
        _remove(p)  # unreadable to the desktop user: stays out
        return False
    return True


def sync(src: str, dst: str, synced: dict[str, tuple[int, int]] | None = None,
         skip: tuple[str, ...] = (), files: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """Make the tree ``dst`` a copy of ``src`` and return what it left, for the next call.

    Only what differs is touched: an entry of ``dst`` whose (inode, ctime) is what ``synced`` says
    the last sync left is taken as unchanged, anything else is copied again, what ``src`` lacks is
    removed; folders get their mode and mtime back. Links are copied as links, never followed.
    Mount points inside ``dst`` (host folders bound read-only into a copy) are left alone.
    ``skip``: paths under ``src`` (relative, fnmatch patterns) left out; ``files``: relative path ->
    the file copied there instead of ``src``'s. What cannot be read in ``src`` (running as the
    desktop user: what that user may not read) is left out."""
    synced = synced or {}
    left: dict[str, tuple[int, int]] = {}
    root_dev = os.lstat(dst).st_dev
    instead: dict[str, dict[str, str]] = {}
    for r, path in (files or {}).items():
        instead.setdefault(os.path.dirname(r), {})[os.path.basename(r)] = path

    def walk(s: str, d: str, rel: str, want: os.stat_result) -> None:
        if stat.S_IMODE(os.lstat(d).st_mode) & 0o700 != 0o700:
            os.chmod(d, 0o700)  # a folder made unreadable or read-only: ours to change until done
        srcs = _listing(s, rel, skip, instead.get(rel, {}))
        for name in os.listdir(d):
            if name not in srcs:
                p = os.path.join(d, name)
                if os.lstat(p).st_dev == root_dev:
                    _remove(p)
        for name, sp in srcs.items():
            r = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(sp)
            except OSError:
                continue
            p = os.path.join(d, name)
            try:
                now = os.lstat(p)
            except FileNotFoundError:
                now = None
            if now is not None and now.st_dev != root_dev:
                continue  # a mount point
            if stat.S_ISDIR(st.st_mode):
                if not os.access(sp, os.R_OK | os.X_OK):  # unreadable to the desktop user: stays out
                    if now is not None:
                        _remove(p)
                    continue
                if now is not None and not stat.S_ISDIR(now.st_mode):
                    _remove(p)
                    now = None
                if now is None:
                    try:
                        os.mkdir(p, 0o700)
                    except OSError:
                        continue
                walk(sp, p, r, st)
                continue
            if now is not None and synced.get(r) == _ident(now):
                left[r] = synced[r]
                continue
            if now is not None:
                _remove(p)
            if _copy_entry(sp, p, st):
                left[r] = _ident(os.lstat(p))
        now = os.lstat(d)
        if stat.S_IMODE(now.st_mode) != stat.S_IMODE(want.st_mode):
            os.chmod(d, stat.S_IMODE(want.st_mode))
        if now.st_mtime_ns != want.st_mtime_ns:  # `ls -l` shows the folder as it was, too
            os.utime(d, ns=(want.st_atime_ns, want.st_mtime_ns))

    walk(src, dst, "", os.stat(src))
    return left


def _sync_copies() -> None:
    for top, c in _copies.items():
        _synced[top] = sync(HOST + top, top, _synced.get(top), tuple(c.get("skip", ())), c.get("files"))


def _clean() -> list[str]:
    removed = []
    for top in WRITABLE:
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            if name not in _initial.get(top, set()):
                path = os.path.join(top, name)
                _remove(path)
                removed.append(path)
    _sync_copies()
    return removed


def _run(req: dict) -> dict:
    # Output is read from pipes, not capped with RLIMIT_FSIZE (that limit would also stop a command
    # writing a big file, or a sound client sizing its shared memory: pactl). A command whose output
    # passes max_output is ended, as the file limit did: one that prints without end must not run
    # until its timeout.
    max_output = int(req.get("max_output", 1 << 20))
    timeout = float(req.get("timeout", 60))
    try:
        p = subprocess.Popen(req["argv"], shell=bool(req.get("shell")), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             cwd=os.environ.get("HOME", "/"), env=_app_env)
    except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
        return {"returncode": 127, "stdout": "", "stderr": str(e), "timed_out": False, "spawn_error": True}
    bufs = {"stdout": bytearray(), "stderr": bytearray()}

    def drain(stream, buf: bytearray) -> None:
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            if len(buf) <= max_output:
                buf += chunk[: max_output + 1 - len(buf)]
                if len(buf) > max_output:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    readers = [threading.Thread(target=drain, args=(p.stdout, bufs["stdout"]), daemon=True),
               threading.Thread(target=drain, args=(p.stderr, bufs["stderr"]), daemon=True)]
    for t in readers:
        t.start()
    timed_out = False
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc, timed_out = p.wait(), True
    for t in readers:  # a background child may hold the pipes open: do not wait for it
        t.join(1.0)
    out: dict = {"returncode": rc, "timed_out": timed_out}
    for k, buf in bufs.items():
        data = bytes(buf)
        out[k] = data[:max_output].decode("utf-8", "replace")
        out[k + "_cut"] = len(data) > max_output
    p.stdout.close()
    p.stderr.close()
    return out


def _handle(req: dict) -> dict:
    op = req.get("op")
    if op == "ping":
        return {"ok": True}
    if op == "run":
        return _run(req)
    if op == "spawn":
        try:
            p = _popen(req["argv"], keep=bool(req.get("keep")), log=req.get("log", "apps.log"))
        except FileNotFoundError:
            return {"error": "not installed (run scripts/install.sh)"}
        except PermissionError as e:
            return {"error": str(e)}
        return {"pid": p.pid}
    if op == "reset":
        left = _kill_others()
        removed = _clean()
        _start_audio()
        return {"left": left, "removed": removed}
    return {"error": f"unknown op {op!r}"}


_key = b""


def sign(key: bytes, nonce: str, body: str) -> str:
    return hmac.new(key, (nonce + "\n" + body).encode(), hashlib.sha256).hexdigest()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(16 << 20)
        nonce = ""
        try:
            req = json.loads(line)
            nonce = str(req.get("nonce", ""))
            resp = _handle(req)
        except Exception as e:  # a bad request is answered, never the end of the sandbox
            resp = {"error": f"{type(e).__name__}: {e}"}
        body = json.dumps(resp)
        self.wfile.write(json.dumps({"body": body, "mac": sign(_key, nonce, body)}).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 256  # many requests at once (the default 5 makes connect() fail with EAGAIN)


def main() -> None:
    global _key
    # Not dumpable before the key is read: no process of the sandbox's user may ptrace this one.
    PR_SET_DUMPABLE = 4
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SystemExit("runner: prctl(PR_SET_DUMPABLE) failed")
    _key = bytes.fromhex(sys.stdin.readline().strip())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    display, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _app_env["AGENTENV_DESKTOP"] = sys.argv[4]
    os.makedirs(RUNTIME, mode=0o700, exist_ok=True)
    if os.path.exists(COPIES):  # /etc and /var first: everything after reads them
        with open(COPIES) as f:
            _copies.update(json.load(f))
        _sync_copies()
    xvfb = _popen(["Xvfb", display, "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp",
                   "-auth", "/run/Xauthority", "-noreset"], keep=True, log="xvfb.log")
    _start_bus()
    _start_audio()
    sock = f"/tmp/.X11-unix/X{display.lstrip(':')}"
    deadline = time.monotonic() + 15  # the X server's lock and socket belong to the initial state
    while not os.path.exists(sock) and xvfb.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:  # after the X server: the launcher publishes the bus's address on the root window
        _start_a11y_bus()
    except OSError as e:  # a desktop without AT-SPI still works
        _log(f"cannot start the AT-SPI bus: {e}")
    for top in WRITABLE:
        try:
            _initial[top] = set(os.listdir(top))
        except OSError:
            _initial[top] = set()
    threading.Thread(target=_reap_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # bwrap's init then ends the rest
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    server = _Server(SOCK, _Handler)
    _log(f"runner up, X server pid {xvfb.pid}")
    server.serve_forever()


if __name__ == "__main__":
    main()
