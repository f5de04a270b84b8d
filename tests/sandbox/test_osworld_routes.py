"""OSWorld's other in-VM routes, on a sandboxed desktop (/run_python and /run_bash_script are
served there only: they run arbitrary code; /terminal and /accessibility read AT-SPI, which only the
sandboxed desktop runs)."""

from __future__ import annotations

import time

import httpx
import pytest

from agentenv.net import free_port

from .conftest import start_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    s = start_service(tmp_path_factory, sandbox=True, num=1, osworld_port=free_port())
    yield s
    s.service.stop()


def test_run_python_and_run_bash_script(svc):
    did = svc.ids()[0]
    r = svc.post(did, "/run_python", json={"code": "import os, sys\nprint(os.getuid(), os.getcwd())\n"
                                                    "print('to stderr', file=sys.stderr)"}).json()
    assert r["status"] == "success" and r["return_code"] == 0 and r["output"].split() == ["1000", "/home/user"], r
    assert "to stderr" in r["error"]
    r = svc.post(did, "/run_python", json={"code": "raise SystemExit(3)"}).json()
    assert r["status"] == "error" and r["return_code"] == 3
    r = svc.post(did, "/run_bash_script", json={"script": "echo $HOME\npwd\nexit 4", "working_dir": "/tmp"}).json()
    assert r["output"].split() == ["/home/user", "/tmp"] and r["returncode"] == 4 and r["status"] == "error", r
    r = svc.post(did, "/run_bash_script", json={"script": "sleep 5", "timeout": 0.5}).json()
    assert r["returncode"] == -1 and "timed out" in r["error"]


def test_list_directory(svc):
    did = svc.ids()[0]
    svc.post(did, "/run_bash_script", json={"script": "mkdir -p ~/Desktop/a/b && touch ~/Desktop/a/f.txt"})
    r = svc.post(did, "/list_directory", json={"path": "/home/user/Desktop"})
    assert r.status_code == 200, r.text
    tree = r.json()["directory_tree"]
    assert tree["name"] == "Desktop" and tree["type"] == "directory"
    a = next(c for c in tree["children"] if c["name"] == "a")
    assert {(c["type"], c["name"]) for c in a["children"]} == {("directory", "b"), ("file", "f.txt")}
    assert svc.post(did, "/list_directory", json={"path": "/nonexistent"}).status_code == 404


def test_terminal_text_close_window_and_wallpaper(svc):
    did = svc.ids()[0]
    svc.post(did, "/reset", json={"task": None})
    assert svc.post(did, "/step", json={"action": {"type": "hotkey", "keys": ["ctrl", "alt", "t"]},
                                        "screenshot": False}).status_code == 200
    deadline = time.monotonic() + 20
    while "$" not in (svc_terminal(svc, did) or "") and time.monotonic() < deadline:
        time.sleep(0.2)
    for a in ({"type": "type", "text": "echo hello-$((6*7))"}, {"type": "key", "keys": ["Return"]}):
        assert svc.post(did, "/step", json={"action": a, "screenshot": False}).status_code == 200
    deadline = time.monotonic() + 10
    while "hello-42" not in (svc_terminal(svc, did) or "") and time.monotonic() < deadline:
        time.sleep(0.2)
    text = svc_terminal(svc, did)
    assert "echo hello-$((6*7))" in text and "hello-42" in text, text
    assert "\x1b" not in text
    envs = httpx.get(svc.url + "/envs", headers=svc.h).json()
    assert envs[0]["alive"]
    r = svc.post(did, "/setup/close_window", json={"window_name": "Terminal"})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "Terminal" in titles(svc, did):
        time.sleep(0.2)
    assert "Terminal" not in titles(svc, did)
    assert svc.post(did, "/setup/close_window", json={"window_name": "Terminal"}).status_code == 404
    r = svc.post(did, "/setup/change_wallpaper", json={"path": "~/Pictures/w.png"})
    assert r.status_code == 200, r.text
    out = svc.execute(did, "gsettings get org.gnome.desktop.background picture-uri")["output"]
    assert out.strip() == "'file:///home/user/Pictures/w.png'"
    assert svc_terminal(svc, did) is None  # no terminal left: null, as OSWorld's server answers


