"""The attention backends agree with a plain numpy softmax attention."""

import jax
import numpy as np
import pytest

from jaxsr.nn import attention
from tests.parity import rel_err


def numpy_attention(q, k, v, mask=None):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("lq,lk", [(77, 77), (1030, 77), (1024, 1024), (1300, 145)])
def test_xla_backend_matches_numpy(lq, lk):
    rng = np.random.default_rng(lq + lk)
    q = rng.standard_normal((2, lq, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, lk, 3, 16)).astype(np.float32)
    v = rng.standard_normal((2, lk, 3, 16)).astype(np.float32)
    out = jax.jit(attention.dot_product_attention)(q, k, v)
    assert out.shape == (2, lq, 3, 16)
    assert rel_err(out, numpy_attention(q, k, v)) <= 1e-5


def test_masked_and_dpa_backends_match_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 77, 2, 8)).astype(np.float32) for _ in range(3))
    causal = np.tril(np.ones((77, 77), bool))[None, None]
    want = numpy_attention(q, k, v, causal)
    assert rel_err(attention.dot_product_attention(q, k, v, mask=causal), want) <= 1e-5
    assert rel_err(attention.dot_product_attention(q, k, v, mask=causal, backend="dpa"),
                   want) <= 1e-5


def test_backend_resolution():
    from jaxsr.nn.cpu_attention import fused_cpu_attention_preferred

    on_cpu = "fused_cpu" if fused_cpu_attention_preferred() else "xla"
    assert attention.resolve_backend("auto", 4096) == (
        "cudnn" if jax.default_backend() == "gpu" else on_cpu)
    assert attention.resolve_backend("auto", 77) == (
        "xla" if jax.default_backend() == "gpu" else on_cpu)
    assert attention.resolve_backend("cudnn", 77) == "xla"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve_backend("flash9", 10)


@pytest.mark.parametrize("per_head,chunk", [(True, 128), (False, 128), (False, 300)])
def test_block_layouts_match_numpy(per_head, chunk):
    """Per-(batch, head) chunks (CPU), all-heads chunks (accelerators) and one block
    of all heads; 300 query rows are not a multiple of 128, so the padding rows are
    cut off again."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 300, 3, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 200, 3, 16)).astype(np.float32) for _ in range(2))
    out = jax.jit(attention._blocked_attention, static_argnums=(3, 4, 5))(
        q, k, v, 0.25, chunk, per_head)
    assert out.shape == q.shape
    assert rel_err(out, numpy_attention(q, k, v)) <= 1e-5


@pytest.mark.parametrize("on_cpu", [True, False])
@pytest.mark.parametrize("h,lq,lk", [(5, 4096, 4096), (5, 4096, 77), (10, 1024, 1024),
                                     (20, 256, 256), (5, 65536, 77), (5, 4100, 4096)])
def test_attention_plan_bounds_the_logits(h, lq, lk, on_cpu):
    """Small logits go in one block; larger ones in steps that hold at most the step
    budget (per (batch, head) pair on the CPU, all heads elsewhere, where a step takes
    at least Q_CHUNK rows), with fewer than 8 padding rows a step. The plan has no
    batch size to depend on."""
    per_head, chunk = attention.attention_plan(h, lq, lk, on_cpu)
    if h * lq * lk <= attention.MAX_ITEM_LOGITS:
        assert (per_head, chunk) == (False, lq)
        return
    steps = -(-lq // chunk)
    assert per_head == on_cpu
    assert steps > 1 or per_head      # one step per pair still loops over the pairs
    assert chunk == lq or (chunk % 8 == 0 and steps * chunk - lq < 8 * steps)
    if on_cpu:
        assert chunk * lk <= attention.CPU_STEP_LOGITS
    else:
        assert chunk >= min(attention.Q_CHUNK, lq)
        assert chunk * h * lk <= max(attention.MAX_ITEM_LOGITS, attention.Q_CHUNK * h * lk)


def test_a_batch_item_does_not_depend_on_the_batch():
    """Batch 1 and batch 3 take the same blocks, so item 0 comes out bit-identical
    (jaxsr sr promises the same image whatever --batch-size)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((3, 1024, 4, 16)).astype(np.float32) for _ in range(3))
    one = jax.jit(attention.dot_product_attention)(q[:1], k[:1], v[:1])
    three = jax.jit(attention.dot_product_attention)(q, k, v)
    np.testing.assert_array_equal(np.asarray(one)[0], np.asarray(three)[0])
