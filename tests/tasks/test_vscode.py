"""OSWorld's vs_code domain on a real sandboxed desktop: ``code`` (code-server shown in a Chromium app
window, agentenv/envs/sandbox_code.py) opened as OSWorld's tasks open it, scored by desktop-env's own
vscode metric through its vscode_config getter (a command typed in VS Code's palette): 0 as a no-op,
1 after a solution done with desktop actions. VS Code's server answers inside its desktop only."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest

from agentenv.envs.desktop import make_desktop
from agentenv.envs.desktop_types import DesktopSpec
from agentenv.envs.sandbox_code import PORT
from agentenv.envs.sandbox_vm import code_server_installed
from agentenv.envs.tasks.evaluate import evaluate
from agentenv.types import Action
from tests.conftest import started_desktop, wait_for
from tests.tasks.conftest import load_sample

pytestmark = pytest.mark.skipif(not code_server_installed(),
                                reason="code-server is not installed (scripts/install.sh installs it)")


@pytest.fixture(scope="module")
def desktop():
    with started_desktop("vscode-test", width=1280, height=800, sandbox=True) as d:
        yield d


def vscode_titles(d) -> list[str]:
    return [t for t in d.window_titles() if t.endswith("Visual Studio Code")]


def test_vscode_file_edited_and_scored_through_the_palette(desktop, samples, agentenv_home):
    task = load_sample(samples, "c3d9a1f4-greeting-edit")
    desktop.reset(task)  # `code /home/user/Desktop/greeting.txt`, then the window "Visual Studio Code" raised
    assert wait_for(lambda: any(t.startswith("greeting.txt") for t in vscode_titles(desktop)), timeout=60)
    active = desktop.run(["xdotool", "getactivewindow", "getwindowname"]).stdout.strip()
    assert active.endswith("Visual Studio Code")
    lo, hi = desktop.screenshot().convert("L").getextrema()
    assert hi - lo > 100  # the first screenshot shows the window drawn, not a flat colour
    greeting = desktop.home / "Desktop" / "greeting.txt"
    assert evaluate(desktop, task) == 0.0  # the getter saves (palette: File: Save All Files) what is unchanged
    assert greeting.read_text() == "Hello world\n"
    # a click in the editor's text, select all, type; the file stays unsaved: the getter saves it
    for a in (Action("click", x=desktop.width // 2, y=desktop.height // 3), Action("hotkey", keys=["ctrl", "a"]),
              Action("type", text="Hello VS Code\n")):
        assert desktop.execute(a) == {}, a
        time.sleep(0.5)
    assert wait_for(lambda: any(t.startswith("● greeting.txt") for t in vscode_titles(desktop)), timeout=10)
    assert greeting.read_text() == "Hello world\n"
    assert evaluate(desktop, task) == 1.0
    assert greeting.read_text() == "Hello VS Code\n"


def test_a_second_code_reuses_the_server_and_its_window(desktop, samples, agentenv_home):
    task = load_sample(samples, "c3d9a1f4-greeting-edit")
    desktop.reset(task)
    assert wait_for(lambda: vscode_titles(desktop), timeout=60)
    servers = lambda: desktop.run(["pgrep", "-f", "code-server/app/out/node/entry.js"]).stdout.split()  # noqa: E731
    first = servers()
    assert len(first) == 1
    (desktop.home / "notes.md").write_text("# notes\n")
    r = desktop.run(["code", "/home/user/notes.md"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: any(t.startswith("notes.md") for t in vscode_titles(desktop)), timeout=30)
    assert len(vscode_titles(desktop)) == 1 and servers() == first  # same window, same server
    # settings land where OSWorld's metrics read them, extensions where its VM keeps them
    assert (desktop.home / ".config" / "Code" / "User").is_dir() and (desktop.home / ".vscode" / "extensions").is_dir()
    listed = desktop.run(["code", "--list-extensions"], timeout=60)
    assert listed.returncode == 0 and listed.stdout.strip() == "", listed.stderr


def test_vscode_server_answers_inside_its_desktop_only(desktop, samples, agentenv_home):
    task = load_sample(samples, "c3d9a1f4-greeting-edit")
    desktop.reset(task)
    assert wait_for(lambda: vscode_titles(desktop), timeout=60)
    health = f"http://127.0.0.1:{PORT}/healthz"
    assert '"status"' in desktop.run(["curl", "-s", "-m", "3", health]).stdout
    try:  # not from the host: nothing there answers as code-server
        body = urllib.request.urlopen(health, timeout=3).read()
    except OSError:
        body = b""
    assert b'"status"' not in body
    other = make_desktop(f"vscode-test-other-{os.getpid()}", DesktopSpec(width=640, height=480, sandbox=True)).start()
    try:  # nor from another sandboxed desktop, while this one's VS Code runs
        r = other.run(["curl", "-sS", "-m", "3", health])
        assert r.returncode != 0 and '"status"' not in r.stdout
    finally:
        other.close()


def test_code_refuses_to_serve_on_the_hosts_network(agentenv_home):
    with started_desktop("vscode-test-net", width=640, height=480, sandbox=True, network=True) as d:
        r = d.run(["code", "/home/user"], timeout=60)
        assert r.returncode != 0 and "shares the host's network" in r.stderr
        assert d.run(["pgrep", "-f", "code-server/app/out/node/entry.js"]).returncode != 0  # no server
