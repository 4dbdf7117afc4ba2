"""PSNR and SSIM as BasicSR computes them (`basicsr/metrics/psnr_ssim.py`).

Both work on 8-bit pixel values, as BasicSR's `calculate_psnr` / `calculate_ssim` do on
images read from disk:
- uint8 batches are used as they are;
- float batches in [0, 1] (the metrics contract) become `round(clip(x, 0, 1) * 255)`,
  which is what BasicSR's `tensor2img` does before it scores a network's output.
`crop_border` pixels are dropped on every side; `y_channel` scores MATLAB's BT.601 luma
(BasicSR's `bgr2ycbcr(y_only=True)` on its BGR images is the same luma of our RGB ones).

SSIM is the Wang et al. MATLAB definition BasicSR follows: an 11x11 Gaussian window
(sigma 1.5) over the 'valid' region (BasicSR filters with cv2.filter2D and crops 5
pixels), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, the map averaged over pixels and then
over channels.

Precision. BasicSR computes in float64; these functions stay in float32 (x64 mode is a
process-wide switch and TPUs have no float64) and instead avoid the two places where
float32 loses digits:
- the local variances are formed as windowed sums of centred products,
  sum_k w_k (x_k - mu)(y_k - mu_y), not as E[x^2] - mu^2, which cancels ~5 digits at
  8-bit magnitudes (E[x^2] ~ 6.5e4 against variances of a few units in flat areas);
- every mean over an image is a pairwise (tree) sum, so its rounding error grows with
  log2 of the pixel count rather than with the count.
Scores agree with a float64 port of BasicSR to about 1e-7 (tests/test_metric_psnr_ssim.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.metrics.color import rgb_to_y

WINDOW = 11
SIGMA = 1.5
C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def gaussian_taps(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian of cv2.getGaussianKernel(size, sigma), float64 (size,)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def pixel_values(images) -> jnp.ndarray:
    """uint8, or float in [0, 1] (rounded to 8-bit levels), -> float32 values in [0, 255]."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32)
    return jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)


def _prepare(sr, hr, crop_border: int, y_channel: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Both batches as cropped float32 pixel values, (B, H', W', 3) or (B, H', W', 1)."""
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} and {hr.shape}")
    if sr.ndim != 4 or sr.shape[-1] != 3:
        raise ValueError(f"expected RGB batches (B, H, W, 3), got {sr.shape}")
    if crop_border < 0 or 2 * crop_border >= min(sr.shape[1:3]):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a "
                         f"{sr.shape[1]}x{sr.shape[2]} image")
    a, b = pixel_values(sr), pixel_values(hr)
    if crop_border:
        a = a[:, crop_border:-crop_border, crop_border:-crop_border]
        b = b[:, crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def pairwise_mean(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over all but the leading axis by a balanced tree of additions: (B, ...) -> (B,)."""
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    width = 1 << max(0, (n - 1).bit_length())
    flat = jnp.pad(flat, ((0, 0), (0, width - n)))   # zeros leave the sum unchanged
    while flat.shape[1] > 1:
        half = flat.shape[1] // 2
        flat = flat[:, :half] + flat[:, half:]
    return flat[:, 0] / n


@functools.partial(jax.jit, static_argnames=("crop_border", "y_channel"))
def psnr(sr, hr, *, crop_border: int, y_channel: bool) -> jnp.ndarray:
    """Per-image PSNR in dB (inf for identical images): (B, H, W, 3) x2 -> (B,) float32."""
    a, b = _prepare(sr, hr, crop_border, y_channel)
    d = a - b
    mse = pairwise_mean(d * d)
    return 10.0 * jnp.log10(255.0 * 255.0 / mse)


def _blur_valid(x: jnp.ndarray, taps: np.ndarray) -> jnp.ndarray:
    """Separable Gaussian over the valid region: (B, H, W, C) -> (B, H-10, W-10, C)."""
    k = len(taps)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(float(t) * x[:, i:i + h] for i, t in enumerate(taps))
    return sum(float(t) * rows[:, :, j:j + w] for j, t in enumerate(taps))


@functools.partial(jax.jit, static_argnames=("crop_border", "y_channel"))
def ssim(sr, hr, *, crop_border: int, y_channel: bool) -> jnp.ndarray:
    """Per-image SSIM, channel-averaged: (B, H, W, 3) x2 -> (B,) float32."""
    a, b = _prepare(sr, hr, crop_border, y_channel)
    if min(a.shape[1:3]) < WINDOW:
        raise ValueError(f"SSIM needs at least {WINDOW}x{WINDOW} pixels after cropping, "
                         f"got {a.shape[1]}x{a.shape[2]}")
    taps = gaussian_taps()
    mu_a, mu_b = _blur_valid(a, taps), _blur_valid(b, taps)
    h, w = mu_a.shape[1:3]
    weights = jnp.asarray(np.outer(taps, taps), jnp.float32)

    def window_row(i, moments):
        # Centred moments, one window offset at a time (see the module doc on precision).
        # A loop over the window's rows with its columns unrolled: a quarter of the
        # compile time of 121 unrolled offsets, and faster on the CPU.
        var_a, var_b, cov = moments
        rows_a = jax.lax.dynamic_slice_in_dim(a, i, h, axis=1)
        rows_b = jax.lax.dynamic_slice_in_dim(b, i, h, axis=1)
        row_weights = weights[i]
        for j in range(WINDOW):
            da = rows_a[:, :, j:j + w] - mu_a
            db = rows_b[:, :, j:j + w] - mu_b
            var_a = var_a + row_weights[j] * (da * da)
            var_b = var_b + row_weights[j] * (db * db)
            cov = cov + row_weights[j] * (da * db)
        return var_a, var_b, cov

    zeros = jnp.zeros_like(mu_a)
    var_a, var_b, cov = jax.lax.fori_loop(0, WINDOW, window_row, (zeros, zeros, zeros))
    ssim_map = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / (
        (mu_a * mu_a + mu_b * mu_b + C1) * (var_a + var_b + C2))
    # Every channel has the same pixel count, so the mean over pixels and channels
    # together equals BasicSR's mean of per-channel means.
    return pairwise_mean(ssim_map)
