"""The perceptual distance between two screenshots, for replay.

distance = 1 - (the lowest local SSIM between the two images), in [0, 2].

SSIM is Wang et al.'s structural similarity (scikit-image, grayscale, Gaussian windows with
sigma 1.5, as in the paper). Its mean over a whole screen hides a changed word in 2 million
unchanged pixels, and is pulled down by invisible noise, so the distance takes the worst window
instead: a change shows where it happens, at any screen size.

Threshold: a replayed screenshot *diverges* from the recorded one when distance > 0.25 (some
11x11 neighbourhood lost a quarter of its structural similarity). Measured on this project's
desktops (scripts/bench_view.py and tests/view): identical states give exactly 0; Gaussian noise
of +-2 grey levels gives 0.05; one changed letter of the editor's text gives 1.2 at 1920x1080 and
0.1 at the tiny model's 588x336 (below the threshold: a change of one or two pixels at the
compared size is not seen); one changed word at 588x336 gives 0.43; a moved text caret 0.99.
Screenshots are compared at the recorded one's size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

THRESHOLD = 0.25


@dataclass
class Comparison:
    distance: float
    region: list[float] | None = None   # [x0, y0, x1, y1] of windows past the threshold, fractions


def gray(png: bytes | str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG (bytes or path) as a grayscale float array, resized to ``size`` (w, h) if given."""
    from PIL import Image

    img = Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("L")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64)


def compare(recorded: np.ndarray, replayed: np.ndarray, threshold: float = THRESHOLD) -> Comparison:
    """The distance between two grayscale images of one size, and where they differ."""
    if recorded.shape != replayed.shape:
        raise ValueError(f"images differ in size: {recorded.shape} vs {replayed.shape}")
    if np.array_equal(recorded, replayed):
        return Comparison(0.0)
    from skimage.metrics import structural_similarity

    _, smap = structural_similarity(recorded, replayed, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    d = float(np.clip(1.0 - smap.min(), 0.0, 2.0))
    bad = smap < 1.0 - threshold
    if not bad.any():
        return Comparison(d)
    ys, xs = np.nonzero(bad)
    h, w = smap.shape
    return Comparison(d, [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])


def distance(recorded: bytes | str, replayed: bytes | str, threshold: float = THRESHOLD) -> Comparison:
    """``compare`` of two PNGs; the replayed one is resized to the recorded one's size if they differ."""
    a = gray(recorded)
    return compare(a, gray(replayed, (a.shape[1], a.shape[0])), threshold)
