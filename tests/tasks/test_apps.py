"""OSWorld's app domains on a real sandboxed desktop: LibreOffice Impress, GIMP, VLC, Thunderbird and a
multi-app task, each a task of our own in OSWorld's format (tests/tasks/samples), opened as OSWorld's
tasks open the app, scored by desktop-env's own metric: 0 as a no-op, 1 after a solution done with
desktop actions (keys, typing, clicks). VLC's HTTP interface answers inside its desktop only."""

from __future__ import annotations

import os
import time

import pytest

from agentenv.envs.tasks.evaluate import evaluate
from agentenv.envs.desktop import Desktop, make_desktop
from agentenv.envs.desktop_types import DesktopSpec
from agentenv.types import Action
from tests.conftest import started_desktop, wait_for
from tests.tasks.conftest import load_sample


@pytest.fixture(scope="module")
def desktop():
    with started_desktop("apps-test", width=1024, height=768, sandbox=True) as d:
        yield d


def getter(d: Desktop, name: str, spec: dict, tmp_path) -> str | None:
    """One of OSWorld's app getters (desktop-env's own where it can be), as an evaluator calls it."""
    from agentenv.envs.tasks.app_getters import APP_GETTERS
    from agentenv.envs.tasks.getters import EvalContext
    from agentenv.types import Task

    return APP_GETTERS[name](EvalContext(desktop=d, task=Task(id="g", instruction="-"), tmp=tmp_path), spec)


def act(d: Desktop, *actions: Action, settle: float = 0.5) -> None:
    for a in actions:
        assert d.execute(a) == {}, a
        time.sleep(settle)


def titled(d: Desktop, text: str, timeout: float = 60) -> bool:
    return wait_for(lambda: any(text in t for t in d.window_titles()), timeout=timeout)


def retitle_slide(d: Desktop, keys_for_title: list[Action]) -> None:
    """In Impress: select the slide's first object (Tab), edit its text (Enter), replace it, leave the
    box, save keeping the pptx format (Enter on "Use PowerPoint Format!")."""
    act(d, Action("key", keys=["tab"]), Action("key", keys=["enter"]), Action("hotkey", keys=["ctrl", "a"]),
        *keys_for_title, Action("key", keys=["escape"]), Action("hotkey", keys=["ctrl", "s"]), settle=0.7)
    time.sleep(1.5)
    act(d, Action("key", keys=["enter"]), settle=2.0)


def test_impress_slide_title(desktop, samples, agentenv_home, tmp_path):
    task = load_sample(samples, "3b9e5f20-slide-title")
    desktop.reset(task)  # deck.pptx downloaded to the Desktop, opened in LibreOffice Impress
    assert titled(desktop, "deck.pptx")
    assert evaluate(desktop, task) == 0.0
    retitle_slide(desktop, [Action("type", text="Launch plan")])
    assert evaluate(desktop, task) == 1.0
    # desktop-env's audio_in_slide getter (through our desktop): this deck has no audio
    assert getter(desktop, "audio_in_slide", {"ppt_file_path": "/home/user/Desktop/deck.pptx", "slide_index": 0,
                                              "dest": "audio.mp3"}, tmp_path) is None


def test_multi_app_title_copied_from_the_editor_into_the_slide(desktop, samples, agentenv_home):
    task = load_sample(samples, "7a1c3e58-title-from-notes")
    desktop.reset(task)  # title.txt in the editor, deck.pptx in Impress: two apps, one desktop
    assert titled(desktop, "title.txt") and titled(desktop, "deck.pptx")
    assert evaluate(desktop, task) == 0.0
    assert desktop.run(["xdotool", "search", "--name", "title.txt", "windowactivate", "--sync"]).returncode == 0
    act(desktop, Action("hotkey", keys=["ctrl", "a"]), Action("hotkey", keys=["ctrl", "c"]))
    assert desktop.run(["xdotool", "search", "--name", "deck.pptx", "windowactivate", "--sync"]).returncode == 0
    time.sleep(0.5)
    retitle_slide(desktop, [Action("hotkey", keys=["ctrl", "v"])])
    assert evaluate(desktop, task) == 1.0


