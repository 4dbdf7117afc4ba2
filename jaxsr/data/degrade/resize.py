"""Resize between canvases with a traced mode, scale and valid size.

The interpolation follows PyTorch `F.interpolate(..., align_corners=False)`
without antialiasing, for the three modes the reference draws from:

- area: `adaptive_avg_pool2d` to the output size (what torch's "area" is): output
  i averages source [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out)), in exact
  integer arithmetic;
- bilinear: source coordinate (i + 0.5)·r − 0.5 clamped at 0, taps clamped to the
  valid region;
- bicubic: the same coordinate, unclamped, Keys cubic with a = −0.75, the four taps
  clamped to the valid region.

r is the input-per-output step the caller passes: 1/s when the reference gives a
`scale_factor` s (first resize), n_in/n_out when it gives a size (second and final
resizes). Each axis is a [out_canvas, in_canvas] matrix built from traced values
(one-hot rows) and applied with highest-precision einsums. Source columns beyond
the input's valid region get weight 0, and output rows/columns beyond the output's
valid region repeat the last valid one, so the result is already edge-replicated.
Matches torch to float32 rounding (torch evaluates the coordinate in float32 from a
float64 1/s; ours is float32 throughout, ≤ 1 ulp apart).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AREA, BILINEAR, BICUBIC = 0, 1, 2  # indices into presets.RESIZE_MODES
_CUBIC_A = -0.75


def _one_hot(index, size):
    return (index[..., None] == jnp.arange(size)).astype(jnp.float32)


def _area_matrix(dst, n_in, n_out, in_canvas):
    start = (dst * n_in) // n_out
    end = ((dst + 1) * n_in + n_out - 1) // n_out
    cols = jnp.arange(in_canvas)[None, :]
    inside = (cols >= start[:, None]) & (cols < end[:, None])
    return inside.astype(jnp.float32) / (end - start)[:, None].astype(jnp.float32)


def _linear_matrix(src, n_in, in_canvas):
    src = jnp.maximum(src, 0.0)
    lo = jnp.floor(src)
    lam = src - lo
    lo = jnp.minimum(lo.astype(jnp.int32), n_in - 1)
    hi = jnp.minimum(lo + 1, n_in - 1)
    return (1.0 - lam)[:, None] * _one_hot(lo, in_canvas) + lam[:, None] * _one_hot(hi, in_canvas)


def _cubic_weights(t):
    """Weights of the taps at offsets −1, 0, 1, 2 for fractional position t, [..., 4]."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return jnp.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def _cubic_matrix(src, n_in, in_canvas):
    base = jnp.floor(src)
    weights = _cubic_weights(src - base)
    taps = jnp.clip(base.astype(jnp.int32)[:, None] + jnp.arange(-1, 3)[None, :], 0, n_in - 1)
    return jnp.einsum("ok,oki->oi", weights, _one_hot(taps, in_canvas))


def axis_matrix(mode, n_in, n_out, step, in_canvas: int, out_canvas: int):
    """Interpolation weights along one axis, [out_canvas, in_canvas] float32.

    mode: AREA / BILINEAR / BICUBIC (may be traced); n_in, n_out: valid sizes (traced
    ints ≥ 1); step: source pixels per output pixel r (traced float).
    """
    n_in = jnp.asarray(n_in, jnp.int32)
    n_out = jnp.asarray(n_out, jnp.int32)
    dst = jnp.minimum(jnp.arange(out_canvas, dtype=jnp.int32), n_out - 1)
    src = jnp.asarray(step, jnp.float32) * (dst.astype(jnp.float32) + 0.5) - 0.5
    area = _area_matrix(dst, n_in, n_out, in_canvas)
    linear = _linear_matrix(src, n_in, in_canvas)
    cubic = _cubic_matrix(src, n_in, in_canvas)
    return jnp.where(mode == AREA, area, jnp.where(mode == BILINEAR, linear, cubic))


def resize(image, mode, in_hw, out_hw, step_hw, out_canvas: tuple[int, int]):
    """Resize the valid region in_hw of image [H, W, C] to out_hw on an out_canvas canvas.

    step_hw: (r_h, r_w) source pixels per output pixel. Returns [out_canvas..., C]
    float32, edge-replicated beyond out_hw. No clamping: bicubic overshoots [0, 1].
    """
    mh = axis_matrix(mode, in_hw[0], out_hw[0], step_hw[0], image.shape[0], out_canvas[0])
    mw = axis_matrix(mode, in_hw[1], out_hw[1], step_hw[1], image.shape[1], out_canvas[1])
    hp = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,hwc->owc", mh, image.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,owc->opc", mw, out, precision=hp)
