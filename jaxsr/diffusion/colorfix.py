"""SeeSR's colour correction of the super-resolved image against the upscaled LR.

Both fixes work on NHWC float images in [0, 1] (the reference converts its PIL
images with ToTensor, i.e. uint8/255) and leave the result unclamped; the
reference then clamps to [0, 1] and converts with ToPILImage, which truncates
x·255 to uint8 (`to_uint8_truncate`). All functions are pure and jit-able.

- AdaIN: per image and channel, mean and std over H×W with the *unbiased*
  variance plus 1e-5 inside the square root; out = (x − μ_x)/σ_x · σ_ref + μ_ref.
- Wavelet: five levels of a 3×3 binomial blur ([1,2,1]ᵀ[1,2,1]/16) with
  dilation 2^i and replicate padding 2^i; out = high(x) + low₅(ref), where
  high is accumulated level by level as Σ(img_i − blur(img_i)), as the reference
  does (equal to x − low₅ up to float32 rounding).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxsr.nn.moments import channel_moments

_ADAIN_EPS = 1e-5
_WAVELET_LEVELS = 5
_BLUR_TAPS = ((-1, 0.25), (0, 0.5), (1, 0.25))  # [1, 2, 1] / 4 along each axis


def _mean_std(x):
    """Per image and channel over H×W: mean, √(unbiased var + 1e-5). Shapes [B, 1, 1, C]."""
    n = x.shape[1] * x.shape[2]
    mean, var = channel_moments(x)
    unbiased = var * (n / (n - 1))
    return mean[:, None, None], jnp.sqrt(unbiased + _ADAIN_EPS)[:, None, None]


def adain_color_fix(image, reference):
    """Give `image` [B, H, W, C] the per-channel mean and std of `reference` [B, H', W', C].

    The two may differ in size (only statistics are transferred). Returns float32.
    """
    x = jnp.asarray(image, jnp.float32)
    ref = jnp.asarray(reference, jnp.float32)
    x_mean, x_std = _mean_std(x)
    ref_mean, ref_std = _mean_std(ref)
    return (x - x_mean) / x_std * ref_std + ref_mean


def wavelet_blur(x, dilation: int):
    """3×3 binomial blur with the given dilation and replicate padding, per channel.

    x: [B, H, W, C] float32 → same shape. Written as the 9 weighted shifted views
    of the edge-padded image (the kernel is tiny; a grouped conv buys nothing).
    """
    d = dilation
    padded = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
    h, w = x.shape[1], x.shape[2]
    out = jnp.zeros_like(x)
    for dy, wy in _BLUR_TAPS:
        for dx, wx in _BLUR_TAPS:
            view = padded[:, d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w, :]
            out = out + (wy * wx) * view
    return out


def wavelet_decomposition(x, levels: int = _WAVELET_LEVELS):
    """(high, low): low is the `levels`-times blurred image, high the sum of the details."""
    high = jnp.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = wavelet_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(image, reference):
    """High frequencies of `image` plus the 5-level low frequencies of `reference`.

    Both [B, H, W, C] of the same shape; returns float32.
    """
    x = jnp.asarray(image, jnp.float32)
    ref = jnp.asarray(reference, jnp.float32)
    if x.shape != ref.shape:
        raise ValueError(f"wavelet colour fix needs equal shapes, got {x.shape} and {ref.shape}")
    high, _ = wavelet_decomposition(x)
    _, low = wavelet_decomposition(ref)
    return high + low


def color_fix(image, reference, method: str):
    """Dispatch on the reference's `align_method`: "adain", "wavelet" or "nofix"."""
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    if method == "nofix":
        return jnp.asarray(image, jnp.float32)
    raise ValueError(f"unknown colour-fix method {method!r} (adain, wavelet or nofix)")


def to_uint8_truncate(x):
    """clamp(x, 0, 1)·255 truncated to uint8, as torchvision's ToPILImage on a float tensor."""
    y = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0) * 255.0
    return jnp.floor(y).astype(jnp.uint8)


def to_uint8_round(x):
    """clamp(x, 0, 1)·255 rounded to uint8, as diffusers' image post-processing (numpy_to_pil)."""
    y = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0) * 255.0
    return jnp.round(y).astype(jnp.uint8)
