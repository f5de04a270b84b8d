"""From inside a sandboxed desktop (commands through OSWorld's /execute route, as a task file or an
agent sends them), nothing of the host is reachable; and inside, it behaves like OSWorld's VM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agentenv.envs.desktop_types import DESKTOP_USER

from .conftest import start_service

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COLLECTED = time.time()  # before any service (and its token) of this module exists


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    s = start_service(tmp_path_factory, sandbox=True, num=2)
    yield s
    s.service.stop()


@pytest.fixture(scope="module")
def did(svc):
    return svc.ids()[0]


def sh(svc, did, cmd, timeout=30) -> tuple[int, str]:
    r = svc.execute(did, cmd, timeout)
    return r["returncode"], r["output"] + r["error"]


def test_host_files_are_out_of_reach(svc, did, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-7731")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)  # readable by any host user: only the mount namespace keeps it out
    for path in (secret, ROOT / "agentenv" / "envs" / "service" / "app.py", Path("/root"), svc.service.log):
        rc, out = sh(svc, did, f"cat {path} || ls {path}")
        assert rc != 0 and "host-secret" not in out and "FastAPI" not in out, (path, out)
    # the service's token: not in any environment, file or command line visible inside
    rc, out = sh(svc, did, "cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'; env")
    assert svc.service.token not in out and "ENV_TOKEN" not in out
    # Every file visible inside, searched for it: a file holding the token was written after the token
    # was made (after this module was collected), and a write sets the file's ctime, which no user can
    # set back; so only files changed since then are read (grep -r over all of / reads the 7+ GB of /usr).
    # A probe file written inside now shows that the search reads what it should.
    probe, mark = f"/tmp/probe-{os.urandom(4).hex()}", os.urandom(8).hex()
    rc, out = sh(svc, did, f"printf %s {mark[:8]} > {probe}; printf %s {mark[8:]} >> {probe}; "
                           f"find / \\( -path /proc -o -path /sys \\) -prune -o -type f -newerct @{int(COLLECTED) - 2} "
                           f"-print0 2>/dev/null | xargs -0 -r grep -slF -e '{svc.service.token}' -e {mark} | head -3",
                 timeout=60)
    assert out.split() == [probe], out
    rc, out = sh(svc, did, "cat /etc/shadow")
    assert rc != 0 and "root:" not in out


def test_writes_outside_land_nowhere_on_the_host(svc, did):
    marker = f"agentenv-escape-{os.urandom(4).hex()}"
    rc, out = sh(svc, did, f"echo password | sudo -S mkdir /{marker}; echo x > /tmp/{marker}; "
                           f"echo password | sudo -S sh -c 'echo x > /etc/{marker}; echo x > /usr/{marker}'; "
                           f"echo x > /var/{marker}; ls -d /{marker}")
    assert f"/{marker}" in out  # made inside the sandbox's own root...
    for p in (f"/{marker}", f"/tmp/{marker}", f"/etc/{marker}", f"/usr/{marker}", f"/var/{marker}"):
        assert not Path(p).exists(), p  # ...never on the host
    rc, out = sh(svc, did, "echo password | sudo -S rm -rf /etc/hostname /usr/bin/ls; ls /etc/hostname /usr/bin/ls")
    assert "Read-only file system" in out and "/usr/bin/ls" in out  # /usr is the host's, read-only...
    assert "No such file" in out and Path("/etc/hostname").exists()  # ...and /etc the sandbox's copy
    assert svc.post(did, "/reset", json={"task": None}).status_code == 200
    rc, out = sh(svc, did, f"cat /etc/hostname; ls /{marker} /etc/{marker} /var/{marker}")
    assert out.startswith(Path("/etc/hostname").read_text()) and out.count("No such file") == 3, out


def test_host_processes_cannot_be_signalled_or_seen(svc, did):
    victim = subprocess.Popen(["sleep", "300"])
    try:
        rc, out = sh(svc, did, f"kill -9 {victim.pid}; echo password | sudo -S kill -9 {victim.pid}; "
                               f"ls /proc/{victim.pid}")
        assert victim.poll() is None, "a host process was killed from inside the sandbox"
        rc, out = sh(svc, did, "ps -e -o pid=,comm=")
        comms = [line.split(None, 1)[1] for line in out.strip().splitlines()]
        assert "sleep" not in comms and not any("uvicorn" in c or "pytest" in c for c in comms), comms
        assert {"Xvfb", "openbox"} <= set(comms) and len(comms) < 20, comms
    finally:
        victim.kill()
        victim.wait()


def test_no_network_to_the_host_loopback(svc, did):
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    accepted: list[object] = []

    def serve() -> None:
        srv.settimeout(8)
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=serve)
    t.start()
    try:
        svc_port = svc.url.rsplit(":", 1)[1]
        code = ("import socket,sys\n"
                "for p in sys.argv[1:]:\n"
                "    try:\n"
                "        socket.create_connection(('127.0.0.1', int(p)), 3); print('CONNECTED', p)\n"
                "    except OSError as e: print('refused', p, e)\n")
        rc, out = sh(svc, did, f"python3 -c \"{code}\" {port} {svc_port}; curl -s -m 3 {svc.url}/health; echo rc=$?")
        assert "CONNECTED" not in out and '"status"' not in out, out
        assert "refused" in out
        # and the host itself can reach its server (the test is not vacuous)
        socket.create_connection(("127.0.0.1", port), 3).close()
    finally:
        t.join()
        srv.close()
    assert len(accepted) == 1  # the host's own connection only


def test_another_desktop_is_out_of_reach(svc):
    a, b = svc.ids()[:2]
    envs = {e["id"]: e for e in __import__("httpx").get(svc.url + "/envs", headers=svc.h).json()}
    other = envs[b]["display"]
    rc, out = sh(svc, a, f"ls /tmp/.X11-unix; DISPLAY={other} xdotool getmouselocation; echo rc=$?")
    assert "rc=1" in out and "x:" not in out, out
    assert f"X{other.lstrip(':')}" not in out.split("rc=")[0].split()
    rc, out = sh(svc, a, "xdotool getmouselocation")  # its own display works
    assert rc == 0 and "x:" in out
    # Both run as the same host uid: only the namespaces keep B's files and processes from A.
    tag = os.urandom(4).hex()
    marker = f"desktop-b-{tag}"
    rc, out = sh(svc, b, f"echo {marker} > ~/b.txt; echo {marker} > /tmp/b.txt; cat ~/b.txt /tmp/b.txt")
    assert out.count(marker) == 2, out  # B has both: a search from A could find them if it could look
    # the marker put together in the shell, so A's own command line does not hold it
    rc, out = sh(svc, a, f"m=desktop-b-; m=$m{tag}; grep -rslF $m / --exclude-dir=proc --exclude-dir=sys | head -3; "
                         "ps -eo args", timeout=60)
    assert marker not in out and f"Xvfb {other} " not in out, out  # nor B's X server among A's processes
    assert f"Xvfb {envs[a]['display']} " in out, out  # A's own is there: ps does list X servers


def test_symlink_typed_by_the_agent_reads_nothing(svc, did):
    sh(svc, did, "ln -sf /etc/shadow ~/x")
    assert svc.post(did, "/file", data={"file_path": "~/x"}).status_code == 403


def test_looks_like_osworlds_vm_inside(svc, did):
    rc, out = sh(svc, did, "whoami; echo $HOME; ls -d ~/Desktop; id -u; hostname >/dev/null; "
                           "echo password | sudo -S whoami; python --version; which xdg-settings gsettings")
    lines = out.split()
    assert lines[:4] == ["user", "/home/user", "/home/user/Desktop", "1000"], out
    assert "root" in lines and "Python" in out and "xdg-settings" in out
    rc, out = sh(svc, did, "echo password | sudo -S -u user id -u; echo password | sudo -S -u nobody id -u")
    assert out.split()[0] == "1000" and "unknown user nobody" in out, out  # stdout first, then stderr
    rc, out = sh(svc, did, "echo wrong | sudo -S id -u")
    assert rc != 0 and "incorrect password" in out
    # root inside only: what sudo makes is the desktop user's on the host
    rc, out = sh(svc, did, "echo password | sudo -S touch ~/by-root && stat -c %u ~/by-root")
    assert rc == 0 and out.split()[0] == "1000", out  # root of the nested namespace is the user outside it
    home = Path(f"/tmp/agentenv-desktops/{did}/homes/user/by-root")
    if os.geteuid() == 0:
        import pwd

        assert home.stat().st_uid == pwd.getpwnam(DESKTOP_USER).pw_uid != 0


def test_pyautogui_gsettings_and_reset(svc, did):
    rc, out = sh(svc, did, "python -c \"import pyautogui; pyautogui.FAILSAFE=False; pyautogui.click(10, 10); "
                           "pyautogui.moveTo(123, 45); print(pyautogui.position())\"")
    assert rc == 0 and "Point(x=123, y=45)" in out, out
    assert svc.post(did, "/cursor_position").json() == [123, 45]  # the desktop's own display
    key = "org.gnome.desktop.interface gtk-theme"
    rc, out = sh(svc, did, f"gsettings set {key} Adwaita-dark && gsettings get {key}")
    assert rc == 0 and out.strip() == "'Adwaita-dark'", out
    rc, out = sh(svc, did, "pactl set-sink-volume @DEFAULT_SINK@ 40% && pactl get-sink-volume @DEFAULT_SINK@")
    assert rc == 0 and "40%" in out, out
    sh(svc, did, "echo password | sudo -S mkdir /test; mkdir -p /tmp/left ~/Documents/left /dev/shm/left; "
                 "echo password | sudo -S mkdir /home/intruder; (sleep 600 &)")
    assert sh(svc, did, "[ -d /test ] && echo yes")[1].strip() == "yes"
    r = svc.post(did, "/reset", json={"task": None})
    assert r.status_code == 200, r.text
    rc, out = sh(svc, did, f"ls -d /test /tmp/left ~/Documents/left /home/intruder /dev/shm/left; pgrep -x sleep; "
                           f"gsettings get {key}")
    assert out.count("No such file") == 5, out
    assert "Adwaita-dark" not in out
    rc, out = sh(svc, did, "pactl get-sink-volume @DEFAULT_SINK@")
    assert rc == 0 and "50%" in out, out  # a fresh sound server, at the VM's volume (not 100 %)
    assert not any(line.strip().isdigit() for line in out.splitlines()), out  # the sleep is gone


def test_ctrl_alt_t_opens_a_terminal(svc, did):
    svc.post(did, "/reset", json={"task": None})
    r = svc.post(did, "/step", json={"action": {"type": "hotkey", "keys": ["ctrl", "alt", "t"]}, "screenshot": False})
    assert r.status_code == 200 and "error" not in r.json()["info"], r.text
    # GNOME Terminal, as on OSWorld's VM
    rc, out = sh(svc, did, "for i in $(seq 50); do xdotool search --class Gnome-terminal >/dev/null && break; "
                           "sleep 0.2; done; xdotool search --class Gnome-terminal | head -1")
    assert out.strip().isdigit(), out


def test_network_only_when_the_operator_allows_it():
    from agentenv.envs.desktop import make_desktop
    from agentenv.envs.desktop_types import DesktopSpec

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), 3); print('CONNECTED')"
    try:
        for network in (False, True):
            d = make_desktop(f"net-{network}-{os.urandom(2).hex()}",
                             DesktopSpec(width=320, height=240, sandbox=True, network=network)).start()
            try:
                r = d.run(["python3", "-c", code], timeout=20)
            finally:
                d.close()
            assert ("CONNECTED" in r.stdout) == network, (network, r.stdout, r.stderr)
    finally:
        srv.close()


FAKE_RUNNER = r"""
import json, os, socket
os.unlink('/run/agentenv/runner.sock')
s = socket.socket(socket.AF_UNIX)
s.bind('/run/agentenv/runner.sock')
s.listen(8)
while True:
    c, _ = s.accept()
    c.makefile().readline()
    body = json.dumps({'ok': True, 'returncode': 0, 'stdout': 'FAKE', 'stderr': '', 'timed_out': False})
    c.sendall((json.dumps({'body': body, 'mac': '0' * 64}) + '\n').encode())
    c.close()
