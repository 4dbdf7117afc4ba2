"""Unsharp masking of the HR target (Real-ESRGAN's USMSharp, as SeeSR applies it).

With G the 51×51 Gaussian (σ = 8.0, OpenCV's rule for σ = 0:
0.3·((k − 1)/2 − 1) + 0.8), reflect padding:
    residual = x − G∗x
    mask     = 1 where |residual|·255 > threshold (per channel), else 0
    soft     = G∗mask
    sharp    = clip(x + weight·residual, 0, 1)
    out      = soft·sharp + (1 − soft)·x
weight 0.5, threshold 10 (8-bit units). The Gaussian is applied as two 1-D passes
(equal to the 2-D outer-product kernel up to float32 rounding). Needs H, W > 25.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.data.degrade.canvas import reflect_index

USM_RADIUS = 51


def opencv_sigma(ksize: int) -> float:
    """The σ OpenCV's `getGaussianKernel` uses when given σ ≤ 0 (ksize > 7)."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


def gaussian_1d(ksize: int = USM_RADIUS, sigma: float | None = None) -> np.ndarray:
    """Normalised 1-D Gaussian taps, [ksize] float32."""
    sigma = opencv_sigma(ksize) if sigma is None else sigma
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return (g / g.sum()).astype(np.float32)


def _separable_blur(image, taps):
    """Reflect-padded separable blur of [B, H, W, C] with 1-D taps [k] (depthwise convs)."""
    k = taps.shape[0]
    pad = k // 2
    _, height, width, channels = image.shape
    rows = reflect_index(jnp.arange(-pad, height + pad), height)
    cols = reflect_index(jnp.arange(-pad, width + pad), width)
    x = image[:, rows][:, :, cols]
    for shape in ((k, 1), (1, k)):
        rhs = jnp.broadcast_to(taps.reshape(shape + (1, 1)), shape + (1, channels))
        x = jax.lax.conv_general_dilated(
            x, rhs, window_strides=(1, 1), padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
            precision=jax.lax.Precision.HIGHEST)
    return x


def usm_sharpen(image, weight: float = 0.5, threshold: float = 10.0,
                radius: int = USM_RADIUS):
    """image: [B, H, W, C] float in [0, 1]. Returns the sharpened [B, H, W, C] float32."""
    if radius % 2 == 0:
        radius += 1
    taps = jnp.asarray(gaussian_1d(radius))
    x = image.astype(jnp.float32)
    residual = x - _separable_blur(x, taps)
    mask = (jnp.abs(residual) * 255.0 > threshold).astype(jnp.float32)
    soft = _separable_blur(mask, taps)
    sharp = jnp.clip(x + weight * residual, 0.0, 1.0)
    return soft * sharp + (1.0 - soft) * x
