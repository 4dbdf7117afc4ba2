"""The second-order degradation, jit-able on the device with per-image random draws.

    degrade(key, hr [B, H, W, 3] in [0, 1], preset) -> (lr [B, H/s, W/s, 3], target)

Per image (vmapped over B; each image has its own key and draws):

    (USM) → blur(kernel 1) → resize 1 → noise 1 → JPEG 1 → blur(kernel 2, p)
    → resize 2 → noise 2 → final → clamp (→ round to 1/255)

with final = resize to (H/s, W/s) → sinc → JPEG 2 or JPEG 2 → resize → sinc, each
with probability 1/2, and the sinc replaced by the identity with probability
1 − final_sinc_prob. Resize scales are drawn up/down/keep from the stage's
probabilities (up U[1, hi], down U[lo, 1]), the mode uniformly from area/bilinear/
bicubic. Sizes follow the reference: resize 1 gives ⌊H·s1⌋ (torch `scale_factor`),
resize 2 ⌊(H/s)·s2⌋ (Python `int`), the final resize exactly H/s.

Random sizes are held on static canvases (canvas.py): resize 1's canvas is
⌊H·max(1, hi1)⌋ and resize 2's ⌊(H/s)·max(1, hi2)⌋, each rounded up to a
multiple of 16 (whole JPEG MCUs), and every stage reads only the valid region.

Differences from the reference (SeeSR's make_paired_data / Real-ESRGAN):
- Every random choice is drawn per image. The reference draws the resize
  direction, scale and mode, Gaussian-vs-Poisson, whether to apply the second blur
  and the final order once per batch (Python `random`); per image each image's
  marginal distribution is the same, and the function stays a pure vmap over images.
- JPEG is libjpeg-like (jpeg.py) instead of DiffJPEG, and its quality is rounded to
  an integer.
- Resizes and blurs evaluate the same formulas as torch in float32; different
  rounding order only (≤ 1e-6).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsr.data.degrade.blur import blur
from jaxsr.data.degrade.canvas import replicate_edges
from jaxsr.data.degrade.jpeg import jpeg
from jaxsr.data.degrade.kernels import pulse_kernel, random_final_sinc, random_kernel
from jaxsr.data.degrade.noise import random_noise
from jaxsr.data.degrade.presets import RESIZE_MODES, DegradationPreset, StageSettings
from jaxsr.data.degrade.resize import resize
from jaxsr.data.degrade.usm import usm_sharpen


def _canvas(size: int, top_scale: float) -> int:
    """Largest size ⌊size·s⌋ can reach, rounded up to whole 16-pixel MCUs."""
    largest = max(size, int(math.floor(size * max(1.0, top_scale))))
    return -(-largest // 16) * 16


def _choose(u, probs):
    """Index i with probability probs[i], from one u ~ U[0, 1) (int32 scalar)."""
    edges = jnp.cumsum(jnp.asarray(probs, jnp.float32))[:-1]
    return jnp.sum(u >= edges).astype(jnp.int32)


def _scale(u_direction, u_value, stage: StageSettings):
    """Scale factor: up U[1, hi] / down U[lo, 1] / keep 1 with the stage's probabilities."""
    direction = _choose(u_direction, stage.resize_probs)
    lo, hi = stage.resize_range
    up = 1.0 + (hi - 1.0) * u_value
    down = lo + (1.0 - lo) * u_value
    return jnp.where(direction == 0, up, jnp.where(direction == 1, down, 1.0))


def _mode(u):
    """Resize mode index (resize.AREA / BILINEAR / BICUBIC), uniform."""
    n = len(RESIZE_MODES)
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _quality(u, jpeg_range):
    return jpeg_range[0] + (jpeg_range[1] - jpeg_range[0]) * u


