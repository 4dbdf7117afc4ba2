"""Scaled dot-product attention with selectable backends, and the diffusers-style
`Attention` layer (to_q / to_k / to_v / to_out_0) built on it.

Backends (the `attention` config string):
  "xla"   matmul-softmax-matmul in XLA ops; logits and softmax in float32, works everywhere.
  "dpa"   `jax.nn.dot_product_attention` (lets XLA pick; cuDNN flash on GPU).
  "cudnn" `jax.nn.dot_product_attention(implementation="cudnn")`; GPU only.
  "fused_cpu" jaxsr's fused CPU kernel (jaxsr/kernels/cpu_attention.cc, an XLA FFI
          call): online softmax over key blocks held in cache; no mask; head size
          32, 64 or 128; CPU only.
  "auto"  "cudnn" on GPU for long key sequences; "fused_cpu" on CPUs where its
          code path was measured faster than XLA's ops (AVX-512); "xla" otherwise,
          and wherever the fused kernel cannot take the call (a mask, another
          head size).
Short key sequences (77 text tokens, 145 DAPE tokens) gain nothing from cuDNN's
flash kernels, so "auto" and "cudnn" fall back to "xla" there below
`MIN_FLASH_KV_LEN`; the fused CPU kernel is nowhere slower than XLA's ops at the
lengths it was timed at (77 to 4096 keys), so "auto" takes it at every length.

The "xla" backend computes unmasked attention in blocks shaped by the size of
the logits (`attention_plan`). Up to `MAX_ITEM_LOGITS` logits per batch item (8 MB
in float32; at 512 px every cross-attention with 77 text tokens and the
self-attention of the 16² and 8² levels) it takes one block of all heads, no
loop. The plan does not depend on the batch size, so an image's result does not
either. Above that it loops over query chunks (`lax.map`), so the logits never form
a [Lq, Lk] tensor per head (4096² floats per head at 512 px, 65536² at 2048 px)
and memory stays bounded everywhere. On CPU a step takes the query rows of one
(batch, head) pair whose logits fill `CPU_STEP_LOGITS` (256 rows at 4096 keys),
which stay in the last-level cache across the softmax passes; SD's 4096-token
self-attention then takes 1.2-1.5x the time of PyTorch's fused CPU kernel, where
chunks of all heads took 1.8x and unchunked attention 3x
(benchmarks/unet_forward_cpu.py). Elsewhere a step takes at least `Q_CHUNK` rows
of every head, keeping the loop short. Every block scales the queries instead of
the logits and normalises after the value product (one pass less over the logits
each); the result equals plain softmax attention to float32 rounding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.chunks import balanced_chunk
from jaxsr.nn.cpu_attention import (
    fused_cpu_attention,
    fused_cpu_attention_preferred,
    fused_cpu_attention_supported,
)
from jaxsr.platform import target_backend

BACKENDS = ("auto", "xla", "dpa", "cudnn", "fused_cpu")
MIN_FLASH_KV_LEN = 256
Q_CHUNK = 128
MAX_ITEM_LOGITS = 1 << 21
CPU_STEP_LOGITS = 1 << 20


def _xla_attention(q, k, v, mask, scale):
    # Logits in float32: bf16 logits lose the small differences softmax amplifies.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _softmax_block(qc, kt, vt):
    """One block of unmasked attention, the logit scale already applied to the queries.

    qc [..., n, D]; kt [..., D, Lk]; vt [..., Lk, D] -> [..., n, D].
    """
    s = jnp.matmul(qc, kt, preferred_element_type=jnp.float32)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    out = jnp.matmul(e.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(vt.dtype)


def attention_plan(h: int, lq: int, lk: int, on_cpu: bool) -> tuple[bool, int]:
    """(per_head, chunk): how `_blocked_attention` splits [B, H, Lq, Lk] logits, the
    same for every batch size B.

    chunk == lq with per_head False is one block of all heads, no loop.
    """
    if h * lq * lk <= MAX_ITEM_LOGITS:
        return False, lq
    if on_cpu:
        return True, balanced_chunk(lq, CPU_STEP_LOGITS // lk)
    return False, balanced_chunk(lq, max(Q_CHUNK, MAX_ITEM_LOGITS // (h * lk)))


def _blocked_attention(q, k, v, scale, chunk: int, per_head: bool):
    """Unmasked attention in query chunks. q [B, Lq, H, D]; k, v [B, Lk, H, D].

    per_head=False: a step takes `chunk` query rows of every head ([B, H, chunk, Lk]
    logits); chunk >= Lq is a single step without a loop. per_head=True: a step takes
    `chunk` rows of one (batch, head) pair, so its [chunk, Lk] logits stay in the
    CPU's cache between the max, exp, sum and value passes (4 MB at chunk 256, Lk
    4096) instead of going to memory.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    chunk = min(chunk, lq)
    pad = -lq % chunk
    n = (lq + pad) // chunk
    # Scaling the queries once costs a pass over q instead of one over each block's
    # logits (exact for D = 64, whose scale is 1/8).
    q = (q * jnp.asarray(scale, jnp.float32)).astype(q.dtype)
    qt = jnp.transpose(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))), (0, 2, 1, 3))
    kt = jnp.transpose(k, (0, 2, 3, 1))          # [B, H, D, Lk]
    vt = jnp.transpose(v, (0, 2, 1, 3))          # [B, H, Lk, D]
    if per_head:
        # Outer loop over (batch, head) pairs, inner over their query chunks: a
        # pair's K and V are sliced once, not once per chunk.
        def one_pair(args):                      # [n, chunk, D], [D, Lk], [Lk, D]
            qp, kp, vp = args
            return jax.lax.map(lambda qc: _softmax_block(qc, kp, vp), qp)

        out = jax.lax.map(one_pair, (qt.reshape(b * h, n, chunk, d),
                                     kt.reshape(b * h, d, lk), vt.reshape(b * h, lk, d)))
        out = out.reshape(b, h, n * chunk, d)
    elif n == 1:
        out = _softmax_block(qt, kt, vt)
    else:
        qt = jnp.moveaxis(qt.reshape(b, h, n, chunk, d), 2, 0)
        out = jax.lax.map(lambda qc: _softmax_block(qc, kt, vt), qt)
        out = jnp.moveaxis(out, 0, 2).reshape(b, h, n * chunk, d)
    return jnp.transpose(out[:, :, :lq], (0, 2, 1, 3))


