"""Static canvases holding an image of traced size.

Inside `jax.jit` shapes are static, but a random resize gives a random size. A
stage's output is therefore stored on a canvas of the largest size that stage can
produce, with the image's valid region (h, w), traced int32 scalars, at the top
left. Every stage reads only the valid region; where it needs pixels beyond it,
it builds them from the valid region:

- `reflect_index`: reflect padding about the valid region's borders (the
  convolutions, as the reference pads with torch's "reflect");
- `replicate_edges`: the canvas beyond the valid region replaced by copies of the
  last valid row/column (JPEG, as libjpeg pads partial blocks this way).
"""

from __future__ import annotations

import jax.numpy as jnp


def reflect_index(index, n):
    """Reflect integer positions into [0, n) without repeating the edge (torch "reflect").

    index: int array of any shape (may lie far outside, it reflects repeatedly);
    n: traced or static int ≥ 1. Returns int32 indices in [0, n).
    """
    index = jnp.asarray(index, jnp.int32)
    n = jnp.asarray(n, jnp.int32)
    period = jnp.maximum(2 * (n - 1), 1)
    m = jnp.mod(index, period)
    return jnp.minimum(jnp.where(m < n, m, period - m), n - 1)


def replicate_edges(image, valid_hw):
    """Copy the last valid row/column over the rest of the canvas.

    image: [H, W, C] canvas; valid_hw: (h, w) traced ints. Returns [H, W, C].
    """
    height, width = image.shape[:2]
    rows = jnp.minimum(jnp.arange(height), valid_hw[0] - 1)
    cols = jnp.minimum(jnp.arange(width), valid_hw[1] - 1)
    return image[rows][:, cols]


def valid_mask(shape_hw, valid_hw):
    """[H, W] bool, True inside the valid region."""
    rows = jnp.arange(shape_hw[0])[:, None] < valid_hw[0]
    cols = jnp.arange(shape_hw[1])[None, :] < valid_hw[1]
    return rows & cols
