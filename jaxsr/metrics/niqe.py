"""NIQE as pyiqa (0.1.16, `pyiqa.archs.niqe_arch`, metric name "niqe") computes it.

    score = niqe(params, images, crop_border=0)     # [B] float32, lower is better

params holds the pristine model, {"mu_pris_param": [36], "cov_pris_param": [36, 36]}
float64, from `jaxsr.convert.metric_niqe.convert`.

Per image, as pyiqa does it:
1. Grey level: Y of YIQ (0.299 R + 0.587 G + 0.114 B) times 255, rounded to integers.
   pyiqa's default colour space for "niqe" is "yiq", not MATLAB's `rgb2ycbcr`
   (16 + 65.481 R + 128.553 G + 24.966 B) that BasicSR's NIQE uses by default.
2. `crop_border` pixels off every edge, then the bottom/right remainder so that the
   image is whole 96x96 blocks (images need at least 96 pixels each way).
3. Two scales: the image, then the image halved by pyiqa's MATLAB-style `imresize`
   (bicubic a = -0.5, antialiased, MATLAB's symmetric border; computed in float32 as
   pyiqa does) with 48x48 blocks, same block grid.
4. MSCN coefficients (x - mu) / (sigma + 1): a 7x7 Gaussian (sigma 7/6, float32
   weights as pyiqa's `fspecial`) local mean and deviation, replicate padding.
5. Per block 18 features: an AGGD fit of the coefficients (shape, mean of the left
   and right scales) and of their products with the block circularly shifted by
   (0, 1), (1, 0), (1, 1), (1, -1) (shape, mean, left and right scales), the shape
   found by nearest match in a 0.2:0.001:10 grid of the moment ratio.
6. A Gaussian fitted to the blocks' 36 features (rows with a NaN left out of the
   covariance, NaNs left out of each mean), and the distance
   sqrt((mu_p - mu) pinv((cov_p + cov) / 2) (mu_p - mu)^T).

Differences from BasicSR's `calculate_niqe` (the other NIQE SR papers quote), kept
because the SeeSR and CoSeR papers report pyiqa's numbers: BasicSR's default grey
level is the Y of MATLAB's `rgb2ycbcr` (16 + 65.481 R + 128.553 G + 24.966 B), not
YIQ's Y, so the two disagree on colour images; BasicSR smooths with the 7x7 window
stored in its `niqe_pris_params.npz` where pyiqa builds one with `fspecial`, and
takes no epsilon inside the local deviation's square root. Both read the pristine
model of the original MATLAB release (see `jaxsr.convert.metric_niqe`).

Precision: pyiqa runs in float64. Here steps 1-5 are jitted float32 JAX, arranged
so that float32 keeps up: the local deviation is summed from differences to the
centre pixel instead of as E[x^2] - E[x]^2 (which cancels 16 bits at grey level
255), and the Gaussian window's float32 sum (1 + 2e-8, not 1) enters as in the
float64 reference, because it alone decides the sign of the coefficients in flat
regions. Step 6 is float64 numpy on the host. Measured against pyiqa on photos:
see tests/test_metric_niqe.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gammaln

BLOCK = 96
_WINDOW, _WINDOW_SIGMA = 7, 7.0 / 6.0
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
_HP = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- constants


@functools.lru_cache(maxsize=1)
def _gaussian_window() -> np.ndarray:
    """pyiqa's `fspecial(7, 7/6)`: built in float64, normalised, stored as float32."""
    m = (_WINDOW - 1) / 2.0
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * _WINDOW_SIGMA**2))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return (h / h.sum()).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _aggd_tables() -> tuple[np.ndarray, ...]:
    """The shape grid 0.2:0.001:10 (the nearest float32 to each value; pyiqa's float32
    torch.arange lands one ulp away at some entries, < 1e-6) and, per grid
    value a, the moment ratio Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)), the scale factor
    sqrt(Gamma(1/a) / Gamma(3/a)) and the mean factor Gamma(2/a) / Gamma(1/a), all
    evaluated in float64 on the float32 grid values."""
    n = math.ceil((10 + 0.001 - 0.2) / 0.001)
    gam = (0.2 + 0.001 * np.arange(n)).astype(np.float32)
    a = gam.astype(np.float64)
    ratio = np.exp(2 * gammaln(2 / a) - (gammaln(1 / a) + gammaln(3 / a)))
    scale = np.sqrt(np.exp(gammaln(1 / a) - gammaln(3 / a)))
    mean = np.exp(gammaln(2 / a) - gammaln(1 / a))
    return gam, ratio, scale, mean


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic (a = -0.5), MATLAB's `imresize` kernel, in x's dtype."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return (near + far).astype(x.dtype)


