"""Splitting a long axis into evenly sized steps for `lax.map`.

On the CPU, ops whose intermediates outgrow the last-level cache run faster a
slice of rows at a time (benchmarks/unet_forward_cpu.py): the attention in
jaxsr.nn.attention and the transformer feed-forward in jaxsr.nn.transformer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def balanced_chunk(length: int, max_rows: int) -> int:
    """Rows per step: the fewest steps of at most `max_rows` (rounded down to a
    multiple of 8, at least 8), then the steps evened out, so padding wastes fewer
    than 8 rows a step. Returns `length` when one step takes it all."""
    steps = -(-length // max(8, max_rows // 8 * 8))
    if steps == 1:
        return length
    rows = -(-length // steps)
    return -(-rows // 8) * 8


def map_row_chunks(fn, x, rows: int):
    """fn applied to `rows`-long slices of x's axis 1, one `lax.map` step each.

    fn must treat rows independently ([B, rows, ...] -> [B, rows, ...]); x's axis 1
    is zero-padded to a multiple of `rows` and the padding cut off again.
    """
    b, length = x.shape[:2]
    if rows >= length:
        return fn(x)
    pad = -length % rows
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    steps = x.reshape(b, -1, rows, *x.shape[2:]).swapaxes(0, 1)   # [n, B, rows, ...]
    out = jax.lax.map(fn, steps)
    return out.swapaxes(0, 1).reshape(b, length + pad, *out.shape[3:])[:, :length]
