"""OSWorld-format tasks (our own samples, tests/tasks/samples) on a real desktop: the setup runs
(downloads through the cache from a local HTTP server, ``sudo -S``, ``python -c "import pyautogui"``,
``/home/user`` paths), a no-op scores 0, a solution done through desktop actions scores 1, and
``evaluator.postconfig`` saves the file before it is scored."""

from __future__ import annotations

import json
import os
import time

import pytest
from PIL import ImageChops

from agentenv.envs.tasks.evaluate import evaluate
from agentenv.envs.tasks.setup import TaskSetupError
from agentenv.envs.desktop import Desktop, blank_below_title, frames_differ, make_desktop
from agentenv.envs.desktop_types import DesktopSpec
from agentenv.types import Action, Task
from tests.conftest import wait_for
from tests.tasks.conftest import load_sample


@pytest.fixture(scope="module", params=["sandboxed", "plain"])
def desktop(request):
    # Both kinds: the sandbox (the default) runs task commands as OSWorld writes them, the plain one
    # rewrites them. The default scratch folder: the desktop user must reach its HOME (pytest's tmp
    # is root's, 700).
    spec = DesktopSpec(width=1280, height=800, sandbox=request.param == "sandboxed")
    d = make_desktop(f"tasks-test-{request.param}-{os.getpid()}", spec).start()
    try:
        yield d
    finally:
        d.close()


def act(d: Desktop, *actions: Action, settle: float = 0.4) -> None:
    for a in actions:
        assert d.execute(a) == {}, a
    time.sleep(settle)


def test_sudo_python_and_home_user_setup_then_vm_command_line(desktop, samples, agentenv_home):
    task = load_sample(samples, "b7d2e9a4-sudo-project")
    desktop.reset(task)  # echo password | sudo -S mkdir /home/user/..., python -c "import pyautogui...", a terminal
    assert (desktop.home / "Desktop" / "project").is_dir()
    assert evaluate(desktop, task) == 0.0
    act(desktop, Action("type", text="touch ~/Desktop/project/README.md\n"))
    assert wait_for(lambda: (desktop.home / "Desktop" / "project" / "README.md").exists())
    assert evaluate(desktop, task) == 1.0


def test_terminal_output_is_read_from_the_terminal(desktop, samples, agentenv_home):
    task = load_sample(samples, "c3e81f05-terminal-product")
    desktop.reset(task)
    assert evaluate(desktop, task) == 0.0
    act(desktop, Action("type", text="echo $((6*9))\n"), settle=1.0)
    if desktop.sandboxed:  # read over AT-SPI (the VTE widget's text), not from the clipboard
        assert wait_for(lambda: "54" in desktop.terminal_output())
        assert "echo $((6*9))" in desktop.terminal_output()
    else:
        assert desktop.terminal_output() is None
    assert evaluate(desktop, task) == 1.0
    if desktop.sandboxed:
        assert "echo" not in desktop.clipboard()  # scored from AT-SPI: no select-all and copy
        # a tree past its bounds is cut and says so, never a hang
        from agentenv.envs.desktop_types import A11yLimits
        from lxml import etree

        cut = etree.fromstring(desktop.accessibility_tree(A11yLimits(max_nodes=3)).encode())
        assert cut.get("truncated") == "nodes" and len(list(cut.iter())) == 1 + 3
        full = etree.fromstring(desktop.accessibility_tree().encode())
        assert full.get("truncated") is None and full.xpath("//terminal")
        # OSWorld's accessibility_tree getter and check_accessibility_tree, CSS selectors as its tasks write them
        def a11y(selector: str) -> Task:
            return Task(id="a11y", instruction="-", extra={"snapshot": "os"}, evaluator={
                "func": "check_accessibility_tree", "result": {"type": "accessibility_tree"},
                "expected": {"type": "rule", "rules": [{"selectors": [selector]}]}})

        assert evaluate(desktop, a11y("application[name=xfce4-terminal] frame[st|active=true] terminal")) == 1.0
        assert evaluate(desktop, a11y("application[name=mousepad]")) == 0.0  # not open


def test_postconfig_saves_the_file_before_it_is_scored(desktop, samples, file_server, agentenv_home):
    task = load_sample(samples, "f61b2d7e-notes-append")
    desktop.reset(task)  # notes.txt downloaded through the cache, opened in the editor
    assert (desktop.home / "notes.txt").read_text() == "meeting at noon\n"
    assert evaluate(desktop, task) == 0.0  # postconfig saved an unchanged file; the gold was fetched
    act(desktop, Action("hotkey", keys=["ctrl", "End"]), Action("type", text="bring the report\n"))
    assert (desktop.home / "notes.txt").read_text() == "meeting at noon\n"  # typed, not saved yet
    assert evaluate(desktop, task) == 1.0  # postconfig pressed ctrl+s (through the allow-list)
    assert file_server.hits.count("/notes.txt") == 1 and file_server.hits.count("/notes_gold.txt") == 1
    desktop.reset(task)  # the second reset reads the cache: nothing fetched again
    assert file_server.hits.count("/notes.txt") == 1


