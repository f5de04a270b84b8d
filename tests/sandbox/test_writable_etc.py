"""/etc and /var inside a sandboxed desktop are its own copies: root inside (``sudo -S``) may change
them as a task setup does, a reset makes them the pristine copies again, and the host's files never
change. What the desktop user cannot read, and host secrets it could, are never copied in."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import started_desktop

from agentenv.types import Task

pytestmark = pytest.mark.slow

# The tree as `ls -l` would show it: path, type, mode, mtime, and size and link target (not a folder's
# size: the file system's, it grows with what the folder ever held).
TREE = ("cd {d} && find . -xdev \\( -type d -printf '%p d %m %T@\\n' \\) -o -printf '%p %y %m %s %l %T@\\n' "
        "| LC_ALL=C sort | md5sum")


@pytest.fixture(scope="module")
def desktop():
    with started_desktop("etc-test", width=640, height=480, sandbox=True) as d:
        yield d


def sh(d, cmd: str) -> tuple[int, str]:
    r = d.run(cmd, shell=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def digest(p: str) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_root_writes_to_etc_in_a_setup_are_gone_after_reset(desktop):
    host = {p: digest(p) for p in ("/etc/hosts", "/etc/passwd", "/etc/group")}
    useradd = shutil.which("useradd", path="/usr/sbin:/usr/bin") is not None
    pristine = sh(desktop, TREE.format(d="/etc"))[1]
    task = Task(id="etc", instruction="-", extra={"snapshot": "os"}, config=[
        {"type": "execute", "parameters": {"shell": True, "command":
            "echo password | sudo -S sh -c 'echo 10.1.2.3 agentenv-etc-test >> /etc/hosts && mkdir /test"
            + (" && useradd -M alice && groupadd devs" if useradd else "") + "'"}}])
    desktop.reset(task)
    rc, out = sh(desktop, "getent hosts agentenv-etc-test; ls -d /test; echo password | sudo -S stat -c '%U %a' /etc/hosts")
    assert rc == 0 and "10.1.2.3" in out and "/test" in out, out
    assert "root" in out.split()  # inside sudo the copy is root's, as in OSWorld's VM
    if useradd:
        rc, out = sh(desktop, "id -u alice; getent group devs")
        assert rc == 0 and out.split()[0] == "1001" and out.split()[1].startswith("devs:"), out
    assert {p: digest(p) for p in host} == host and not Path("/test").exists()

    desktop.reset(None)
    rc, out = sh(desktop, "getent hosts agentenv-etc-test; ls -d /test; id -u alice; getent group devs; cat /etc/hosts")
    assert "10.1.2.3" not in out and out.count("No such file") == 1 and "no such user" in out, out
    assert open("/etc/hosts").read() in out  # the host's hosts file, as it was
    assert sh(desktop, TREE.format(d="/etc"))[1] == pristine  # useradd's backups (passwd-...) gone too
    assert {p: digest(p) for p in host} == host


def test_sudo_rm_rf_etc_leaves_the_next_reset_whole(desktop):
    desktop.reset(None)
    before = {d: sh(desktop, TREE.format(d=d))[1] for d in ("/etc", "/var")}
    rc, out = sh(desktop, "echo password | sudo -S sh -c 'rm -rf /etc /var/log /var/tmp /var/lib 2>/dev/null; "
                          "rm -rf /etc; mkdir -p /etc/ssl/new /var/x; ln -sf /nowhere /etc/hostname; "
                          "chmod 000 /etc/ssl; chmod 555 /etc'")
    assert "Device or resource busy" in out, out  # /etc itself is a mount point: it stays, emptied
    rc, out = sh(desktop, "ls -A /etc; dpkg -l | grep -c ^ii")
    assert out.split()[:2] == ["hostname", "ssl"] and int(out.split()[2]) > 100, out  # dpkg's: the host's, read-only
    desktop.reset(None)
    after = {d: sh(desktop, TREE.format(d=d))[1] for d in ("/etc", "/var")}
    assert after == before
    rc, out = sh(desktop, "whoami; ls -ld /var/x /etc/ssl/new")
    assert rc != 0 and out.split()[0] == "user" and out.count("No such file") == 2, out
    assert Path("/etc/hostname").exists() and Path("/var/log").is_dir()  # the host's, untouched


def test_host_secrets_and_unreadable_files_stay_out(desktop):
    rc, out = sh(desktop, "ls /etc/shadow /etc/gshadow /etc/sudoers /etc/ssl/private /var/lib/agentenv-desk; "
                          "ls /etc/ssh | grep -c ssh_host_")
    assert out.count("No such file") == 5 and "0" in out.split(), out
    rc, passwd = sh(desktop, "cat /etc/passwd /etc/group")
    assert "user:x:1000:1000" in passwd and "agentenv-desk" not in passwd and "postgres" not in passwd, passwd
    # nor in the runner's read-only view of the host's /etc and /var, where the copies come from
    rc, out = sh(desktop, "cd /opt/agentenv/host && cat etc/passwd etc/group etc/passwd- etc/shadow; "
                          "ls -A etc/ssl/private; ls -A var/lib/agentenv-desk; ls etc | wc -l")
    assert out.split() == [out.split()[-1]] and int(out.split()[-1]) > 50, out  # all empty; the rest is there
    assert [p for p in ("/etc/shadow", "/etc/ssl/private") if os.path.exists(p)]  # the host has them
