"""What one request may ask of the env service (``ServiceLimits``), and the checks that apply them."""

from __future__ import annotations

from fastapi import HTTPException
from pydantic import BaseModel


class ServiceLimits(BaseModel):
    """What one request may ask of the service; larger is refused with a 413/422 that says which
    limit (``agentenv serve-envs --help`` sets each). One request must not exhaust the memory or
    the disk of a service that hosts many desktops."""

    max_body_bytes: int = 64 * 2**20       # a request body (uploads included)
    max_image_pixels: int = 4096 * 4096    # a screenshot resized for the model (UI-TARS-1.5 needs <= 12.8 M)
    max_screen_side: int = 7680            # a desktop's width or height (8K)
    max_output_bytes: int = 2**20          # stdout/stderr kept from an /execute command (the rest is cut)
    max_file_bytes: int = 64 * 2**20       # a file served by /file
    execute_timeout_s: float = 120.0       # an /execute command's longest run


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