@functools.lru_cache(maxsize=32)
def half_matrix(in_size: int) -> np.ndarray:
    """[ceil(in/2), in] float32 weights of pyiqa's `imresize(scale=0.5)` along one axis:
    antialiased bicubic (kernel widened 2x), 10 taps per output, weights normalised per
    output, out-of-range taps mirrored MATLAB's way ([a, b, ...] -> [b, a, a, b, ...])."""
    out_size = math.ceil(in_size * 0.5)
    taps = 10  # ceil(4 / 0.5) + 2, as pyiqa's resize_1d
    pos = np.linspace(0, out_size - 1, out_size, dtype=np.float32)
    pos = (pos + np.float32(0.5)) / np.float32(0.5) - np.float32(0.5)
    base = np.floor(pos) - (taps // 2) + 1
    dist = pos - base
    w = _cubic((dist[None, :] - np.arange(taps, dtype=np.float32)[:, None]) * np.float32(0.5))
    w = w / w.sum(axis=0, keepdims=True)
    idx = base.astype(np.int64)[None, :] + np.arange(taps)[:, None]
    idx = np.where(idx < 0, -idx - 1, idx)
    idx = np.where(idx >= in_size, 2 * in_size - 1 - idx, idx)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.broadcast_to(np.arange(out_size), idx.shape), idx), w)
    m.flags.writeable = False
    return m


# ----------------------------------------------------------------------------- per block


def grey_levels(images):
    """[B, H, W, 3] RGB in [0, 1] -> [B, H, W] float32 integers 0..255 (YIQ's Y)."""
    y = jnp.einsum("bhwc,c->bhw", images.astype(jnp.float32),
                   jnp.asarray([0.299, 0.587, 0.114], jnp.float32), precision=_HP)
    return jnp.round(y * 255.0)


def mscn(img):
    """[B, H, W] -> [B, H, W] MSCN coefficients (pyiqa's `normalize_img_with_gauss`,
    replicate padding).

    pyiqa: mu = w * x, var = |w * x^2 - mu^2|, (x - mu) / (sqrt(var + eps) + 1), with
    float32 weights w summing to 1 + delta. Rewritten with e = mu - x:
    e = x delta + sum w (x_j - x), var = sum w (x_j - mu)^2 - delta mu^2, identical in
    exact arithmetic and free of the cancellation float32 cannot afford.
    """
    w = _gaussian_window()
    delta = np.float32(w.astype(np.float64).sum() - 1.0)
    r = _WINDOW // 2
    b, h, wd = img.shape
    pad = jnp.pad(img, ((0, 0), (r, r), (r, r)), mode="edge")
    rows, cols = np.nonzero(w)
    taps = jnp.asarray(w[rows, cols])
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)

    def diff(k):  # x_j - x for the k-th window tap, every pixel at once
        return jax.lax.dynamic_slice(pad, (0, rows[k], cols[k]), (b, h, wd)) - img

    # Loops rather than 49 unrolled terms: the same sums, a fraction of the compile time.
    zero = jnp.zeros_like(img)
    e = img * delta + jax.lax.fori_loop(0, len(taps), lambda k, a: a + taps[k] * diff(k), zero)
    var = jax.lax.fori_loop(0, len(taps), lambda k, a: a + taps[k] * jnp.square(diff(k) - e),
                            zero) - delta * jnp.square(img + e)
    sigma = jnp.sqrt(jnp.abs(var) + np.finfo(np.float64).eps)
    return -e / (sigma + 1.0)


def aggd_fit(x):
    """[N, h, w] -> (grid index, alpha, beta_left, beta_right), each [N]: pyiqa's
    `estimate_aggd_param` (nearest grid shape; NaN scales where a side is empty)."""
    gam, ratio, scale, _ = _aggd_tables()
    left, right = x < 0, x > 0
    count_l = jnp.sum(left, axis=(1, 2)).astype(jnp.float32)
    count_r = jnp.sum(right, axis=(1, 2)).astype(jnp.float32)
    sq = jnp.square(x)
    std_l = jnp.sqrt(jnp.sum(jnp.where(left, sq, 0), axis=(1, 2)) / count_l)
    std_r = jnp.sqrt(jnp.sum(jnp.where(right, sq, 0), axis=(1, 2)) / count_r)
    g = std_l / std_r
    rhat = jnp.square(jnp.mean(jnp.abs(x), axis=(1, 2))) / jnp.mean(sq, axis=(1, 2))
    rhatnorm = rhat * (g**3 + 1) * (g + 1) / jnp.square(g**2 + 1)
    # argmin takes the first NaN, as torch's does, so a NaN fit gives alpha = 0.2.
    pos = jnp.argmin(jnp.abs(jnp.asarray(ratio, jnp.float32)[None, :] - rhatnorm[:, None]),
                     axis=1)
    factor = jnp.asarray(scale, jnp.float32)[pos]
    return pos, jnp.asarray(gam)[pos], std_l * factor, std_r * factor


