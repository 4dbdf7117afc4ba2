"""Resizes with the exact kernels the reference code uses.

Three different "bicubic"/"bilinear" resizes appear in SeeSR and CoSeR, and they
do not agree with each other nor with `jax.image.resize`:

- PIL `Image.resize` (BICUBIC by default): host-side, antialiased when shrinking.
  Used for the ×4 upscale of the LR input and the final resize (`pil_bicubic`).
- PyTorch `F.interpolate(mode="bilinear", align_corners=False)` without
  antialiasing: torchvision's tensor `Resize` for DAPE's 384×384 input with the
  pinned torchvision 0.15 (`torch_resize_bilinear`).
- PyTorch `F.interpolate(mode="bicubic", align_corners=False)`: cubic
  convolution with a = -0.75, no antialiasing, indices clamped at the border
  (`torch_resize_bicubic`).

`jax.image.resize` uses a = -0.5 and antialiases when shrinking, so it matches
none of them. The PyTorch kernels are jit-able ops in `jaxsr.nn.resize` (networks use
them too); this module holds the host-side PIL resizes and SeeSR's size rules.

Size conventions follow each library: PIL takes (width, height), PyTorch
(height, width).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- PIL


def pil_bicubic(image, size: tuple[int, int]) -> np.ndarray:
    """PIL `Image.resize(size)` with BICUBIC, the default the reference relies on for RGB.

    image: uint8 array [H, W, 3] (or [H, W]) or a PIL image.
    size: (width, height), PIL's order.
    Returns a uint8 array [height, width, 3] (or [height, width]). Resizing to the
    current size returns an unchanged copy, as PIL does.
    """
    pil = image if isinstance(image, Image.Image) else _array_to_pil(image)
    width, height = (int(s) for s in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"pil_bicubic: size must be positive (width, height), got {size}")
    return np.asarray(pil.resize((width, height), resample=Image.Resampling.BICUBIC))


def _array_to_pil(array) -> Image.Image:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image array, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
        raise ValueError(f"expected an image array [H, W] or [H, W, 3], got shape {array.shape}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def seesr_upscale_sizes(width: int, height: int, upscale: int = 4,
                        process_size: int = 512) -> list[tuple[int, int]]:
    """The successive PIL resize targets `test_seesr.py` applies to an LR image of (width, height).

    1. if a side is below process_size // upscale, scale so the short side reaches it
       (int() truncation of both sides, Python float arithmetic as the reference);
    2. ×upscale;
    3. crop-resize down to multiples of 8.
    Returns the (width, height) list, step 1 only when it applies.
    """
    sizes = []
    min_side = process_size // upscale
    if width < min_side or height < min_side:
        scale = min_side / min(width, height)
        width, height = int(scale * width), int(scale * height)
        sizes.append((width, height))
    width, height = width * upscale, height * upscale
    sizes.append((width, height))
    sizes.append((width // 8 * 8, height // 8 * 8))
    return sizes


def seesr_upscale_input(image, upscale: int = 4, process_size: int = 512) -> np.ndarray:
    """The ControlNet / colour-fix image of SeeSR inference: the LR bicubic-upscaled by PIL.

    image: uint8 [H, W, 3]. Returns uint8 [H', W', 3] with H', W' multiples of 8.
    The pipeline resizes its final output back to (W·upscale, H·upscale) with `pil_bicubic`.
    """
    pil = image if isinstance(image, Image.Image) else _array_to_pil(image)
    for size in seesr_upscale_sizes(pil.width, pil.height, upscale, process_size):
        pil = pil.resize(size, resample=Image.Resampling.BICUBIC)
    return np.asarray(pil)
