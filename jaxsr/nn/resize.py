"""PyTorch's `F.interpolate` resizes (bilinear, bicubic; align_corners=False, no
antialiasing) as jit-able ops, exact up to float32 summation order.

The reference code resizes tensors with PyTorch (DAPE's input, the ×4 bicubic LR,
CLIP's 224 input, SRResNet's skip path); `jax.image.resize` uses a = -0.5 and
antialiases when shrinking, so it matches neither. The kernels are separable, so each
is two small static interpolation matrices (built on the host in float32 with
PyTorch's index arithmetic) applied with highest-precision einsums. Sizes are
(height, width), PyTorch's order. Host-side PIL resizes live in `jaxsr.data.resize`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _source_coordinates(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's half-pixel source coordinate for each output index (align_corners=False).

    With an explicit output size the scale is in/out in float32. PyTorch's compiled
    kernels evaluate scale·(dst + 0.5) − 0.5 as one fused multiply-add (a single
    float32 rounding); the float64 product below is exact, so rounding it once
    reproduces that. Two separate float32 roundings would move interpolation
    weights by up to ~1e-5.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    return (scale * (dst + 0.5) - 0.5).astype(np.float32)


@functools.lru_cache(maxsize=64)
def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 weights of PyTorch's linear interpolation along one axis."""
    src = np.maximum(_source_coordinates(in_size, out_size), np.float32(0))
    lo = np.floor(src).astype(np.int64)
    lam = np.clip(src - lo.astype(np.float32), 0, 1).astype(np.float32)
    hi = np.minimum(lo + 1, in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), np.float32(1) - lam)
    np.add.at(m, (rows, hi), lam)
    m.flags.writeable = False
    return m


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2.

    Evaluated in float64 and rounded once: closer to PyTorch's fused float32
    arithmetic (measured ≤ 7e-7 per weight) than plain float32 steps (≤ 1.4e-6).
    """
    t = np.asarray(t, np.float64)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)
    return w.astype(np.float32)


@functools.lru_cache(maxsize=64)
def cubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """[out, in] float32 weights of PyTorch's bicubic interpolation along one axis.

    No clamping of the source coordinate (unlike linear); tap indices are clamped
    to [0, in-1], so weights of out-of-range taps pile onto the border pixel.
    """
    src = _source_coordinates(in_size, out_size)
    base = np.floor(src)
    t = src - base
    weights = _cubic_weights(t, a)
    taps = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    taps = np.clip(taps, 0, in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.repeat(np.arange(out_size), 4)
    np.add.at(m, (rows, taps.reshape(-1)), weights.reshape(-1))
    m.flags.writeable = False
    return m


def _resize_separable(x, size, matrix_fn):
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC batch [B, H, W, C], got shape {x.shape}")
    out_h, out_w = (int(s) for s in size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"size must be positive (height, width), got {size}")
    _, in_h, in_w, _ = x.shape
    mh = jnp.asarray(matrix_fn(in_h, out_h))
    mw = jnp.asarray(matrix_fn(in_w, out_w))
    hp = jax.lax.Precision.HIGHEST  # the default on accelerators would be bf16/tf32 passes
    y = x.astype(jnp.float32)
    y = jnp.einsum("oh,bhwc->bowc", mh, y, precision=hp)
    y = jnp.einsum("pw,bowc->bopc", mw, y, precision=hp)
    return y.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else y


def torch_resize_bilinear(x, size: tuple[int, int]):
    """`F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)` on NHWC.

    x: float [B, H, W, C]; size: (height, width), PyTorch's order. Returns
    [B, height, width, C] in x's dtype (computed in float32).
    """
    return _resize_separable(x, size, linear_matrix)


def torch_resize_bicubic(x, size: tuple[int, int]):
    """`F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=False)` on NHWC.

    a = -0.75, border taps clamped. No clamping of the output values: PyTorch's
    bicubic overshoots [0, 1] and the reference clamps (or not) afterwards.
    x: float [B, H, W, C]; size: (height, width). Returns [B, height, width, C].
    """
    return _resize_separable(x, size, cubic_matrix)