def test_calc_task_scored_by_compare_table_against_a_served_gold_file(desktop, samples, agentenv_home):
    task = load_sample(samples, "a1f0c6e2-sales-total")
    desktop.reset(task)  # sales.xlsx downloaded to /home/user/Desktop and opened in LibreOffice Calc
    assert any("sales.xlsx" in t for t in desktop.window_titles())
    assert evaluate(desktop, task) == 0.0  # postconfig: ctrl+s, Enter (keep the format); B5 is empty
    # the Name Box (top left), as a user would: go to B5, type the total
    act(desktop, Action("click", x=60, y=107), Action("hotkey", keys=["ctrl", "a"]), Action("type", text="B5\n"))
    act(desktop, Action("type", text="60\n"))
    assert evaluate(desktop, task) == 1.0
    import openpyxl

    assert openpyxl.load_workbook(desktop.home / "Desktop" / "sales.xlsx")["Sales"]["B5"].value == 60


def test_vscode_task_names_the_missing_app_and_its_metric_scores_files(desktop, samples, agentenv_home):
    from agentenv.envs.sandbox_vm import code_server_installed

    task = load_sample(samples, "e5f2c8d3-font-size")
    if not (desktop.sandboxed and code_server_installed()):  # else it runs: tests/tasks/test_vscode.py
        with pytest.raises(TaskSetupError, match="'code'.*not installed"):
            desktop.reset(task)
    bare = Task.from_dict({**task.to_dict(), "config": []})  # the metric alone, on files written directly
    desktop.reset(bare)
    assert evaluate(desktop, bare) == 0.0  # no settings file
    settings = desktop.home / ".config" / "Code" / "User" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"editor.fontSize": 14}))
    assert evaluate(desktop, bare) == 0.0
    settings.write_text(json.dumps({"editor.fontSize": 16, "workbench.colorTheme": "Default Dark+"}))
    assert evaluate(desktop, bare) == 1.0


def test_infeasible_task_scores_only_giving_up(desktop, samples, agentenv_home):
    task = load_sample(samples, "d90a7b11-infeasible-kernel")
    desktop.reset(task)
    assert evaluate(desktop, task, None) == 0.0
    assert evaluate(desktop, task, "finished") == 0.0
    assert evaluate(desktop, task, "call_user") == 1.0


def test_pyautogui_setup_code_goes_through_the_allow_list(desktop, agentenv_home):
    marker = desktop.home / "ran.txt"
    bad = Task(id="bad", instruction="-", extra={"snapshot": "os"}, config=[
        {"type": "execute", "parameters": {"command": ["python", "-c",
                                                       "import pyautogui, os; os.system('touch ~/ran.txt')"]}}])
    if desktop.sandboxed:  # as in OSWorld's VM it runs as code, inside the sandbox only
        desktop.reset(bad)
        assert marker.exists()
        desktop.reset(Task(id="clean", instruction="-"))
        assert not marker.exists()
        return
    with pytest.raises(TaskSetupError, match="refused pyautogui code"):
        desktop.reset(bad)
    assert not marker.exists()
    typed = Task(id="typed", instruction="-", extra={"snapshot": "os"}, config=[
        {"type": "launch", "parameters": {"command": ["xfce4-terminal", "--disable-server"]}},
        {"type": "execute", "parameters": {"command": "python -c \"import pyautogui; "
                                                      "pyautogui.typewrite('touch ~/ran.txt'); pyautogui.press('enter')\""}}])
    desktop.reset(typed)  # the same code, as actions: typed into the terminal, which runs it
    assert wait_for(lambda: marker.exists())


