"""The checks that apply the env service's limits (``config.ServiceLimits``) to a request."""

from __future__ import annotations

from fastapi import HTTPException

from agentenv.config import ServiceLimits


def check_image_size(limits: ServiceLimits, size: tuple[int, int] | None) -> None:
    if size is None:
        return
    w, h = size
    if w < 1 or h < 1:
        raise HTTPException(422, f"image_size {w}x{h}: both sides must be at least 1")
    if w * h > limits.max_image_pixels:
        raise HTTPException(413, f"image_size {w}x{h} is over the limit of {limits.max_image_pixels} pixels "
                                 "(serve-envs --max-image-pixels)")


def check_screen(limits: ServiceLimits, width: int | None, height: int | None) -> None:
    for name, v in (("width", width), ("height", height)):
        if v is not None and not 64 <= v <= limits.max_screen_side:
            raise HTTPException(422, f"{name} {v} is outside 64..{limits.max_screen_side} "
                                     "(serve-envs --max-screen-side)")
