"""Pure logic: when two screen grabs count as the same screen (Desktop.wait_settled)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from agentenv.envs.desktop import STILL_PX, TITLE_PX, blank_below_title, frames_differ


def test_a_caret_is_still_a_painted_window_is_not():
    blank = Image.new("RGB", (640, 480), "white")
    caret = blank.copy()
    ImageDraw.Draw(caret).rectangle((100, 100, 101, 117), fill="black")  # a text caret: 2 x 18 px
    painted = blank.copy()
    ImageDraw.Draw(painted).rectangle((0, 40, 639, 479), fill=(200, 200, 200))  # a window's contents
    assert not frames_differ(blank, blank.copy())
    assert not frames_differ(blank, caret)
    assert frames_differ(blank, painted)
    far = caret.copy()
    ImageDraw.Draw(far).point((600, 460), fill="black")  # two small changes far apart span the screen
    assert frames_differ(blank, far) and 2 * 18 < STILL_PX


def test_a_window_with_nothing_drawn_below_its_title_is_blank():
    unpainted = Image.new("RGB", (640, 480), "black")
    ImageDraw.Draw(unpainted).rectangle((0, 0, 639, TITLE_PX - 5), fill=(120, 150, 200))  # the title bar
    assert blank_below_title(unpainted)
    editor = unpainted.copy()
    ImageDraw.Draw(editor).rectangle((0, TITLE_PX, 639, 479), fill="white")
    ImageDraw.Draw(editor).text((4, TITLE_PX + 2), "File  Edit  View", fill="black")  # an empty editor: its menu
    assert not blank_below_title(editor)