def test_accessibility_tree_has_the_apps_window_and_its_text(svc):
    from lxml import etree

    did = svc.ids()[0]
    svc.post(did, "/reset", json={"task": None})
    svc.execute(did, "printf 'first line\\nthe a11y marker 42\\n' > ~/Desktop/a11y-notes.txt")
    r = svc.post(did, "/setup/launch", json={"command": ["mousepad", "/home/user/Desktop/a11y-notes.txt"]})
    assert r.status_code == 200, r.text
    st = "https://accessibility.ubuntu.example.org/ns/state"
    ns = {"st": st, "cp": "https://accessibility.ubuntu.example.org/ns/component"}
    deadline, frames, texts = time.monotonic() + 20, [], []
    while not texts and time.monotonic() < deadline:  # the window comes first, the file's text after
        r = httpx.get(f"{svc.url}/envs/{did}/accessibility", headers=svc.h, timeout=60)
        assert r.status_code == 200, r.text
        root = etree.fromstring(r.json()["AT"].encode())  # well-formed XML
        frames = root.xpath('application[@name="mousepad"]/frame[contains(@name, "a11y-notes.txt")]', namespaces=ns)
        texts = [e.text for f in frames for e in f.iter("text") if "the a11y marker 42" in (e.text or "")]
        time.sleep(0.3)
    assert root.tag == "desktop-frame" and root.get("truncated") is None
    assert len(frames) == 1, etree.tostring(root)[:2000]
    assert frames[0].get(f"{{{st}}}showing") == "true" and frames[0].xpath("@cp:screencoord", namespaces=ns)
    assert texts == ["first line\nthe a11y marker 42\n"], etree.tostring(frames[0])[-1500:]


def svc_terminal(svc, did) -> str | None:
    r = httpx.get(f"{svc.url}/envs/{did}/terminal", headers=svc.h, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["output"]


def titles(svc, did) -> str:
    return svc.execute(did, "for w in $(xdotool search --onlyvisible --name .); do xdotool getwindowname $w; done")["output"]


def test_osworlds_own_client_drives_a_desktop_on_its_port(svc):
    """desktop_env's PythonController (OSWorld's client, unchanged) against the desktop's own port,
    the token as the URL's password."""
    from desktop_env.controllers.python import PythonController

    port = svc.service.osworld_port
    bad = httpx.get(f"http://127.0.0.1:{port}/screenshot")
    assert bad.status_code == 401  # no token, no desktop
    c = PythonController(vm_ip=f"agentenv:{svc.service.token}@127.0.0.1", server_port=port)
    c.retry_times = 1
    png = c.get_screenshot()
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get_vm_screen_size() == {"width": 640, "height": 480}
    r = c.execute_python_command("pyautogui.moveTo(33, 44)")
    assert r is not None and r["returncode"] == 0, r
    assert svc.post(svc.ids()[0], "/cursor_position").json() == [33, 44]
    r = c.run_bash_script("echo hi > ~/Desktop/from-osworld.txt; echo done")
    assert r["returncode"] == 0 and r["output"].strip() == "done", r
    assert c.get_file("/home/user/Desktop/from-osworld.txt") == b"hi\n"
    tree = c.get_vm_directory_tree("/home/user/Desktop")
    assert any(ch["name"] == "from-osworld.txt" for ch in tree["children"])
    assert c.run_python_script("print(6 * 7)")["output"].strip() == "42"
    assert httpx.get(f"http://agentenv:{svc.service.token}@127.0.0.1:{port}/envs").status_code == 404
    # the accessibility tree and the terminal's text, as OSWorld's getters ask for them
    svc.post(svc.ids()[0], "/setup/launch", json={"command": ["xfce4-terminal", "--disable-server"]})
    deadline, tree = time.monotonic() + 20, ""
    while "<terminal " not in tree and time.monotonic() < deadline:
        tree = c.get_accessibility_tree() or ""
        time.sleep(0.3)
    assert tree.startswith("<desktop-frame") and "<terminal " in tree, tree[:500]
    c.execute_python_command("pyautogui.typewrite('echo from-$((6*7))-osworld\\n')")
    deadline = time.monotonic() + 10
    while "from-42-osworld" not in (c.get_terminal_output() or "") and time.monotonic() < deadline:
        time.sleep(0.3)
    out = c.get_terminal_output()
    assert "echo from-$((6*7))-osworld" in out and "from-42-osworld" in out, out


def test_osworlds_own_client_reads_files_wallpaper_desktop_path_and_records(svc, tmp_path):
    """What OSWorld's runner and getters ask of the VM beyond actions, through desktop_env's
    PythonController (unchanged) on the desktop's own port."""
    import json
    import subprocess

    from desktop_env.controllers.python import PythonController
    from PIL import Image

    port, token = svc.service.osworld_port, svc.service.token
    on_port = f"http://agentenv:{token}@127.0.0.1:{port}"
    c = PythonController(vm_ip=f"agentenv:{token}@127.0.0.1", server_port=port)
    c.retry_times, c.retry_interval = 1, 0
    assert c.get_vm_platform() == "Linux"
    assert c.get_vm_desktop_path() == "/home/user/Desktop"
    # get_file posts file_path as a form field; bytes come back as they are
    r = c.run_bash_script("printf 'a\\000b\\377' > ~/Desktop/bin.dat && echo ok")
    assert r["output"].strip() == "ok", r
    assert c.get_file("/home/user/Desktop/bin.dat") == b"a\x00b\xff"
    assert c.get_file("~/Desktop/bin.dat") == b"a\x00b\xff"
    assert c.get_file("/home/user/Desktop/missing.txt") is None
    # the wallpaper: the image file GNOME's setting names, as set by a task's change_wallpaper step
    img = tmp_path / "w.png"
    Image.new("RGB", (32, 16), (200, 30, 90)).save(img)
    r = httpx.post(f"{on_port}/setup/upload", data={"file_path": "/home/user/Pictures/w.png"},
                   files={"file_data": img.read_bytes()}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{on_port}/setup/change_wallpaper", json={"path": "~/Pictures/w.png"}).status_code == 200
    assert c.get_vm_wallpaper() == img.read_bytes()
    # a recording of the screen, as OSWorld's runner makes of every episode
    assert httpx.post(f"{on_port}/end_recording", timeout=60).status_code == 400  # none started
    c.start_recording()
    r = httpx.post(f"{on_port}/start_recording", timeout=60)
    assert r.status_code == 400 and "already" in r.json()["detail"]
    for x in range(50, 450, 100):
        c.execute_python_command(f"pyautogui.moveTo({x}, 200)")
        time.sleep(0.5)
    dest = tmp_path / "episode.mp4"
    c.end_recording(str(dest))
    data = dest.read_bytes()
    assert data[4:8] == b"ftyp", data[:16]
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                            "stream=codec_name,width,height,nb_read_frames", "-of", "json", str(dest)],
                           capture_output=True, text=True, check=True)
    stream = json.loads(probe.stdout)["streams"][0]
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("h264", 640, 480), stream
    assert int(stream["nb_read_frames"]) >= 5, stream
    assert httpx.post(f"{on_port}/end_recording", timeout=60).status_code == 400  # ended: nothing left
    # what this service does not serve says so
    r = httpx.post(f"{on_port}/setup/download_file", json={"url": "http://x", "path": "~/a"})
    assert r.status_code == 501 and "network" in r.json()["detail"]
    r = httpx.post(f"{on_port}/no_such_route")
    assert r.status_code == 404 and "/no_such_route" in r.json()["detail"] and "/execute" in r.json()["detail"]


