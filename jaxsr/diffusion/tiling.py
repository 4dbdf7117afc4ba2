"""SeeSR's latent tiling for large images (pipeline_seesr.py, tiled branch).

When the latent has more than T² pixels (T = `latent_tiled_size`, 96 in
test_seesr.py; 256 when no args are passed, as from gradio), the ControlNet+UNet
runs on square T×T latent tiles and the noise predictions are blended with
Gaussian weights:

- T shrinks to min(T, h, w);
- along each axis the tile count is the smallest n with (n−1)(T−o)+T ≥ size,
  offsets are i·(T−o), and the last tile is flushed to size − T;
- the ControlNet image tile is the same box at ×8 (pixel) coordinates;
- ε = Σ wt·ε_tile / Σ wt, with wt = outer(wy, wx), Gaussians of variance 0.01 in
  units of T whose midpoints differ: (T−1)/2 along x (columns) but T/2 along y
  (rows), exactly as the reference writes them.

Everything about the grid is static Python; `tiled_apply` runs the tiles
sequentially in a `lax.scan` inside jit, so only one tile's activations are
alive at a time, and `fn` is traced once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_WEIGHT_VAR = 0.01


class TileGrid(NamedTuple):
    """Static tiling of an [h, w] latent: (y0, x0) offsets in the reference's order
    (x outer, y inner) and the effective square tile size."""

    offsets: tuple[tuple[int, int], ...]
    tile: int


def needs_tiling(h: int, w: int, tile: int) -> bool:
    """The reference tiles only when the latent area exceeds tile²."""
    return h * w > tile * tile


def _axis_offsets(size: int, tile: int, overlap: int) -> list[int]:
    stride = tile - overlap
    n = 1 if size <= tile else 1 + math.ceil((size - tile) / stride)
    return [i * stride for i in range(n - 1)] + [size - tile]


def tile_grid(h: int, w: int, tile: int = 96, overlap: int = 4) -> TileGrid:
    """Tile offsets for an h×w latent; see the module docstring for the rules."""
    if h <= 0 or w <= 0 or tile <= 0 or overlap < 0:
        raise ValueError(f"tile_grid: bad arguments h={h} w={w} tile={tile} overlap={overlap}")
    t = min(tile, h, w)
    if overlap >= t:
        # The reference loops forever here; refuse instead.
        raise ValueError(f"latent tile overlap {overlap} must be smaller than the tile size {t} "
                         f"(tile={tile} shrunk to the latent's short side)")
    ys = _axis_offsets(h, t, overlap)
    xs = _axis_offsets(w, t, overlap)
    return TileGrid(tuple((y, x) for x in xs for y in ys), t)


def tile_weights(tile: int) -> np.ndarray:
    """[T, T] float64 blending weights, rows = y: outer(wy, wx).

    wx[i] = exp(−(i − (T−1)/2)² / T² / (2·0.01)) / √(2π·0.01), wy the same with
    midpoint T/2 (the reference's asymmetry, kept on purpose).
    """
    t = tile

    def gauss(mid):
        i = np.arange(t, dtype=np.float64)
        return np.exp(-(i - mid) * (i - mid) / (t * t) / (2 * _WEIGHT_VAR)) / np.sqrt(
            2 * np.pi * _WEIGHT_VAR)

    return np.outer(gauss(t / 2), gauss((t - 1) / 2))


def weight_sum(h: int, w: int, grid: TileGrid) -> np.ndarray:
    """Σ wt over all tiles, [h, w] float32, accumulated in the reference's tile order."""
    t = grid.tile
    wt = tile_weights(t).astype(np.float32)
    total = np.zeros((h, w), np.float32)
    for y, x in grid.offsets:
        total[y:y + t, x:x + t] += wt
    return total


def tiled_apply(fn: Callable, latent, cond_image=None, tile: int = 96, overlap: int = 4, *,
                cond_scale: int = 8):
    """Run `fn(latent_tile, cond_tile)` over the tile grid and blend the outputs.

    latent: [B, h, w, C]; cond_image: [B, h·cond_scale, w·cond_scale, Cc] or None
    (then fn gets None). fn must return [B', T, T, C'] for a [B, T, T, C] tile
    (B' may differ, e.g. when fn does classifier-free guidance internally).
    Returns float32 [B', h, w, C'] = Σ wt·fn(tile) / Σ wt, accumulated in float32.
    Tiles run one after another (`lax.scan`): peak memory is one tile's working
    set plus the float32 accumulator.
    """
    b, h, w, c = latent.shape
    if cond_image is not None and cond_image.shape[1:3] != (h * cond_scale, w * cond_scale):
        raise ValueError(f"cond_image {cond_image.shape} is not ×{cond_scale} the latent "
                         f"{latent.shape}")
    grid = tile_grid(h, w, tile, overlap)
    t = grid.tile

    def crop(y, x):
        lt = jax.lax.dynamic_slice(latent, (0, y, x, 0), (b, t, t, c))
        if cond_image is None:
            return lt, None
        s = cond_scale
        ct = jax.lax.dynamic_slice(cond_image, (0, y * s, x * s, 0),
                                   (cond_image.shape[0], t * s, t * s, cond_image.shape[3]))
        return lt, ct

    out_shape = jax.eval_shape(lambda: fn(*crop(0, 0)))
    bo, th, tw, co = out_shape.shape
    if (th, tw) != (t, t):
        raise ValueError(f"tiled_apply: fn returned {out_shape.shape} for a {t}×{t} tile")
    wt = jnp.asarray(tile_weights(t), jnp.float32)[None, :, :, None]

    def step(acc, offset):
        y, x = offset[0], offset[1]
        out = fn(*crop(y, x)).astype(jnp.float32)
        region = jax.lax.dynamic_slice(acc, (0, y, x, 0), (bo, t, t, co))
        return jax.lax.dynamic_update_slice(acc, region + out * wt, (0, y, x, 0)), None

    offsets = jnp.asarray(np.array(grid.offsets, np.int32).reshape(-1, 2))
    acc = jnp.zeros((bo, h, w, co), jnp.float32)
    acc, _ = jax.lax.scan(step, acc, offsets)
    return acc / jnp.asarray(weight_sum(h, w, grid))[None, :, :, None]


def maybe_tiled_apply(fn: Callable, latent, cond_image=None, tile: int = 96, overlap: int = 4,
                      *, cond_scale: int = 8):
    """The reference's switch: fn on the whole latent unless h·w > tile², else `tiled_apply`.

    The untiled branch returns fn's output as is (the reference does not upcast it).
    """
    h, w = latent.shape[1:3]
    if not needs_tiling(h, w, tile):
        return fn(latent, cond_image)
    return tiled_apply(fn, latent, cond_image, tile, overlap, cond_scale=cond_scale)
