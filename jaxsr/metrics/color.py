"""MATLAB's `rgb2ycbcr` luma (ITU-R BT.601, studio range), as BasicSR and pyiqa use it."""

from __future__ import annotations

import jax.numpy as jnp

# Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 255]: MATLAB's
# coefficients for [0, 1] input, rescaled. Not OpenCV's JPEG-range YCrCb.
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(pixels: jnp.ndarray) -> jnp.ndarray:
    """Luma of RGB pixel values in [0, 255]: (..., 3) float -> (..., 1) in [16, 235]."""
    r, g, b = pixels[..., 0:1], pixels[..., 1:2], pixels[..., 2:3]
    return 16.0 + (_Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b) / 255.0
