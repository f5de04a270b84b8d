"""Links out of a desktop's HOME: the service (root) must never read or write through them.

Both kinds of desktop: a link made by the desktop user (``ln -s /etc/shadow ~/x``, what an agent
can type), a link swapped in after the service checked the path, a hard link, and upload_file
steps naming host files outside the folders tasks may upload from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from agentenv.envs.desktop import make_desktop
from agentenv.envs.desktop_types import DesktopSpec

from .conftest import start_service

pytestmark = pytest.mark.slow


def _digest(p: str) -> tuple[str, int, int]:
    st = os.stat(p)
    return hashlib.sha256(Path(p).read_bytes()).hexdigest(), st.st_uid, st.st_mode


@pytest.fixture(scope="module", params=[False, True], ids=["host", "sandbox"])
def svc(request, tmp_path_factory):
    s = start_service(tmp_path_factory, sandbox=request.param, num=1)
    yield s
    s.service.stop()


def test_links_made_by_the_desktop_user_lead_nowhere(svc):
    did = svc.ids()[0]
    r = svc.execute(did, "ln -sf /etc/shadow ~/x && ln -sfn /etc ~/etcdir && ln -sf /etc/shadow ~/Desktop/y && echo ok")
    assert r["output"].strip() == "ok", r
    shadow = _digest("/etc/shadow")
    for p in ["~/x", "/home/user/x", "~/etcdir/passwd", "~/Desktop/y", "x"]:
        r = svc.post(did, "/file", data={"file_path": p})
        assert r.status_code == 403, (p, r.status_code, r.text)
        r = svc.post(did, "/setup/upload", data={"file_path": p}, files={"file_data": ("f", b"pwned\n")})
        assert r.status_code == 403, (p, r.status_code, r.text)
    r = svc.post(did, "/setup/upload", data={"file_path": "~/etcdir/agentenv-probe"},
                 files={"file_data": ("f", b"pwned\n")})
    assert r.status_code == 403, r.text
    assert _digest("/etc/shadow") == shadow and not Path("/etc/agentenv-probe").exists()
    # a link that stays inside HOME is fine, relative or absolute (inside a sandbox /home/user/...)
    svc.execute(did, "echo inside > ~/Documents/t.txt && ln -sf Documents/t.txt ~/ok && "
                     "ln -sf ~/Documents/t.txt ~/ok-abs && ln -sfn ~/Documents ~/docs")
    for p in ("~/ok", "~/ok-abs", "~/docs/t.txt", "/home/user/docs/t.txt"):
        assert svc.post(did, "/file", data={"file_path": p}).content == b"inside\n", p
    svc.execute(did, "ln -sfn /home/user/../../etc ~/up")
    assert svc.post(did, "/file", data={"file_path": "~/up/passwd"}).status_code == 403


def test_upload_file_step_reads_only_the_tasks_folder_under_allowed_roots(svc, tmp_path):
    did = svc.ids()[0]
    (svc.upload_root / "data.txt").write_text("gold")
    os.chmod(svc.upload_root / "data.txt", 0o644)

    def reset(source: str | None, local: str) -> tuple[int, str]:
        task = {"id": "up", "instruction": "-", "config": [{"type": "upload_file", "parameters": {
            "files": [{"local_path": local, "path": "/home/user/Desktop/got.txt"}]}}]}
        if source is not None:
            task["source"] = source
        r = svc.post(did, "/reset", json={"task": task})
        return r.status_code, r.text

    assert reset(str(svc.upload_root / "t.json"), "data.txt")[0] == 200
    assert svc.post(did, "/file", data={"file_path": "~/Desktop/got.txt"}).content == b"gold"
    for source, local, why in [
        ("/t.json", "/etc/hostname", "outside the folders"),            # a request may claim any source
        (str(svc.upload_root / "t.json"), "/etc/hostname", "outside the task's folder"),
        (str(svc.upload_root / "t.json"), "../../../etc/hostname", "outside the task's folder"),
        (str(tmp_path / "t.json"), "x.txt", "outside the folders"),      # a folder nobody allowed
        (None, "/etc/hostname", "needs a task loaded from a file"),
    ]:
        (tmp_path / "x.txt").write_text("x")
        code, text = reset(source, local)
        assert code == 422 and why in json.loads(text)["detail"], (source, local, code, text)


@pytest.fixture
def desktop(tmp_path):
    d = make_desktop("paths-" + os.urandom(3).hex(), DesktopSpec(width=320, height=240, sandbox=False)).start()
    yield d
    d.close()


def test_links_swapped_in_after_the_check_are_not_followed(desktop, tmp_path, monkeypatch):
    d = desktop
    victim = tmp_path / "victim"
    victim.write_text("host secret")
    os.symlink(victim, d.home / "x")
    os.symlink(tmp_path, d.home / "dirlink")
    os.link(victim, d.home / "hard")  # a hard link (the desktop user cannot make one to a file not its)
    with pytest.raises(PermissionError):  # resolve_path sees where a link leads now
        d.read_file("~/x", 100)
    # A link planted between resolve_path's check and the open: the check is made to pass.
    monkeypatch.setattr(d, "resolve_path", lambda p: d.home / p)
    for name in ("x", "dirlink/victim"):
        with pytest.raises(OSError):
            d.read_file(name, 100)
        with pytest.raises(OSError):
            d.write_file(name, b"pwned")
    with pytest.raises(PermissionError, match="hard links"):
        d.write_file("hard", b"pwned")
    with pytest.raises(PermissionError, match="hard links"):
        d.read_file("hard", 100)
    assert victim.read_text() == "host secret" and os.stat(victim).st_uid == os.getuid()
    assert not (tmp_path / "pwned").exists()


def test_written_files_and_their_folders_belong_to_the_desktop_user(desktop):
    d = desktop
    d.write_file("~/a/b/c.txt", b"hi")
    assert d.read_file("/home/user/a/b/c.txt", 100) == b"hi"
    if d.user is not None:
        for p in (d.home / "a", d.home / "a" / "b", d.home / "a" / "b" / "c.txt"):
            assert os.stat(p).st_uid == d.user.pw_uid, p


def test_each_desktop_has_an_xauthority_of_its_own(tmp_path):
    a = make_desktop("xa-" + os.urandom(3).hex(), DesktopSpec(width=320, height=240, sandbox=False)).start()
    b = make_desktop("xb-" + os.urandom(3).hex(), DesktopSpec(width=320, height=240, sandbox=False)).start()
    try:
        for d, other in ((a, b), (b, a)):
            r = d.run(["xauth", "-f", d.env()["XAUTHORITY"], "list"])
            lines = r.stdout.strip().splitlines()
            assert len(lines) == 1 and lines[0].split()[0].endswith(d.display), r.stdout
            assert d.env()["XAUTHORITY"] != other.env()["XAUTHORITY"]
        service = Path(os.environ["XAUTHORITY"])
        assert os.stat(service).st_mode & 0o077 == 0 and os.stat(service).st_uid == os.geteuid()
        if a.user is not None:  # the desktop user cannot read the service's file (all cookies)
            r = a.run(["cat", str(service)])
            assert r.returncode != 0
    finally:
        a.close()
        b.close()


def test_pyautogui_code_runs_as_code_only_inside_a_sandbox(svc, tmp_path):
    env = __import__("httpx").get(svc.url + "/envs", headers=svc.h).json()[0]
    marker = tmp_path / "pwned"
    os.chmod(tmp_path, 0o777)
    src = f"import pyautogui; import os; os.system('touch {marker}'); pyautogui.moveTo(7, 8)"
    r = svc.post(env["id"], "/execute", json={"command": ["python", "-c", src]})
    if env["sandboxed"]:
        assert r.status_code == 200 and r.json()["returncode"] == 0, r.text
        assert svc.post(env["id"], "/cursor_position").json() == [7, 8]
    else:  # on the host only the allowed calls run, as actions
        assert r.status_code == 400 and "refused" in r.json()["message"], r.text
    assert not marker.exists()


def test_code_routes_are_served_by_sandboxed_desktops_only(svc):
    env = __import__("httpx").get(svc.url + "/envs", headers=svc.h).json()[0]
    r = svc.post(env["id"], "/run_python", json={"code": "print(1)"})
    b = svc.post(env["id"], "/run_bash_script", json={"script": "echo 1"})
    t = svc.post(env["id"], "/list_directory", json={"path": "~"})
    assert t.status_code == 200 and t.json()["directory_tree"]["type"] == "directory"
    if env["sandboxed"]:
        assert r.status_code == 200 and b.status_code == 200
    else:
        assert r.status_code == 403 and b.status_code == 403 and "sandboxed" in r.json()["detail"]
        # no AT-SPI on the plain desktop: a 501 that names the desktop that has it
        for route in ("/accessibility", "/terminal"):
            a = __import__("httpx").get(f"{svc.url}/envs/{env['id']}{route}", headers=svc.h)
            assert a.status_code == 501 and "sandboxed desktop" in a.json()["detail"], (route, a.text)