def _xla_unmasked_attention(q, k, v, *, scale):
    _, lq, h, _ = q.shape
    per_head, chunk = attention_plan(h, lq, k.shape[1], target_backend() == "cpu")
    return _blocked_attention(q, k, v, scale, chunk, per_head)


def resolve_backend(backend: str, kv_len: int) -> str:
    """The concrete implementation `backend` means for a key sequence of `kv_len`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    platform = target_backend()
    if backend == "auto":
        if platform == "gpu" and kv_len >= MIN_FLASH_KV_LEN:
            return "cudnn"
        if platform == "cpu" and fused_cpu_attention_preferred():
            return "fused_cpu"
        return "xla"
    if backend == "cudnn" and kv_len < MIN_FLASH_KV_LEN:
        return "xla"
    if backend == "fused_cpu" and platform != "cpu":
        raise ValueError(f"attention backend 'fused_cpu' runs on the CPU only, not {platform}")
    return backend


def dot_product_attention(q, k, v, *, mask=None, backend: str = "xla", scale=None):
    """Multi-head attention.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
      backend: see module docstring.
      scale: logit scale, default D**-0.5.
    Returns:
      [B, Lq, H, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_backend(backend, k.shape[1])
    if impl == "fused_cpu":
        why_not = fused_cpu_attention_supported(q, k, mask)
        if why_not is None:
            return fused_cpu_attention(q, k, v, scale, functools.partial(
                _xla_unmasked_attention, scale=scale))
        if backend == "fused_cpu":
            raise ValueError(f"attention backend 'fused_cpu' cannot take this call: {why_not}")
        impl = "xla"
    if impl == "xla":
        if mask is None:
            return _xla_unmasked_attention(q, k, v, scale=scale)
        return _xla_attention(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale,
        implementation="cudnn" if impl == "cudnn" else None,
    )


class Attention(nn.Module):
    """diffusers `Attention`: projections to_q/to_k/to_v, output to_out_0.

    Inputs [B, L, C] (and context [B, Lc, Cc] for cross-attention); output [B, L, out_dim].
    """

    heads: int
    head_dim: int
    out_dim: int | None = None
    qkv_bias: bool = False
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        inner = self.heads * self.head_dim
        context = x if context is None else context
        dense = lambda n, f, b: nn.Dense(f, use_bias=b, dtype=self.dtype, name=n)
        q = dense("to_q", inner, self.qkv_bias)(x)
        k = dense("to_k", inner, self.qkv_bias)(context)
        v = dense("to_v", inner, self.qkv_bias)(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
        out = dot_product_attention(split(q), split(k), split(v), mask=mask,
                                    backend=self.attention)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return dense("to_out_0", self.out_dim or x.shape[-1], True)(out)