def test_gimp_image_mirrored_and_overwritten(desktop, samples, agentenv_home, tmp_path):
    task = load_sample(samples, "8c2d4e71-mirror-image")
    desktop.reset(task)  # `gimp /home/user/Desktop/shapes.png`, as OSWorld's tasks launch it
    assert titled(desktop, "shapes", timeout=120)  # past GIMP's splash: the image window
    assert evaluate(desktop, task) == 0.0
    # desktop-env's gimp_config_file getter reads ~/.config/GIMP/2.10; a dest is kept inside our folder
    got = getter(desktop, "gimp_config_file", {"file_name": "pluginrc", "dest": "../../pluginrc"}, tmp_path)
    assert got == str(tmp_path / "pluginrc") and b"plug-in-def" in open(got, "rb").read()
    # The Flip tool (Shift+F) flips the layer left to right at a click on the canvas; then
    # File > Export to (Ctrl+E): Export, Replace the file, and Export in the PNG options.
    time.sleep(2.0)
    act(desktop, Action("hotkey", keys=["shift", "f"]), Action("click", x=desktop.width // 2, y=desktop.height // 2),
        settle=1.0)
    before = (desktop.home / "Desktop" / "shapes.png").stat().st_mtime_ns
    assert titled(desktop, "*[shapes]")  # the image changed
    act(desktop, Action("hotkey", keys=["ctrl", "e"]))
    assert titled(desktop, "Export Image")
    act(desktop, Action("key", keys=["enter"]), Action("key", keys=["enter"]), settle=1.5)  # Export; Replace
    assert titled(desktop, "Export Image as PNG")
    act(desktop, Action("key", keys=["enter"]))
    assert wait_for(lambda: (desktop.home / "Desktop" / "shapes.png").stat().st_mtime_ns != before, timeout=20)
    time.sleep(1.0)
    assert evaluate(desktop, task) == 1.0


def test_vlc_playing_state_read_through_its_http_interface(desktop, samples, agentenv_home, tmp_path):
    task = load_sample(samples, "5e7a9c13-play-clip")
    desktop.reset(task)  # `vlc --start-paused clip.wav`; the HTTP interface from vlcrc (app_defaults)
    assert titled(desktop, "clip.wav")
    status = lambda: desktop.run(["curl", "-s", "-m", "3", "-u", ":password",  # noqa: E731
                                  "http://127.0.0.1:8080/requests/status.xml"]).stdout
    assert wait_for(lambda: "<state>paused</state>" in status(), timeout=20)
    assert evaluate(desktop, task) == 0.0
    vlcrc = getter(desktop, "vlc_config", {"dest": "vlcrc"}, tmp_path)  # desktop-env's own getter
    assert "extraintf=http" in open(vlcrc).read()
    assert getter(desktop, "vm_window_size", {"app_class_name": "vlc"}, tmp_path)["width"] > 0
    act(desktop, Action("key", keys=["space"]))  # VLC's play/pause key
    assert wait_for(lambda: "<state>playing</state>" in status(), timeout=20)
    assert evaluate(desktop, task) == 1.0
    # the interface wants the password, and answers on the desktop's own loopback only
    assert "401" in desktop.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "3",
                                 "http://127.0.0.1:8080/requests/status.xml"]).stdout
    import urllib.request

    try:  # not from the host: nothing there answers as VLC
        body = urllib.request.urlopen("http://127.0.0.1:8080/requests/status.xml", timeout=3).read()
    except OSError:
        body = b""
    assert b"<state>" not in body
    other = make_desktop(f"apps-test-other-{os.getpid()}", DesktopSpec(width=640, height=480, sandbox=True)).start()
    try:  # nor from another sandboxed desktop, while this one's VLC plays
        r = other.run(["curl", "-sS", "-m", "3", "-u", ":password", "http://127.0.0.1:8080/requests/status.xml"])
        assert r.returncode != 0 and "<state>" not in r.stdout
    finally:
        other.close()
    assert "<state>playing</state>" in status()


def test_thunderbird_profile_setting(desktop, samples, agentenv_home):
    task = load_sample(samples, "9d4f6a82-attachments-inline")
    desktop.reset(task)  # /usr/bin/thunderbird on the offline profile (app_defaults), no account wizard
    assert titled(desktop, "user@example.invalid - Mozilla Thunderbird", timeout=90)
    assert evaluate(desktop, task) == 0.0
    prefs = desktop.home / ".thunderbird" / "t5q2a5hp.default-release" / "prefs.js"
    time.sleep(2.0)
    act(desktop, Action("hotkey", keys=["alt", "v"]), settle=1.0)  # View menu
    act(desktop, Action("key", keys=["a"]))  # Display Attachments Inline, on by default: off
    assert wait_for(lambda: "mail.inline_attachments" in prefs.read_text(), timeout=20)  # saved by Thunderbird
    assert evaluate(desktop, task) == 1.0


def test_files_rename_in_nautilus(desktop, samples):
    """GNOME Files (nautilus, a GTK4 app drawn by the CPU: GSK_RENDERER=cairo), as OSWorld's
    multi-app tasks launch it on a folder."""
    task = load_sample(samples, "a1f0c2d4-files-rename")
    desktop.reset(task)  # draft.txt in ~/Documents/Finance, nautilus on that folder
    assert titled(desktop, "Finance")
    assert evaluate(desktop, task) == 0.0
    time.sleep(2.0)  # the folder's icons drawn (1024x768: the first icon's centre is at 403, 235)
    act(desktop, Action("click", x=403, y=235), Action("key", keys=["f2"]), Action("hotkey", keys=["ctrl", "a"]),
        Action("type", text="report-2026.txt"), Action("key", keys=["enter"]), settle=0.7)
    assert wait_for(lambda: (desktop.home / "Documents" / "Finance" / "report-2026.txt").exists(), timeout=10)
    assert evaluate(desktop, task) == 1.0


def test_vm_wallpaper_getter_reads_the_image_gnomes_setting_names(desktop, tmp_path):
    from PIL import Image

    desktop.reset(None)
    img = desktop.home / "Pictures" / "w.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 16), (200, 30, 90)).save(img)
    r = desktop.run(["gsettings", "set", "org.gnome.desktop.background", "picture-uri", "file:///home/user/Pictures/w.png"])
    assert r.returncode == 0, r.stderr
    got = getter(desktop, "vm_wallpaper", {"dest": "../background.png"}, tmp_path)  # desktop-env's own getter
    assert open(got, "rb").read() == img.read_bytes() and os.path.dirname(got) == str(tmp_path)
