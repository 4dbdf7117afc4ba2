"""Checks an uploaded file before any work, with a message the page can show as is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxsr.data.image_io import ImageError, load_image
from jaxsr.inference.inputs import MIN_SIDE, read_size


class UploadError(ValueError):
    """An upload the app refuses; the message names the file and says why."""


def check_upload(path, max_pixels: int) -> np.ndarray:
    """The uploaded image as uint8 RGB [H, W, 3]; UploadError when it is not an image,
    is smaller than MIN_SIDE px on a side, or has more than `max_pixels` pixels (the
    size is read from the header first, so an oversized picture is never decoded)."""
    if path is None:
        raise UploadError("upload an image first")
    name = Path(path).name
    try:
        height, width = read_size(path)
    except ImageError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise UploadError(f"{name}: {reason}") from None
    if height * width > max_pixels:
        raise UploadError(f"{name}: too large ({width}x{height} px; this app takes at most "
                          f"{max_pixels:,} pixels, see `jaxsr app --max-pixels`)")
    try:
        return load_image(path)
    except ImageError as e:
        raise UploadError(f"{name}: {str(e).removeprefix(f'{path}: ')}") from None


__all__ = ["MIN_SIDE", "UploadError", "check_upload"]
