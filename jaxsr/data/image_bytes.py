"""Decoding encoded image bytes (as stored in a dataset record) to uint8 RGB.

The same conversions as `image_io.load_image` (EXIF orientation applied,
grayscale/palette/alpha/16-bit to 8-bit RGB, eager decode so a truncated file
fails here), for bytes that come from a record instead of a file.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from jaxsr.data.image_io import reading_image, to_rgb_uint8


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image (PNG, JPEG, WebP, BMP, ...) -> uint8 RGB [H, W, 3].

    name: what an error message calls the image (a file name or record index).
    Raises `image_io.ImageError` with a one-line reason when the bytes are not a
    readable image.
    """
    with reading_image(name):
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()  # decode now: truncated data must fail here
            img = ImageOps.exif_transpose(img)
            return to_rgb_uint8(img)
