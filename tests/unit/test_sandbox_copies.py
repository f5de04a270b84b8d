"""Pure logic on real files, no desktop: the sandbox runner's ``sync`` (how a sandbox's /etc and /var become
copies of the host's again at reset) and the env service's OSWorld port slots."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentenv.envs.sandbox_runner import sync


def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes(), st.st_mtime_ns)
    return out


@pytest.fixture
def base(tmp_path) -> Path:
    b = tmp_path / "base"
    (b / "ssl" / "certs").mkdir(parents=True)
    (b / "hosts").write_text("127.0.0.1 localhost\n")
    (b / "ssl" / "certs" / "ca.pem").write_text("cert\n")
    os.symlink("/usr/share/zoneinfo/UTC", b / "localtime")
    os.symlink("ca.pem", b / "ssl" / "certs" / "link.pem")
    (b / "ro").mkdir(mode=0o555)
    os.chmod(b / "ro", 0o555)  # a read-only folder: a reset still restores what is in it
    return b


def test_sync_restores_every_change_and_touches_only_what_changed(tmp_path, base):
    work = tmp_path / "work"
    work.mkdir()
    left = sync(str(base), str(work))
    pristine = tree(base)
    assert tree(work) == pristine
    untouched = os.lstat(work / "ssl" / "certs" / "ca.pem").st_ino

    before = os.stat(work / "hosts")
    with open(work / "hosts", "a") as f:  # a change with the mtime and size set back still shows in the ctime
        f.write("x")
    os.truncate(work / "hosts", before.st_size)
    os.utime(work / "hosts", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.chmod(work / "ro", 0o755)
    (work / "ro" / "new").write_text("n")
    os.chmod(work / "ro", 0o000)
    os.unlink(work / "localtime")
    os.symlink("/elsewhere", work / "localtime")
    (work / "ssl" / "certs" / "link.pem").unlink()
    (work / "ssl" / "certs" / "link.pem").mkdir()
    (work / "made").mkdir()
    (work / "made" / "f").write_text("f")

    left = sync(str(base), str(work), left)
    assert tree(work) == pristine
    assert os.lstat(work / "ssl" / "certs" / "ca.pem").st_ino == untouched  # not copied again
    assert sync(str(base), str(work), left) == left  # nothing changed: nothing copied


def test_sync_leaves_out_skipped_entries_takes_files_instead_and_leaves_mount_points(tmp_path, base):
    (base / "shadow").write_text("secret\n")
    (base / "passwd").write_text("host users\n")
    (base / "ssh").mkdir()
    (base / "ssh" / "ssh_host_rsa_key").write_text("key\n")
    (base / "ssh" / "ssh_config").write_text("cfg\n")
    own = tmp_path / "own-passwd"
    own.write_text("user:x:1000:1000::/home/user:/bin/bash\n")
    work = tmp_path / "work"
    work.mkdir()
    kw = dict(skip=("shadow", "ssh/ssh_host_*"), files={"passwd": str(own)})
    left = sync(str(base), str(work), **kw)
    assert not (work / "shadow").exists() and not (work / "ssh" / "ssh_host_rsa_key").exists()
    assert (work / "ssh" / "ssh_config").read_text() == "cfg\n"
    assert (work / "passwd").read_text() == own.read_text()
    (work / "passwd").write_text("user:x:1000:1000::/home/user:/bin/bash\nalice:x:1001:1001::/:/bin/sh\n")
    (work / "shadow").write_text("made by a task\n")
    sync(str(base), str(work), left, **kw)
    assert (work / "passwd").read_text() == own.read_text()  # useradd undone
    assert not (work / "shadow").exists()  # a name left out goes too, when a task makes one


def test_sync_leaves_mount_points_alone(tmp_path, base):
    if os.geteuid() != 0:
        pytest.skip("a mount point needs a mount (bwrap's ro binds inside /var)")
    import subprocess

    work = tmp_path / "work"
    work.mkdir()
    sync(str(base), str(work))
    (work / "ssl").rename(tmp_path / "moved")  # ssl becomes another file system's folder, read-only
    (work / "ssl").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(work / "ssl")], check=True)
    try:
        left = sync(str(base), str(work))
        assert os.listdir(work / "ssl") == [] and "ssl/certs/ca.pem" not in left
    finally:
        subprocess.run(["umount", str(work / "ssl")], check=True)


class _FakeDesktop:
    """make_desktop's stand-in: the slot logic only (the real one is tested over HTTP in
    tests/sandbox/test_osworld_routes.py)."""

    sandboxed, display, width, height, task_id = True, ":0", 64, 64, None

    def __init__(self, did, spec):
        self.id = did

    def start(self):
        if self.id.startswith("d3-"):
            raise OSError("no display")  # the third create fails: its slot must be freed
        return self

    def close(self):
        pass

    def alive(self):
        return True


def test_osworld_port_slots_are_taken_lowest_first_and_freed(monkeypatch):
    from agentenv.envs.service import host as hosting
    from agentenv.envs.desktop_types import DesktopError, DesktopSpec

    monkeypatch.setattr(hosting, "make_desktop", _FakeDesktop)
    host = hosting.DesktopHost(2, DesktopSpec(), osworld_ports=[9000, 9001])
    a, b = host.create(), host.create()
    assert (host.osworld_port(a.id), host.osworld_port(b.id)) == (9000, 9001)
    with pytest.raises(DesktopError, match="no display"):
        host.create()
    assert host.slots == [a.id, b.id]
    c = host.create()
    assert host.osworld_port(c.id) is None and host.info(c).osworld_port is None
    host.close(a.id)
    assert host.on_port(9000) is None and host.on_port(9001) == b.id
    d = host.create()
    assert host.osworld_port(d.id) == 9000 and host.on_port(9000) == d.id
    host.close(c.id)  # had no port: frees none
    assert host.slots == [d.id, b.id]
