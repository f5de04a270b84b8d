"""Setup steps as desktop-env's SetupController runs them, and OSWorld's VM, on a sandboxed desktop:
a failing `execute` is logged and setup goes on, `until` ends on any one of its conditions,
{CLIENT_PASSWORD} and {SCREEN_*} are filled in, a password given to sudo once is remembered in that
shell or terminal (not in another, not after a reset), the terminal is GNOME Terminal with its
gsettings profiles, firefox.desktop exists, and settings tasks read are the VM's, not GNOME's
defaults. Tasks of our own in OSWorld's format; solutions typed into a terminal the agent opens."""

from __future__ import annotations

import time

import pytest

from agentenv.envs.tasks.evaluate import evaluate
from agentenv.envs.tasks.setup import TaskSetupError, run_setup
from agentenv.types import Action, Task
from tests.conftest import started_desktop, wait_for


@pytest.fixture(scope="module")
def desktop():
    # OSWorld's VM's screen size: a GNOME Terminal of 132x43 cells fits
    with started_desktop("fidelity", width=1920, height=1080, sandbox=True) as d:
        yield d


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
                   "expected": {"type": "rule", "rules": {"expected": "0\n1920 1080 960 540\n"}}})
    desktop.reset(task)
    assert evaluate(desktop, task) == 1.0
    r = desktop.run(["xdotool", "getmouselocation", "--shell"], timeout=10)
    assert "X=960\n" in r.stdout and "Y=540\n" in r.stdout


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


PROFILE = "org.gnome.Terminal.Legacy.Profile:/org/gnome/terminal/legacy/profiles:/:b1dcc9dd-5262-4d8d-a863-c897e6d979b9/"
CLICK = execute(["python", "-c", "import pyautogui; import time; pyautogui.click({SCREEN_WIDTH_HALF}, "
                                 "{SCREEN_HEIGHT_HALF}); time.sleep(0.5);"])


def in_own_terminal(desktop, *lines: str) -> None:
    """What an agent does: Ctrl+Alt+T, then type each line."""
    before = len(desktop.window_titles())
    assert desktop.execute(Action("hotkey", keys=["ctrl", "alt", "t"])) == {}
    assert desktop.wait_for_window(None, 20, before=before)
    time.sleep(1.0)
    for line in lines:
        assert desktop.execute(Action("type", text=line + "\n")) == {}
        time.sleep(0.5)


def test_terminal_is_gnome_terminal_whose_profile_sets_its_size(desktop):
    # As OSWorld's os task about the terminal's size: scored on a new terminal's `stty size`.
    task = os_task("terminal-size", [CLICK], {
        "postconfig": [{"type": "sleep", "parameters": {"seconds": 1}},
                       execute(["python", "-c", "import pyautogui; import time; pyautogui.hotkey('ctrl', 'alt', 't'); "
                                "time.sleep(2); pyautogui.write('stty size'); time.sleep(0.5); pyautogui.press('enter'); "
                                "time.sleep(1)"])],
        "func": "check_include_exclude", "result": {"type": "vm_terminal_output"},
        "expected": {"type": "rule", "rules": {"include": ["43 132"], "exclude": []}}})
    desktop.reset(task)
    assert evaluate(desktop, task) == 0.0  # 24 80, GNOME Terminal's default
    desktop.reset(task)
    in_own_terminal(desktop, f"gsettings set {PROFILE} default-size-columns 132",
                    f"gsettings set {PROFILE} default-size-rows 43", "pwd > ~/cwd")
    assert wait_for(lambda: (desktop.home / "cwd").exists(), 10)
    assert (desktop.home / "cwd").read_text() == "/home/user\n"  # Ctrl+Alt+T opens in HOME
    procs = desktop.run(["ps", "-eo", "args"], timeout=10).stdout
    assert "/usr/libexec/gnome-terminal-server" in procs and "xfce4-terminal" not in procs
    assert evaluate(desktop, task) == 1.0
    desktop.reset(task)  # the profile is the user's dconf, in HOME: back to the default
    assert desktop.run(["gsettings", "get", PROFILE[:-1] + "/", "default-size-columns"], timeout=10).stdout == "80\n"


def test_settings_are_the_vms_not_gnomes_defaults(desktop):
    lock = os_task("lock", [CLICK], {
        "func": "exact_match",
        "result": {"type": "vm_command_line", "command": "gsettings get org.gnome.desktop.screensaver lock-enabled",
                   "shell": True},
        "expected": {"type": "rule", "rules": {"expected": "true\n"}}})
    volume = os_task("volume", [CLICK], {
        "func": "exact_match",
        "result": {"type": "vm_command_line", "shell": True, "command":
                   "pulseaudio --start\npactl list sinks | grep '^[[:space:]]Volume:' | head -n 1 | awk '{print $5}' "
                   "| sed 's/%//g'"},
        "expected": {"type": "rule", "rules": {"expected": "100\n"}}})
    for task, solution in ((lock, "gsettings set org.gnome.desktop.screensaver lock-enabled true"),
                           (volume, "pactl set-sink-volume @DEFAULT_SINK@ 100%")):
        desktop.reset(task)
        assert evaluate(desktop, task) == 0.0, task.id  # GNOME's default (lock on, volume 100 %) would pass
        in_own_terminal(desktop, solution + " && touch ~/done")
        assert wait_for(lambda: (desktop.home / "done").exists(), 10)
        assert evaluate(desktop, task) == 1.0, task.id
        desktop.reset(task)
        assert evaluate(desktop, task) == 0.0, task.id  # a reset brings the VM's value back


def test_firefox_is_installed_and_firefox_desktop_exists(desktop):
    task = os_task("browser", [execute("xdg-settings set default-web-browser firefox.desktop"), CLICK], {
        "func": "exact_match", "result": {"type": "vm_command_line", "command": "xdg-settings get default-web-browser"},
        "expected": {"type": "rule", "rules": {"expected": "firefox.desktop\n"}}})
    desktop.reset(task)
    assert evaluate(desktop, task) == 1.0
    r = desktop.run("command -v firefox && grep -h '^Exec=' $(for d in $(echo $XDG_DATA_DIRS | tr : ' '); do "
                    "ls $d/applications/firefox.desktop 2>/dev/null; done)", shell=True, timeout=10)
    assert r.stdout.splitlines()[1].startswith("Exec=firefox"), r.stdout