def test_the_first_screenshot_of_a_task_is_painted_and_settled(desktop, agentenv_home):
    # A task opening LibreOffice Calc once gave the agent a first screenshot of Calc's frame with
    # nothing drawn inside (the window existed, its cells were not painted yet): a reset ends only
    # once the screen has settled.
    task = Task(id="calc-first-frame", instruction="-", config=[
        {"type": "launch", "parameters": {"command": ["spreadsheet"]}}])
    desktop.reset(task)
    first = desktop.screenshot()
    assert not blank_below_title(first)
    w, h = first.size
    cells = (w // 4, h // 2, 3 * w // 4, 3 * h // 4)
    assert len(first.crop(cells).getcolors(1 << 24)) >= 2  # cells and their grid lines, not an empty frame
    time.sleep(3)
    later = desktop.screenshot()
    # The cells were drawn when the reset ended, not midway (the sidebar or the status bar may still
    # be updated by LibreOffice's idle handlers: those are not what the agent was missing).
    assert not frames_differ(first.crop(cells), later.crop(cells)), ImageChops.difference(first, later).getbbox()


def test_list_directory_and_close_window(desktop, agentenv_home):
    task = Task(id="photos", instruction="Copy b.jpg next to a.jpg in ~/Desktop/photos.", extra={"snapshot": "os"},
                config=[{"type": "execute", "parameters": {
                    "command": "mkdir -p /home/user/Desktop/photos /home/user/in && touch /home/user/Desktop/photos/a.jpg "
                               "/home/user/in/b.jpg", "shell": True}},
                        {"type": "launch", "parameters": {"command": ["xfce4-terminal", "--disable-server"]}}],
                evaluator={"func": "check_moved_jpgs",
                           "result": {"type": "list_directory", "path": "/home/user/Desktop/photos"},
                           "expected": {"type": "rule", "rules": {"expected": ["a.jpg", "b.jpg"]}}})
    desktop.reset(task)
    assert evaluate(desktop, task) == 0.0
    act(desktop, Action("type", text="cp ~/in/b.jpg ~/Desktop/photos/\n"))
    assert wait_for(lambda: (desktop.home / "Desktop" / "photos" / "b.jpg").exists())
    assert evaluate(desktop, task) == 1.0
    closing = Task(id="close", instruction="-", extra={"snapshot": "os"}, config=[
        {"type": "launch", "parameters": {"command": ["mousepad"]}},
        {"type": "close_window", "parameters": {"window_name": "Mousepad"}}])
    desktop.reset(closing)
    assert wait_for(lambda: not any("Mousepad" in t for t in desktop.window_titles()))


def test_osworld_task_over_the_env_service(env_service, samples):
    """The same sample through HTTP: the task's snapshot travels with it, so the service scores it
    as OSWorld does (vm_command_line output compared exactly)."""
    import asyncio

    from agentenv.envs.client import AsyncEnvClient

    task = load_sample(samples, "b7d2e9a4-sudo-project")

    async def go() -> tuple[float, float]:
        client = AsyncEnvClient(env_service.url, env_service.token)
        try:
            env_id = (await client.list())[0].id
            await client.reset(env_id, task)
            idle = await client.evaluate(env_id, task, None)
            await client.step(env_id, Action("type", text="touch ~/Desktop/project/README.md\n"))
            await asyncio.sleep(1.0)
            return idle, await client.evaluate(env_id, task, None)
        finally:
            await client.aclose()

    assert asyncio.run(go()) == (0.0, 1.0)


def test_writer_task_scored_by_compare_docx_files_against_a_served_gold_file(desktop, samples, agentenv_home):
    if not desktop.sandboxed:
        pytest.skip("Writer runs the same on both kinds; once is enough for the suite's time")
    import docx

    task = load_sample(samples, "a7c4d1e9-title-case")
    desktop.reset(task)  # report.docx downloaded to /home/user/Desktop and opened in LibreOffice Writer
    assert any("report.docx" in t and "Writer" in t for t in desktop.window_titles()), desktop.window_titles()
    assert evaluate(desktop, task) == 0.0  # its first paragraph still reads 'quarterly report'
    report = desktop.home / "Desktop" / "report.docx"
    # as a user would: select the first paragraph, type over it, save keeping the Word format
    act(desktop, Action("hotkey", keys=["ctrl", "Home"]), Action("hotkey", keys=["shift", "End"]),
        Action("type", text="Quarterly Report"))
    act(desktop, Action("hotkey", keys=["ctrl", "s"]), settle=1.5)
    act(desktop, Action("key", keys=["Return"]))  # "Use Word 2007-365!", the dialog's default

    def first_paragraph() -> str | None:
        try:
            return docx.Document(report).paragraphs[0].text
        except Exception:  # being written
            return None

    assert wait_for(lambda: first_paragraph() == "Quarterly Report", 15), first_paragraph()
    assert evaluate(desktop, task) == 1.0


def test_a_missing_office_module_is_named(desktop, agentenv_home, monkeypatch):
    # Calc, Writer and Impress are all installed here (scripts/install.sh): a machine without Impress
    # is stood in for by a program name that no machine has; an open step names what is missing.
    from agentenv.envs.tasks import setup

    monkeypatch.setitem(setup.OFFICE_PROGRAMS, "--impress", "loimpress-not-installed")
    (desktop.home / "Desktop").mkdir(parents=True, exist_ok=True)
    task = Task(id="slides", instruction="-", extra={"snapshot": "libreoffice_impress"}, config=[
        {"type": "execute", "parameters": {"command": "echo x > /home/user/Desktop/talk.pptx", "shell": True}},
        {"type": "open", "parameters": {"path": "/home/user/Desktop/talk.pptx"}}])
    with pytest.raises(TaskSetupError, match=r"talk.pptx needs LibreOffice impress \(loimpress-not-installed\), which is not installed"):
        desktop.reset(task)


def test_offline_download_step_fails_naming_the_url(desktop, samples, file_server, agentenv_home, monkeypatch):
    task = load_sample(samples, "f61b2d7e-notes-append")
    monkeypatch.setenv("AGENTENV_OFFLINE", "1")
    with pytest.raises(TaskSetupError, match=r"config\[0\] \(download\): offline and not cached: "
                                             + f"{file_server.base}/notes.txt"):
        desktop.reset(task)
    assert file_server.hits == []


def test_until_command_error_last_row_and_screen_size(desktop, agentenv_home):
    import openpyxl

    task = Task(id="misc", instruction="-", extra={"snapshot": "os"}, config=[
        # `until`: retried until the condition holds (the second try finds the file the first made)
        {"type": "execute", "parameters": {"command": "test -f ~/flag || { touch ~/flag; exit 3; }", "shell": True,
                                           "until": {"returncode": 0}}}],
        evaluator={"func": ["check_include_exclude", "exact_match", "check_direct_json_object"], "conj": "and",
                   "result": [{"type": "vm_command_error", "command": "ls /home/user/nothing-here", "shell": True},
                              {"type": "content_from_vm_file", "path": "/home/user/t.xlsx", "file_type": "xlsx",
                               "file_content": "last_row"},
                              {"type": "vm_screen_size"}],
                   "expected": [{"type": "rule", "rules": {"include": ["No such file"], "exclude": []}},
                                {"type": "rule", "rules": {"expected": ["total", "60"]}},
                                {"type": "rule", "rules": {"expected": {"width": 1280, "height": 800}}}]})
    desktop.reset(task)
    assert (desktop.home / "flag").exists()
    assert evaluate(desktop, task) == 0.0  # no t.xlsx yet
    wb = openpyxl.Workbook()
    for row in (("region", "amount"), ("north", 60), ("total", 60)):
        wb.active.append(list(row))
    wb.save(desktop.home / "t.xlsx")
    assert evaluate(desktop, task) == 1.0


def test_chrome_open_tabs_opens_the_pages(desktop, agentenv_home):
    task = Task(id="tabs", instruction="-", extra={"snapshot": "chrome"}, config=[
        {"type": "execute", "parameters": {"command": "echo '<title>Hello page</title>' > /home/user/p.html",
                                           "shell": True}},
        {"type": "chrome_open_tabs", "parameters": {"urls_to_open": ["file:///home/user/p.html"]}}])
    desktop.reset(task)
    assert wait_for(lambda: any("Hello page" in t for t in desktop.window_titles()), 20)


def test_postconfig_download_and_diff_into_cache_file(desktop, file_server, agentenv_home):
    """As OSWorld's multi_apps tasks do: postconfig downloads a reference, diffs it with the agent's
    file into the task cache (`stdout`), and check_list reads that through `cache_file`."""
    task = Task(id="diff", instruction="-", extra={"snapshot": "multi_apps"}, config=[
        {"type": "execute", "parameters": {"command": "printf 'meeting at noon\\n' > /home/user/notes.txt", "shell": True}},
        {"type": "launch", "parameters": {"command": ["xfce4-terminal", "--disable-server"]}}],
        evaluator={"postconfig": [
            {"type": "download", "parameters": {"files": [{"url": f"{file_server.base}/notes_gold.txt",
                                                           "path": "/home/user/.gold.txt"}]}},
            {"type": "execute", "parameters": {"command": ["diff", ".gold.txt", "/home/user/notes.txt"],
                                               "stdout": "diff.out"}}],
            "func": "check_list", "result": {"type": "cache_file", "path": "diff.out"},
            "expected": {"type": "rule", "rules": {"unexpect": [".+"]}}})
    desktop.reset(task)
    assert evaluate(desktop, task) == 0.0  # diff exits 1 and says how they differ
    act(desktop, Action("type", text="echo 'bring the report' >> ~/notes.txt\n"))
    assert wait_for(lambda: (desktop.home / "notes.txt").read_text().count("\n") == 2)
    assert evaluate(desktop, task) == 1.0
