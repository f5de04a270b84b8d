"""``code`` on a sandboxed desktop (the sandbox's /opt/agentenv/bin/code, run by its system python3):
VS Code as OSWorld's tasks start it, made of code-server (scripts/install_code_server.sh) and a
Chromium app window.

    code [PATH...]                  VS Code on PATH (a folder, a file, a .code-workspace) or on the last one
    code --install-extension X      code-server's extension commands, on ~/.vscode/extensions
    code --list-extensions [...]

One code-server per desktop, started by the first ``code``: it listens on 127.0.0.1 of the
desktop's own network namespace (no other desktop and nothing on the host reach it), without a
password, with its settings in ~/.config/Code (User/settings.json, keybindings.json: where OSWorld's
metrics read them) and its extensions in ~/.vscode/extensions, as on OSWorld's VM. A later ``code X``
reuses that server: X opens in the VS Code window already there (code-server's --reuse-window),
else in a new window. The server ends with the desktop's apps at reset.

A sandbox sharing the host's network (env.sandbox_network) would put that port on the host's
loopback, open to anything there: ``code`` refuses to start one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

ROOT = "/opt/agentenv/code-server"        # where the sandbox sees the install (sandbox_bwrap.py)
NODE, ENTRY = f"{ROOT}/bin/node", f"{ROOT}/app/out/node/entry.js"
PORT = 48020                              # on the desktop's own loopback
STATE = "/tmp/.agentenv-code"             # the server's log and lock, the window's profile (wiped at reset)
START_SECONDS = 60
REUSE_SECONDS = 30
# code-server's own commands: they run once and print, no server and no window
CLI_ONLY = {"--install-extension", "--uninstall-extension", "--list-extensions", "--show-versions",
            "--version", "-v", "--help", "-h"}
WINDOW_FLAGS = ["--no-first-run", "--no-default-browser-check", "--password-store=basic", "--disable-gpu",
                "--disable-component-update", "--disable-sync", "--disable-background-networking",
                "--disable-extensions", "--disable-features=Translate", "--class=Code"]


def dirs(home: str) -> tuple[str, str]:
    """VS Code's user data and extensions folders, as on OSWorld's VM."""
    return f"{home}/.config/Code", f"{home}/.vscode/extensions"


def url_for(paths: list[str], cwd: str, exists: dict[str, bool], port: int = PORT) -> str:
    """The address that opens ``paths`` (resolved from ``cwd``; ``exists`` maps a path to whether it is a
    folder): the first folder or workspace file as the window's folder, the first other file opened
    in it. No path: code-server's last folder."""
    folder = workspace = file = None
    for p in paths:
        p = os.path.normpath(os.path.join(cwd, p))
        if exists.get(p):
            folder = folder or p
        elif p.endswith(".code-workspace"):
            workspace = workspace or p
        else:
            file = file or p
    query: list[tuple[str, str]] = []
    if workspace and not folder:
        query.append(("workspace", workspace))
    elif folder:
        query.append(("folder", folder))
    elif file:
        query.append(("ew", "true"))  # an empty window holding the file, as `code FILE` opens
    if file:
        query.append(("payload", json.dumps([["openFile", f"vscode-remote://127.0.0.1:{port}{file}"]])))
    return f"http://127.0.0.1:{port}/" + ("?" + urllib.parse.urlencode(query) if query else "")


def private_network(net_dev: str) -> bool:
    """Whether /proc/net/dev (``net_dev``) shows the sandbox's own network: loopback only."""
    names = [line.split(":", 1)[0].strip() for line in net_dev.splitlines()[2:] if ":" in line]
    return names == ["lo"] or not names


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def server_argv(home: str) -> list[str]:
    data, ext = dirs(home)
    return [NODE, ENTRY, "--bind-addr", f"127.0.0.1:{PORT}", "--auth", "none", "--config", f"{STATE}/config.yaml",
            "--user-data-dir", data, "--extensions-dir", ext, "--disable-telemetry", "--disable-update-check",
            "--disable-workspace-trust", "--disable-proxy", "--disable-getting-started-override"]


def write_config() -> str:
    """code-server's config file (else it writes one into ~/.config/code-server, which the VM lacks)."""
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    with open(f"{STATE}/config.yaml", "w") as f:
        f.write("auth: none\ncert: false\n")
    return f"{STATE}/config.yaml"


def ensure_server(home: str) -> bool:
    """Start this desktop's code-server unless it runs; True when it was running already."""
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    with open(f"{STATE}/lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `code` at once start one server
        if listening(PORT):
            return True
        for d in dirs(home):
            os.makedirs(d, exist_ok=True)
        write_config()
        log = open(f"{STATE}/server.log", "ab")
        subprocess.Popen(server_argv(home), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True, cwd=home)
        deadline = time.monotonic() + START_SECONDS
        while not listening(PORT):
            if time.monotonic() > deadline:
                with open(f"{STATE}/server.log", errors="replace") as f:
                    tail = f.read()[-600:]
                sys.exit(f"code: code-server did not start in {START_SECONDS} s: {tail}")
            time.sleep(0.1)
        return False


def window_open() -> bool:
    """Whether this desktop's VS Code window (its Chromium) runs."""
    try:
        target = os.readlink(f"{STATE}/window/SingletonLock")  # host-pid, as Chromium writes it
        os.kill(int(target.rsplit("-", 1)[1]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def open_in_window(paths: list[str], home: str) -> bool:
    """Open ``paths`` in the VS Code window already there, through code-server's session socket; a
    window still loading registers its session once its extensions start: it is waited for."""
    data, ext = dirs(home)
    deadline = time.monotonic() + REUSE_SECONDS
    while window_open():
        r = subprocess.run([NODE, ENTRY, "--reuse-window", "--user-data-dir", data, "--extensions-dir", ext,
                            "--config", f"{STATE}/config.yaml", *paths], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        if r.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return False


def main(argv: list[str]) -> int:
    home = os.environ.get("HOME", "/home/user")
    if not os.path.isfile(ENTRY):
        sys.exit(f"code: VS Code (code-server) is not installed at {ROOT}: scripts/install.sh installs it")
    if any(a.split("=", 1)[0] in CLI_ONLY for a in argv):
        data, ext = dirs(home)
        os.execv(NODE, [NODE, ENTRY, "--config", write_config(), "--user-data-dir", data, "--extensions-dir", ext,
                        *argv])
    with open("/proc/net/dev") as f:
        if not private_network(f.read()):
            sys.exit("code: this desktop shares the host's network (env.sandbox_network): VS Code's server "
                     "would be open to the host, so it does not start here")
    paths = [a for a in argv if not a.startswith("-")]
    was_running = ensure_server(home)
    if was_running and paths and open_in_window(paths, home):
        return 0
    cwd = os.getcwd()
    full = [os.path.normpath(os.path.join(cwd, p)) for p in paths]
    url = url_for(full, cwd, {p: os.path.isdir(p) for p in full})
    subprocess.Popen(["chromium", f"--user-data-dir={STATE}/window", *WINDOW_FLAGS, f"--app={url}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
