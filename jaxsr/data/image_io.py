"""Reading and writing 8-bit RGB images on the host.

`load_image` gives what the reference's `Image.open(path).convert("RGB")` gives
for ordinary files (alpha dropped, not composited; grayscale and palette images
expanded to RGB), with three deliberate differences:

- EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo is
  processed upright;
- 16-bit single-channel images ("I;16*", and "I", which is how PIL opens some
  16-bit files) are scaled to 8 bits by value/257, rounded, instead of PIL's
  convert, which clips everything above 255 to white;
- any failure (missing, unreadable, truncated or not-an-image file) raises
  `ImageError` with a one-line reason. The pixel data is decoded eagerly
  (`Image.load()`), because PIL opens lazily and a truncated file would
  otherwise fail much later, or not at all. Nothing global is changed (no
  `ImageFile.LOAD_TRUNCATED_IMAGES`).

16-bit RGB PNGs are reduced to 8 bits by PIL's decoder itself (it keeps the high
byte); PIL offers no wider RGB mode to do better.

`save_image` writes atomically: a temporary file in the destination folder,
then `os.replace`, so readers never see a half-written image.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image file could not be read or written; the message says which file and why."""


def load_image(path) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3], upright per its EXIF orientation."""
    path = os.fspath(path)
    with reading_image(path):
        with Image.open(path) as img:
            img.load()  # decode now: truncated data must fail here
            img = ImageOps.exif_transpose(img)
            return to_rgb_uint8(img)


@contextlib.contextmanager
def reading_image(path):
    """Turn what PIL and the OS raise while reading `path` into one ImageError whose
    message names the file and says what is wrong with it."""
    try:
        yield
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise ImageError(f"{path}: is a directory") from e
    except PermissionError as e:
        raise ImageError(f"{path}: permission denied") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image file (or a format PIL cannot read)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated"),
        # SyntaxError (broken PNG chunks) or ValueError, depending on the decoder.
        raise ImageError(f"{path}: unreadable or corrupt image ({e})") from e


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 RGB [H, W, 3] (16-bit scaled, alpha dropped)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode == "P" and isinstance(img.info.get("transparency"), bytes):
        # PIL warns when such a palette image goes straight to RGB; through RGBA it
        # gives the same RGB values (the alpha is dropped either way, as the reference
        # does). Not silenced with warnings.catch_warnings: that swaps the process-wide
        # filters, and this runs in decoding threads, where it would swallow warnings
        # raised meanwhile on other threads (a skipped-image warning among them).
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"unexpected decoded shape {array.shape}")
    return np.ascontiguousarray(array)


def save_image(path, image, **pil_options) -> None:
    """Write a uint8 image [H, W, 3] (or [H, W]) atomically.

    The format follows the file extension (any PIL knows: .png, .jpg, .webp,
    …); a path without extension is written as PNG. `pil_options` go to
    `Image.save` (e.g. quality=95 for JPEG).
    """
    path = os.fspath(path)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"save_image: expected a uint8 array, got {array.dtype} "
                        "(convert explicitly, e.g. with to_uint8_truncate)")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(f"save_image: expected [H, W, 3] or [H, W], got shape {array.shape}")
    fmt = _format_for(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        # os.open with 0o666 lets the umask decide permissions, as a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(array)).save(f, format=fmt, **pil_options)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise ImageError(f"{path}: cannot write ({e})") from e
        raise


def _format_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        return "PNG"
    formats = Image.registered_extensions()
    if ext not in formats:
        raise ValueError(f"save_image: unknown image extension {ext!r} in {path}")
    return formats[ext]
