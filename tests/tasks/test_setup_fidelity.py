"""Setup steps as desktop-env's SetupController runs them, and the VM's sudo, on a sandboxed desktop:
a failing `execute` is logged and setup goes on, `until` ends on any one of its conditions,
{CLIENT_PASSWORD} and {SCREEN_*} are filled in, and a password given to sudo once is remembered in
that shell or terminal (not in another, not after a reset)."""

from __future__ import annotations

import os
import time

import pytest

from agentenv.envs.tasks.evaluate import evaluate
from agentenv.envs.tasks.setup import TaskSetupError, run_setup
from agentenv.envs.xvfb import DesktopSpec, make_desktop
from agentenv.types import Action, Task
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def desktop():
    d = make_desktop(f"fidelity-{os.getpid()}", DesktopSpec(width=1280, height=800, sandbox=True)).start()
    try:
        yield d
    finally:
        d.close()


def os_task(tid: str, config: list, evaluator: dict | None = None) -> Task:
    """A task of our own in OSWorld's format (the `os` domain)."""
    return Task(id=tid, instruction="-", extra={"snapshot": "os"}, config=config, evaluator=evaluator or {})


def execute(command, **params) -> dict:
    return {"type": "execute", "parameters": {"command": command, **params}}


def test_a_failing_command_is_logged_and_setup_goes_on(desktop):
    task = os_task("goes-on", [
        execute("echo broken >&2; exit 3", shell=True),
        {"type": "command", "parameters": {"command": ["ls", "/no/such/dir"]}},
        execute("touch /home/user/after", shell=True)])
    desktop.reset(task)
    assert (desktop.home / "after").exists()


def test_until_ends_when_any_one_condition_holds(desktop):
    # Prints what `until` waits for but exits 1: desktop-env stops at once (any condition), and so do we.
    task = os_task("until-any", [execute("echo x >> ~/tries; echo ready; exit 1", shell=True,
                                         until={"returncode": 0, "stdout": "ready"})])
    desktop.reset(task)
    assert (desktop.home / "tries").read_text() == "x\n"
    # stderr alone ends it too, on the third try
    task = os_task("until-stderr", [execute("echo x >> ~/tries; [ $(wc -l < ~/tries) -ge 3 ] && echo done >&2; exit 0",
                                            shell=True, until={"stderr": "done"})])
    desktop.reset(task)
    assert (desktop.home / "tries").read_text() == "x\nx\nx\n"


def test_until_gives_up_after_five_failed_runs_and_goes_on(desktop):
    task = os_task("until-fail", [
        execute(["/no/such/program"], until={"returncode": 0}),
        execute("touch /home/user/after", shell=True)])
    t0 = time.monotonic()
    desktop.reset(task)
    assert (desktop.home / "after").exists()
    assert time.monotonic() - t0 >= 4 * 0.3  # it did try again: 5 runs, 0.3 s apart


def test_until_that_never_holds_fails_the_task_naming_it(desktop, monkeypatch):
    from agentenv.envs.tasks import setup

    monkeypatch.setattr(setup, "UNTIL_MAX_S", 1.0)
    task = os_task("until-never", [execute("exit 2", shell=True, until={"returncode": 0})])
    with pytest.raises(TaskSetupError, match=r"config\[0\] \(execute\): command never met its 'until' condition"):
        run_setup(desktop, task)


def test_placeholders_are_filled_in_execute_and_command_steps(desktop):
    task = os_task("placeholders", [
        execute("echo {CLIENT_PASSWORD} | sudo -S sh -c 'id -u > /home/user/uid'", shell=True),
        {"type": "command", "parameters": {"command": [
            "sh", "-c", "echo {SCREEN_WIDTH} {SCREEN_HEIGHT} {SCREEN_WIDTH_HALF} {SCREEN_HEIGHT_HALF} > ~/size"]}},
        # pyautogui code gets them too: a right click in the middle of the screen
        execute(["python", "-c", "import pyautogui; pyautogui.moveTo({SCREEN_WIDTH_HALF}, {SCREEN_HEIGHT_HALF})"])],
        evaluator={"func": "exact_match",
                   "result": {"type": "vm_command_line", "command": "cat ~/uid ~/size", "shell": True},
                   "expected": {"type": "rule", "rules": {"expected": "0\n1280 800 640 400\n"}}})
    desktop.reset(task)
    assert evaluate(desktop, task) == 1.0
    r = desktop.run(["xdotool", "getmouselocation", "--shell"], timeout=10)
    assert "X=640\n" in r.stdout and "Y=400\n" in r.stdout


def test_sudo_remembers_the_password_in_the_same_shell_only(desktop):
    desktop.reset(os_task("sudo-cache", []))
    same = desktop.run("echo password | sudo -S true 2>/dev/null; sudo -n id -u; sudo id -u < /dev/null; true",
                       shell=True, timeout=30)
    assert same.stdout == "0\n0\n", same.stderr
    other = desktop.run("sudo -n id -u; true", shell=True, timeout=30)  # another shell: asked again
    assert other.stdout == "" and "a password is required" in other.stderr
    # -k forgets it; a wrong password is not remembered
    forgot = desktop.run("echo password | sudo -S true 2>/dev/null; sudo -k; sudo -n id -u; "
                         "echo wrong | sudo -S true; sudo -n id -u; true", shell=True, timeout=30)
    assert forgot.stdout == "" and "incorrect password" in forgot.stderr


def test_sudo_remembers_the_password_in_a_terminal_until_reset(desktop):
    desktop.reset(os_task("sudo-terminal", [
        {"type": "launch", "parameters": {"command": ["gnome-terminal"]}}]))
    # As an agent types it: the password once, then sudo without it in the same terminal.
    act = [Action("type", text="echo password | sudo -S true\n"),
           Action("type", text="sudo sh -c 'id -u > /home/user/root-uid'\n")]
    for a in act:
        assert desktop.execute(a) == {}
        time.sleep(0.5)
    assert wait_for(lambda: (desktop.home / "root-uid").exists(), 15)
    assert (desktop.home / "root-uid").read_text() == "0\n"
    assert desktop.run(["ls", "/run/sudo/ts"], timeout=10).stdout == "user\n"
    desktop.reset(os_task("sudo-after-reset", []))
    assert desktop.run(["ls", "/run/sudo"], timeout=10).returncode != 0  # gone with the reset