def degrade_image(key, hr, preset: DegradationPreset):
    """One image: hr [H, W, 3] float32 in [0, 1] → lr [H/s, W/s, 3] in [0, 1]."""
    height, width = hr.shape[:2]
    s = preset.scale
    lr_hw = (height // s, width // s)
    # Few sampler calls: each one is a sizeable piece of compiled code.
    k_scalars, k_kernel1, k_kernel2, k_sinc, k_noise1, k_noise2 = jax.random.split(key, 6)
    u = jax.random.uniform(k_scalars, (12,))

    # First order.
    x = blur(hr.astype(jnp.float32), random_kernel(k_kernel1, preset.kernel1))
    scale1 = _scale(u[0], u[1], preset.first)
    hw1 = tuple(jnp.maximum(jnp.floor(n * scale1).astype(jnp.int32), 1) for n in (height, width))
    canvas1 = tuple(_canvas(n, preset.first.resize_range[1]) for n in (height, width))
    x = resize(x, _mode(u[2]), (height, width), hw1, (1.0 / scale1, 1.0 / scale1), canvas1)
    x = random_noise(k_noise1, x, preset.first, hw1)
    x = jpeg(replicate_edges(x, hw1), _quality(u[3], preset.first.jpeg_range))

    # Second order.
    kernel2 = jnp.where(u[4] < preset.second_blur_prob,
                        random_kernel(k_kernel2, preset.kernel2), pulse_kernel())
    x = blur(x, kernel2, hw1)
    scale2 = _scale(u[5], u[6], preset.second)
    # Python int() of a positive float: ⌊⌋; at least one pixel.
    hw2 = tuple(jnp.maximum(jnp.floor(n * scale2).astype(jnp.int32), 1) for n in lr_hw)
    canvas2 = tuple(_canvas(n, preset.second.resize_range[1]) for n in lr_hw)
    step2 = tuple(a.astype(jnp.float32) / b.astype(jnp.float32) for a, b in zip(hw1, hw2))
    x = resize(x, _mode(u[7]), hw1, hw2, step2, canvas2)
    x = random_noise(k_noise2, x, preset.second, hw2)

    # Final: resize back + sinc + JPEG, in one of two orders.
    mode3 = _mode(u[8])
    quality2 = _quality(u[9], preset.second.jpeg_range)
    sinc = random_final_sinc(k_sinc, preset.final_sinc_prob, preset.final_sinc_omega)
    step3 = tuple(a.astype(jnp.float32) / b for a, b in zip(hw2, lr_hw))

    def to_lr(image):
        return blur(resize(image, mode3, hw2, lr_hw, step3, lr_hw), sinc)

    resize_first = jpeg(to_lr(x), quality2)
    jpeg_first = to_lr(jpeg(replicate_edges(x, hw2), quality2))
    lr = jnp.clip(jnp.where(u[10] < 0.5, resize_first, jpeg_first), 0.0, 1.0)
    if preset.round_lr:
        lr = jnp.round(lr * 255.0) / 255.0
    return lr


def degrade(key, hr, preset: DegradationPreset):
    """Degrade a batch: hr [B, H, W, 3] float in [0, 1], H and W multiples of preset.scale.

    Returns (lr [B, H/scale, W/scale, 3] float32 in [0, 1], target [B, H, W, 3] float32):
    the target is hr, USM-sharpened when preset.usm_sharpen (the degradation then
    starts from the sharpened image too, as in the reference). Image i gets key
    `split(key, B)[i]`.
    jit with the preset static: `jax.jit(degrade, static_argnums=2)`.
    """
    return degrade_batch(jax.random.split(key, hr.shape[0]) if hr.ndim == 4 else key, hr,
                         preset)


def degrade_batch(keys, hr, preset: DegradationPreset):
    """`degrade` with one key per image given: keys [B] typed keys (a trainer derives
    them from the example's place in the global batch, so the result does not depend
    on how the batch is split over devices)."""
    if hr.ndim != 4 or hr.shape[-1] != 3:
        raise ValueError(f"expected hr [B, H, W, 3], got shape {hr.shape}")
    batch, height, width, _ = hr.shape
    if height % preset.scale or width % preset.scale:
        raise ValueError(f"H and W must be multiples of {preset.scale}, got {height}×{width}")
    if keys.shape != (batch,):
        raise ValueError(f"expected {batch} keys, got shape {keys.shape}")
    target = hr.astype(jnp.float32)
    if preset.usm_sharpen:
        target = usm_sharpen(target)
    lr = jax.vmap(lambda k, x: degrade_image(k, x, preset))(keys, target)
    if preset.round_target:
        target = jnp.round(target * 255.0) / 255.0
    return lr, target
