"""How a desktop's sandbox is built: bubblewrap's command line, and the files the sandbox sees in
/opt/agentenv (the runner, the shims that make it look like OSWorld's VM, openbox's config).

Namespaces: user, mount, PID, IPC, UTS, cgroup and network are all new (``--unshare-all``), so from
inside there is no network (the host's loopback services included), no host process to signal and
no other desktop's X socket (abstract sockets are per network namespace, the path is not mounted).
The host's ``/usr`` is read-only; ``/``, ``/tmp`` and ``/run`` are the sandbox's own tmpfs, wiped at
every reset by the runner; ``/etc`` and ``/var`` are tmpfs too, holding the runner's copy of the
host's (what the desktop user can read, host secrets left out, the sandbox's own passwd and group),
made again at every reset, touching only what changed; HOME is a host folder restored from its
template at reset, as for the plain desktop. bwrap runs as the unprivileged desktop user, so even a
way out of the namespaces lands as that user.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
from pathlib import Path
from typing import Any

from agentenv.envs import sandbox_vm
from agentenv.envs.apps import write_openbox_files
from agentenv.envs.desktop_types import OSWORLD_HOME, Seat

UID = 1000
# pyautogui and its pure-Python dependencies for the sandbox's python3 (scripts/install.sh).
SANDBOX_SITE = Path(os.environ.get("AGENTENV_SANDBOX_SITE", "/opt/agentenv/sandbox-site"))
INNER = sandbox_vm.INNER      # where the sandbox sees the runner, the shims and openbox's files
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


def sandbox_env(display: str) -> dict[str, str]:
    """The environment inside the sandbox (the runner's, which every process inherits)."""
    return {
        "PATH": PATH,
        "SHELL": "/bin/bash",
        "HOME": OSWORLD_HOME,
        "USER": "user",
        "LOGNAME": "user",
        "DISPLAY": display,
        "XAUTHORITY": "/run/Xauthority",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # GTK3 apps load the accessibility bridge by themselves; GTK2 ones (pcmanfm) need these
        # modules (GTK3 skips both names: it has them built in).
        "GTK_MODULES": "gail:atk-bridge",
        # GTK4 apps (Files) draw with the CPU: with their GL renderer on Xvfb a folder stayed
        # "Loading..." for over 8 s under load
        "GSK_RENDERER": "cairo",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "XDG_DATA_DIRS": sandbox_vm.XDG_DATA_DIRS,
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus",
        "PYTHONPATH": f"{INNER}/site",
    }


def copies(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """What the runner copies into /etc and /var (sandbox_runner.sync's skip and files)."""
    var_skip = []
    if user is not None and user.pw_dir.startswith("/var/"):
        var_skip.append(user.pw_dir[len("/var/"):])  # the desktop user's own host HOME
    return {"/etc": {"skip": list(ETC_LEFT_OUT),
                     "files": {"passwd": f"{INNER}/passwd", "group": f"{INNER}/group"}},
            "/var": {"skip": var_skip}}


def write_sys_folder(sys: Path, user: pwd.struct_passwd | None, terminal: str) -> None:
    """Fill ``sys``, the sandbox's read-only /opt/agentenv: the runner, the AT-SPI reader, passwd and
    group, the copies' rules, the VM's programs and settings (sandbox_vm.py), openbox's files."""
    here = Path(__file__).parent
    shutil.copyfile(here / "sandbox_runner.py", sys / "runner.py")
    shutil.copyfile(here / "sandbox_a11y.py", sys / "a11y.py")
    (sys / "passwd").write_text(PASSWD)
    (sys / "group").write_text(GROUP)
    (sys / "copies.json").write_text(json.dumps(copies(user)))
    (sys / "empty").touch()  # bound over host files the copies leave out (hide_left_out)
    for top in ("etc", "var"):
        (sys / "host" / top).mkdir(parents=True)  # where the host's are bound, read-only
    sandbox_vm.write_files(sys)  # sudo, python, the terminal, google-chrome, firefox.desktop, the VM's settings
    write_openbox_files(sys, INNER, terminal)


def hide_left_out(sys: Path, user: pwd.struct_passwd | None) -> list[str]:
    """bwrap arguments that cover what the copies leave out or replace (passwd, group) in the
    runner's read-only view of the host's /etc and /var too (an empty file or folder over it)."""
    out: list[str] = []
    for top, c in copies(user).items():
        for pat in [*c["skip"], *c.get("files", {})]:
            for path in sorted(glob.glob(os.path.join(top, pat))):
                inner = f"{INNER}/host{path}"
                if os.path.islink(path):
                    continue  # a link shows nothing of its own; its target is covered or not
                empty = ["--tmpfs", inner] if os.path.isdir(path) else ["--ro-bind", str(sys / "empty"), inner]
                out += empty
    return out


def bwrap_argv(seat: Seat, homes: Path, ctl: Path, x11: Path, sys: Path) -> list[str]:
    """The command line of the sandbox: bwrap, then the runner (the first process inside)."""
    argv = ["bwrap", "--unshare-all", *(["--share-net"] if seat.spec.network else []),
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
             "--tmpfs", "/tmp", "--bind", str(x11), "/tmp/.X11-unix",
             "--tmpfs", "/run", "--bind", str(ctl), "/run/agentenv",
             "--ro-bind", str(seat.xauth), "/run/Xauthority",
             "--bind", str(homes), "/home",
             # HOME also at its host path: a path the service resolved (a setup step's file)
             # means the same file inside.
             "--bind", str(homes), str(homes),
             "--ro-bind", str(sys), INNER,
             "--ro-bind", "/etc", f"{INNER}/host/etc", "--ro-bind", "/var", f"{INNER}/host/var"]
    argv += hide_left_out(sys, seat.user)
    if (SANDBOX_SITE / "pyautogui").is_dir():
        argv += ["--ro-bind", str(SANDBOX_SITE), f"{INNER}/site"]
    if sandbox_vm.code_server_installed():
        argv += ["--ro-bind", str(sandbox_vm.CODE_SERVER), f"{INNER}/code-server"]
    argv += ["--uid", str(UID), "--gid", str(UID), "--chdir", OSWORLD_HOME, "--clearenv"]
    for k, v in sandbox_env(seat.display).items():
        argv += ["--setenv", k, v]
    return argv + ["--", "/usr/bin/python3", "-I", f"{INNER}/runner.py", seat.display, str(seat.spec.width),
                   str(seat.spec.height), seat.id]
