"""Pure logic: when two screen grabs count as the same screen (Desktop.wait_settled)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from agentenv.envs.desktop import STILL_PX, frames_differ


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