"""


def test_a_fake_runner_cannot_answer_for_the_sandbox():
    """Evaluator commands run through the runner: something inside that takes its socket's place
    (same uid) must not be able to answer for it; the desktop is dead instead."""
    from agentenv.envs.desktop import make_desktop
    from agentenv.envs.desktop_types import DesktopError, DesktopSpec

    d = make_desktop(f"fake-{os.urandom(2).hex()}", DesktopSpec(width=320, height=240, sandbox=True)).start()
    try:
        assert d.run("echo real", shell=True).stdout.strip() == "real" and d.alive()
        r = d.run(["python3", "-c", "import os; print(os.readlink('/proc/2/fd/0'))"])
        assert r.returncode != 0  # the runner is not dumpable: its descriptors are not the user's to read
        r = d.run(["python3", "-c", "print(open('/proc/2/mem', 'rb').read(1))"])
        assert r.returncode != 0 and "Permission denied" in r.stderr
        d.run(f"nohup python3 -c \"{FAKE_RUNNER}\" >/dev/null 2>&1 &", shell=True)
        for _ in range(50):
            try:
                d.run("true")
            except DesktopError as e:
                assert "not the runner's" in str(e)
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the fake runner was never asked")
        assert not d.alive()
    finally:
        d.close()


def test_a_missing_bwrap_is_named(monkeypatch):
    from agentenv.envs import sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxError, match="bubblewrap.*--no-sandbox"):
        sandbox.check_sandbox()
    r = subprocess.run([sys.executable, "-m", "agentenv", "serve-envs", "--num", "0", "--port", "1", "--token", "x"],
                       env={**os.environ, "PATH": "/nonexistent", "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "bubblewrap" in r.stderr, r.stderr[-500:]