def block_features(blocks):
    """[N, h, w] MSCN blocks -> [N, 18] pyiqa NIQE features."""
    mean_factor = jnp.asarray(_aggd_tables()[3], jnp.float32)
    n = blocks.shape[0]
    # the block and its four neighbour products, fitted in one batch
    fits = jnp.concatenate([blocks] + [blocks * jnp.roll(blocks, shift, axis=(1, 2))
                                       for shift in _SHIFTS])
    pos, alpha, bl, br = (v.reshape(1 + len(_SHIFTS), n) for v in aggd_fit(fits))
    feats = [alpha[0], (bl[0] + br[0]) / 2]
    for k in range(1, 1 + len(_SHIFTS)):
        feats += [alpha[k], (br[k] - bl[k]) * mean_factor[pos[k]], bl[k], br[k]]
    return jnp.stack(feats, axis=-1)


def _blocks(img, size: int):
    """[B, nh*size, nw*size] -> [B, nh*nw, size, size], blocks in pyiqa's order
    (column-major over the block grid)."""
    b, h, w = img.shape
    nh, nw = h // size, w // size
    x = img.reshape(b, nh, size, nw, size).transpose(0, 3, 1, 2, 4)
    return x.reshape(b, nw * nh, size, size)


@functools.partial(jax.jit, static_argnames=("crop_border",))
def niqe_features(images, *, crop_border: int = 0):
    """[B, H, W, 3] RGB in [0, 1] -> [B, N, 36] float32 block features (scale 1 then
    scale 2), N = (H' // 96) * (W' // 96) for H', W' after the border crop."""
    y = grey_levels(images)
    if crop_border:
        y = y[:, crop_border:-crop_border, crop_border:-crop_border]
    _, h, w = y.shape
    if h < BLOCK or w < BLOCK:
        raise ValueError(f"NIQE needs at least {BLOCK}x{BLOCK} pixels after the border crop "
                         f"of {crop_border}, got {h}x{w}")
    h, w = h // BLOCK * BLOCK, w // BLOCK * BLOCK
    y = y[:, :h, :w]
    b = y.shape[0]
    f1 = block_features(_blocks(mscn(y), BLOCK).reshape(-1, BLOCK, BLOCK))
    # pyiqa halves img / 255 in float32 and multiplies back by 255
    half = jnp.einsum("oh,bhw->bow", jnp.asarray(half_matrix(h)), y / 255.0, precision=_HP)
    half = jnp.einsum("pw,bow->bop", jnp.asarray(half_matrix(w)), half, precision=_HP) * 255.0
    s = BLOCK // 2
    f2 = block_features(_blocks(mscn(half), s).reshape(-1, s, s))
    return jnp.concatenate([f1.reshape(b, -1, 18), f2.reshape(b, -1, 18)], axis=-1)


# ----------------------------------------------------------------------------- distance


def _pinv(a: np.ndarray) -> np.ndarray:
    """torch.linalg.pinv's default: SVD, singular values below max(m, n) * eps * s_max
    dropped."""
    u, s, vt = np.linalg.svd(a)
    keep = s > max(a.shape) * np.finfo(a.dtype).eps * s.max()
    return (vt[keep].T / s[keep]) @ u[:, keep].T


def niqe_distance(features, mu_pris, cov_pris) -> float:
    """[N, 36] block features of one image -> NIQE, float64 numpy (pyiqa's tail:
    nanmean, NaN rows out of the covariance, pinv of the averaged covariance).
    NaN when no block row is free of NaN (a flat image)."""
    f = np.asarray(features, np.float64)
    valid = ~np.isnan(f)
    rows = f[valid.all(axis=1)]
    if len(rows) == 0 or not valid.any(axis=0).all():
        # Every block flat (no coefficient on one side of zero): no Gaussian to fit.
        # pyiqa fails inside its SVD here; one such image should not end a whole eval.
        return float("nan")
    mu = np.where(valid, f, 0).sum(0) / valid.sum(0)
    cov = np.cov(rows, rowvar=False, ddof=1 if len(rows) > 1 else 0)
    diff = np.asarray(mu_pris, np.float64).reshape(-1) - mu
    inv = _pinv((np.asarray(cov_pris, np.float64) + cov) / 2)
    return float(np.sqrt(diff @ inv @ diff))


def niqe(params, images, *, crop_border: int = 0) -> np.ndarray:
    """NIQE per image, pyiqa's "niqe" metric.

    params: {"mu_pris_param": [36], "cov_pris_param": [36, 36]}.
    images: [B, H, W, 3] RGB in [0, 1]; H, W >= 96 + 2 crop_border.
    Returns float32 [B] (numpy; the final Gaussian distance runs in float64 on the host),
    NaN for an image without texture (e.g. one flat colour), where pyiqa raises.
    """
    feats = np.asarray(niqe_features(jnp.asarray(images), crop_border=int(crop_border)))
    mu, cov = params["mu_pris_param"], params["cov_pris_param"]
    return np.asarray([niqe_distance(f, mu, cov) for f in feats], np.float32)
