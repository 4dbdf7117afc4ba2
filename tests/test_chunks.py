"""Row chunking for lax.map steps (jaxsr.nn.chunks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsr.nn.chunks import balanced_chunk, map_row_chunks


@pytest.mark.parametrize("length,max_rows", [(4096, 256), (300, 128), (1024, 200), (77, 4096),
                                             (5, 8), (16384, 13)])
def test_balanced_chunk_takes_fewest_even_steps(length, max_rows):
    rows = balanced_chunk(length, max_rows)
    if length <= max(8, max_rows // 8 * 8):
        assert rows == length
        return
    steps = -(-length // rows)
    assert rows % 8 == 0 and rows <= max(8, max_rows // 8 * 8)
    assert steps == -(-length // max(8, max_rows // 8 * 8))      # no more steps than needed
    assert steps * rows - length < 8 * steps                      # padding < 8 rows a step


def test_map_row_chunks_equals_one_piece():
    """Padding rows (300 is not a multiple of 64) are cut off, and an op that is not
    row-wise across the batch axis still sees whole batches."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 300, 5)), jnp.float32)
    fn = lambda t: jnp.tanh(t) * t.sum(axis=(0, 2), keepdims=True)
    out = jax.jit(lambda t: map_row_chunks(fn, t, 64))(x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, fn(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(map_row_chunks(fn, x, 300), fn(x))   # one step: no loop
