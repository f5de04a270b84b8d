"""Chrome as OSWorld drives it, on real sandboxed desktops with the Debian Chromium: an OSWorld-format
task of our own (tests/tasks/chrome_samples) launches ``google-chrome --remote-debugging-port=1337``
and a ``socat`` forward, opens its tabs through the DevTools protocol (``chrome_open_tabs``), and is
scored by desktop-env's own getters (``bookmarks`` from the profile, ``open_tabs_info`` over CDP) and
metrics. The DevTools port is reachable inside the desktop only."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from agentenv.envs.tasks import cdp, load_task_file
from agentenv.envs.tasks.check import check_tasks
from agentenv.envs.tasks.evaluate import evaluate
from agentenv.envs.tasks.setup import TaskSetupError
from agentenv.envs.desktop import make_desktop
from agentenv.envs.desktop_types import DesktopSpec
from agentenv.types import Action, Task
from tests.conftest import wait_for
from tests.tasks.conftest import SAMPLE_BASE

CHROME_SAMPLES = Path(__file__).parent / "chrome_samples"
TASK_ID = "c4b8e2a6-bookmark-shopping"
SHOPPING = "file:///home/user/Documents/shopping.html"
# Inside a desktop: the DevTools port's version document, or the error.
PROBE = ("import sys, urllib.request\n"
         "try:\n"
         "    print(urllib.request.urlopen('http://127.0.0.1:%d/json/version', timeout=3).read().decode())\n"
         "except Exception as e:\n"
         "    print('UNREACHABLE', type(e).__name__, e)\n")


@pytest.fixture(scope="module")
def desktops():
    spec = DesktopSpec(width=1280, height=800, sandbox=True)
    a = make_desktop(f"chrome-a-{os.getpid()}", spec).start()
    b = make_desktop(f"chrome-b-{os.getpid()}", spec)
    try:
        b.start()
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def chrome_task(tmp_path, file_server, agentenv_home) -> Task:
    for f in (CHROME_SAMPLES / "files").iterdir():  # served by the test's own HTTP server
        shutil.copy(f, file_server.root / f.name)
    src = CHROME_SAMPLES / "chrome" / f"{TASK_ID}.json"
    dest = tmp_path / "chrome_samples" / "chrome" / src.name
    dest.parent.mkdir(parents=True)
    dest.write_text(src.read_text().replace(SAMPLE_BASE, file_server.base))
    return load_task_file(dest)[0]


def act(d, *actions: Action, settle: float = 0.4) -> None:
    import time

    for a in actions:
        assert d.execute(a) == {}, a
        time.sleep(settle)


def bookmark_bar(d) -> list[str]:
    f = d.home / ".config" / "google-chrome" / "Default" / "Bookmarks"
    try:
        roots = json.loads(f.read_text())["roots"]
    except (OSError, ValueError, KeyError):
        return []
    return [c.get("url") for c in roots["bookmark_bar"]["children"]]


def probe(d, port: int) -> str:
    return d.run(["python3", "-c", PROBE % port], timeout=20).stdout


def test_noop_scores_0_and_a_keyboard_solution_scores_1(desktops, chrome_task):
    d, _ = desktops
    d.reset(chrome_task)  # google-chrome + socat launched, two tabs opened over CDP, window activated
    assert (d.home / ".config" / "google-chrome" / "Default").is_dir()  # Chrome's profile path
    assert wait_for(lambda: "Shopping List" in d.active_window_title(), 20)
    assert evaluate(d, chrome_task) == 0.0

    # The bookmark bubble (Ctrl+D): its folder box one up from "Other bookmarks" is the bookmarks bar;
    # back on the name field, Enter is Done. Then the first tab (Ctrl+1) is closed (Ctrl+W).
    act(d, Action("hotkey", keys=["ctrl", "d"]), settle=1.5)
    act(d, Action("key", keys=["tab"]), Action("key", keys=["up"]), Action("hotkey", keys=["shift", "tab"]),
        Action("key", keys=["enter"]))
    assert wait_for(lambda: bookmark_bar(d) == [SHOPPING], 20), bookmark_bar(d)
    act(d, Action("hotkey", keys=["ctrl", "1"]))
    assert wait_for(lambda: "Weekend Recipes" in d.active_window_title(), 10), d.active_window_title()
    act(d, Action("hotkey", keys=["ctrl", "w"]))
    assert wait_for(lambda: "Shopping List" in d.active_window_title(), 10), d.active_window_title()
    assert evaluate(d, chrome_task) == 1.0

    # The same task with the tab left open fails desktop-env's is_expected_tabs (read over CDP).
    act(d, Action("hotkey", keys=["ctrl", "shift", "t"]))  # reopens the closed tab
    assert wait_for(lambda: "Weekend Recipes" in d.active_window_title(), 10)
    assert evaluate(d, chrome_task) == 0.0


def test_the_devtools_port_is_reachable_inside_its_desktop_only(desktops, chrome_task, monkeypatch, tmp_path):
    a, b = desktops
    a.reset(chrome_task)
    for port in (1337, 9222):  # Chrome's own port and the socat forward, as in OSWorld's VM
        assert wait_for(lambda: '"Browser"' in probe(a, port), 20), probe(a, port)
        assert "UNREACHABLE" in probe(b, port)  # another desktop: its own network, nothing there
        with socket.socket() as s:  # the host (this service's network): nothing there either
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", port)) != 0
    # chrome_close_tabs (a setup step of OSWorld's) closes the tab showing its URL, over the same port.
    from agentenv.envs.tasks.chrome_getters import run_getter
    from agentenv.envs.tasks.getters import EvalContext
    from agentenv.envs.tasks.setup import run_steps

    run_steps(a, chrome_task, [{"type": "chrome_close_tabs", "parameters": {
        "urls_to_close": ["file:///home/user/Documents/recipes.html"]}}], "config")
    tabs = run_getter(EvalContext(a, chrome_task, tmp_path), "open_tabs_info", {})
    assert [t["url"] for t in tabs] == [SHOPPING], tabs
    # A Chromium started without the port: setup's chrome_open_tabs says so, naming the port.
    no_chrome = Task(id="no-port", instruction="x", extra={"snapshot": "chrome"},
                     config=[{"type": "launch", "parameters": {"command": ["chromium"]}},
                             {"type": "chrome_open_tabs", "parameters": {"urls_to_open": [SHOPPING]}}])
    monkeypatch.setattr(cdp, "CONNECT_WAIT_S", 3.0)
    with pytest.raises(TaskSetupError, match="1337"):
        b.reset(no_chrome)


def test_a_task_opening_live_pages_needs_the_operators_network(desktops):
    _, b = desktops
    live = Task(id="live", instruction="x", extra={"snapshot": "chrome"},
                config=[{"type": "launch", "parameters": {"command": ["google-chrome", "--remote-debugging-port=1337"]}},
                        {"type": "chrome_open_tabs", "parameters": {"urls_to_open": ["https://www.example.org/"]}}])
    with pytest.raises(TaskSetupError, match="sandbox_network"):
        b.reset(live)
    assert b.window_titles() == []  # refused before anything started


def test_tasks_check_says_the_chrome_task_runs_on_sandboxed_desktops(chrome_task, agentenv_home):
    folder = Path(chrome_task.source).parent.parent
    sandboxed = {r.id: r for r in check_tasks(folder, osworld_like=True)}[TASK_ID]
    assert sandboxed.status == "needs_fetch", sandboxed.missing  # only its two pages to download
    plain = {r.id: r for r in check_tasks(folder, osworld_like=False)}[TASK_ID]
    assert plain.status == "missing"
    assert any("DevTools port" in m for m in plain.missing), plain.missing


def test_with_the_operators_network_a_live_task_runs_and_reads_its_own_chrome(tmp_path):
    """env.sandbox_network: the desktop shares the host's network, so the live task's setup runs
    (this machine reaches no website: the page fails to load, which OSWorld's setup logs and passes);
    the getters read the Chrome of this desktop, found by the listening socket's owner."""
    from agentenv.envs.tasks.chrome_getters import run_getter
    from agentenv.envs.tasks.getters import EvalContext

    with socket.socket() as s:  # the host's port must be free for the shared-network desktop
        if s.connect_ex(("127.0.0.1", cdp.CDP_PORT)) == 0:
            pytest.skip(f"something on this host listens on {cdp.CDP_PORT}")
    d = make_desktop(f"chrome-net-{os.getpid()}", DesktopSpec(width=1280, height=800, sandbox=True, network=True))
    try:
        d.start()
        live = Task(id="live-net", instruction="x", extra={"snapshot": "chrome"}, config=[
            {"type": "execute", "parameters": {"command": "echo '<title>Local</title>' > /home/user/local.html",
                                               "shell": True}},
            {"type": "launch", "parameters": {"command": ["google-chrome", "--remote-debugging-port=1337"]}},
            {"type": "chrome_open_tabs", "parameters": {"urls_to_open": ["file:///home/user/local.html",
                                                                         "https://www.example.org/"]}}])
        d.reset(live)
        tabs = run_getter(EvalContext(d, live, tmp_path), "open_tabs_info", {})
        assert {"title": "Local", "url": "file:///home/user/local.html"} in tabs, tabs
        assert len(tabs) == 2, tabs  # and the live page's tab (its error page here)
    finally:
        d.close()