def test_osworld_ports_follow_desktops_closed_and_created(svc):
    """Ports are slots: a closed desktop frees its port (404 there), the next desktop created takes
    it; with every port taken a new desktop has none. Last in this file: it replaces the desktop."""
    port, token = svc.service.osworld_port, svc.service.token
    on_port = f"http://agentenv:{token}@127.0.0.1:{port}"
    first = svc.ids()[0]
    assert [e["osworld_port"] for e in httpx.get(svc.url + "/envs", headers=svc.h).json()] == [port]
    assert httpx.get(f"{svc.url}/envs/{first}", headers=svc.h).json()["osworld_port"] == port
    extra = httpx.post(svc.url + "/envs", headers=svc.h, json={}, timeout=120).json()
    assert extra["osworld_port"] is None  # the service's one port is taken
    assert httpx.get(f"{svc.url}/envs/{extra['id']}", headers=svc.h).json()["osworld_port"] is None

    assert httpx.delete(f"{svc.url}/envs/{first}", headers=svc.h).status_code == 200
    r = httpx.get(f"{on_port}/platform")
    assert r.status_code == 404 and r.json()["detail"] == f"no desktop on port {port}"
    new = httpx.post(svc.url + "/envs", headers=svc.h, json={}, timeout=120).json()
    assert new["osworld_port"] == port
    by_id = {e["id"]: e["osworld_port"] for e in httpx.get(svc.url + "/envs", headers=svc.h).json()}
    assert by_id == {extra["id"]: None, new["id"]: port}
    # the port drives the new desktop, not the extra one
    r = httpx.post(f"{on_port}/execute", timeout=60,
                   json={"command": ["python", "-c", "import pyautogui; pyautogui.moveTo(71, 29)"]})
    assert r.status_code == 200, r.text
    assert svc.post(new["id"], "/cursor_position").json() == [71, 29]
    assert svc.post(extra["id"], "/cursor_position").json() != [71, 29]
    assert httpx.delete(f"{svc.url}/envs/{extra['id']}", headers=svc.h).status_code == 200
    assert httpx.get(f"{on_port}/platform").status_code == 200  # closing a desktop without a port frees none
