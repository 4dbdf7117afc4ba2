"""Additive Gaussian and Poisson noise with gray variants, per image, clipped to [0, 1].

Gaussian: n = σ·ε, ε ~ N(0, 1) per pixel and channel, or (gray) one ε per pixel
shared by R, G and B. σ is in [0, 1] units here (the presets' 8-bit σ divided by 255).

Poisson (shot noise, as Real-ESRGAN): the image is first quantised to 8-bit levels
x_q = round(255·x)/255; with L the number of distinct levels in the image,
v = 2^⌈log2 L⌉ and n = scale·(Poisson(v·x_q)/v − x_q), added to the unquantised x.
L is counted in jit with a 256-bin histogram over the valid region (no host
round trip), so v is exact. The gray variant draws one noise plane from the
luminance 0.2989 R + 0.587 G + 0.114 B (torchvision's weights), quantised and
counted the same way, and adds it to all three channels.

Only the valid region matters (see canvas.py); noise beyond it is harmless since
later stages re-replicate the edges before reading there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsr.data.degrade.canvas import valid_mask

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def gaussian_noise(key, shape_hwc, sigma, gray):
    """σ·N(0, 1) noise [H, W, C]; gray (bool, may be traced) shares one plane over C."""
    # One draw for the colour planes and the gray plane: fewer sampler calls to compile.
    planes = jax.random.normal(key, shape_hwc[:2] + (shape_hwc[2] + 1,), jnp.float32)
    return sigma * jnp.where(gray, planes[..., -1:], planes[..., :-1])


def _quantise(image):
    """8-bit levels (int32) and the quantised image x_q = level/255, both [H, W, C]."""
    levels = jnp.clip(jnp.round(image * 255.0), 0, 255).astype(jnp.int32)
    return levels, levels.astype(jnp.float32) / 255.0


def _poisson_vals(levels, mask):
    """v = 2^⌈log2 L⌉, L the number of distinct levels among the masked pixels [H, W]."""
    weights = jnp.broadcast_to(mask[..., None], levels.shape).astype(jnp.float32)
    hist = jnp.bincount(levels.reshape(-1), weights.reshape(-1), length=256)
    count = jnp.maximum(jnp.sum(hist > 0), 1).astype(jnp.float32)
    return 2.0 ** jnp.ceil(jnp.log2(count))


def poisson_noise(key, image, scale, gray, valid_hw=None):
    """scale·shot noise for image [H, W, 3] in [0, 1]; gray (bool, may be traced). [H, W, 3]."""
    if valid_hw is None:
        valid_hw = image.shape[:2]
    mask = valid_mask(image.shape[:2], valid_hw)
    luma = jnp.sum(image * jnp.asarray(_GRAY_WEIGHTS, jnp.float32), axis=-1, keepdims=True)
    color_levels, color_q = _quantise(image)
    luma_levels, luma_q = _quantise(luma)
    # Colour planes and the gray plane in one sampler call (it is slow to compile).
    quantised = jnp.concatenate([color_q, luma_q], axis=-1)
    vals = jnp.concatenate([jnp.broadcast_to(_poisson_vals(color_levels, mask), (3,)),
                            _poisson_vals(luma_levels, mask)[None]])
    counts = jax.random.poisson(key, quantised * vals, dtype=jnp.int32)
    noise = counts.astype(jnp.float32) / vals - quantised
    return scale * jnp.where(gray, noise[..., -1:], noise[..., :-1])


def random_noise(key, image, stage, valid_hw=None):
    """Gaussian or Poisson noise as the preset stage draws it, added and clipped.

    image: [H, W, 3] in [0, 1]; stage: presets.StageSettings. Returns [H, W, 3] in [0, 1].
    """
    k_scalars, k_gauss, k_shot = jax.random.split(key, 3)
    u = jax.random.uniform(k_scalars, (4,))
    use_gaussian = u[0] < stage.gaussian_noise_prob
    gray = u[1] < stage.gray_noise_prob
    lo, hi = stage.noise_range
    sigma = (lo + (hi - lo) * u[2]) / 255.0
    lo, hi = stage.poisson_scale_range
    scale = lo + (hi - lo) * u[3]
    gauss = gaussian_noise(k_gauss, image.shape, sigma, gray)
    shot = poisson_noise(k_shot, image, scale, gray, valid_hw)
    return jnp.clip(image + jnp.where(use_gaussian, gauss, shot), 0.0, 1.0)
