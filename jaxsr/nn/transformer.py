"""diffusers Transformer2DModel / BasicTransformerBlock (SD2 form) on NHWC maps.

SeeSR's RCA blocks (`image_attentions`) are this same module with a 512-wide
context, so both the text and the image cross-attention use it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.attention import Attention
from jaxsr.nn.chunks import balanced_chunk, map_row_chunks
from jaxsr.nn.layers import GroupNorm, LayerNorm
from jaxsr.platform import target_backend

# Feed-forward hidden floats per batch item and `lax.map` step on the CPU ([rows, 8C]
# after net_0/proj, 8 MB in float32; per item, so the steps and an image's result do
# not depend on the batch size): the SD2 UNet's feed-forward at 512 px, batch 2, ran
# 1.25-1.5x faster in such steps than in one piece, whose [B, L, 8C] hidden tensor
# (84 MB at the 64² level) goes through memory between the projection, the GELU and
# net_2.
CPU_FF_STEP_FLOATS = 1 << 21
# ... but never fewer rows per step than this: at the 16² level (256 rows of a 1280-wide
# layer) 128-row steps made the feed-forward 1.2x slower than one piece on an Intel
# Xeon (127 vs 104 ms; PyTorch 99), whose [256, 10240] hidden block fits its caches.
CPU_FF_MIN_STEP_ROWS = 256


def geglu_feed_forward(x, w_in, b_in, w_out, b_out, dtype):
    """value·GELU(gate) MLP on rows, with the exact erf GELU.

    x [..., C]; w_in [C, 8C] (value columns, then gate columns), b_in [8C];
    w_out [4C, C], b_out [C] -> [..., C]. Operands are cast to `dtype`, as nn.Dense does.
    """
    x, w_in, b_in, w_out, b_out = (t.astype(dtype) for t in (x, w_in, b_in, w_out, b_out))
    value, gate = jnp.split(x @ w_in + b_in, 2, -1)
    return (value * jax.nn.gelu(gate, approximate=False)) @ w_out + b_out


class _DenseParams(nn.Module):
    """nn.Dense's variables (kernel [in, out], bias [out], same initialisers) without
    applying them, so that a pure function can use them inside `lax.map`."""

    features: int

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


class _GEGLUParams(nn.Module):
    features: int

    @nn.compact
    def __call__(self, in_features: int):
        return _DenseParams(self.features, name="proj")(in_features)


class GEGLUFeedForward(nn.Module):
    """net_0/proj: C → 2·4C, split into (value, gate); value·GELU(gate) with the
    exact erf GELU; net_2: 4C → C. x [B, L, C] -> [B, L, C].

    On the CPU, long sequences go through in steps of rows (`CPU_FF_STEP_FLOATS`);
    each row is computed the same way either way.
    """

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        _, length, c = x.shape
        inner = c * self.mult
        w_in, b_in = _GEGLUParams(2 * inner, name="net_0")(c)
        w_out, b_out = _DenseParams(c, name="net_2")(inner)
        ff = lambda rows: geglu_feed_forward(rows, w_in, b_in, w_out, b_out, self.dtype)
        if target_backend() != "cpu":
            return ff(x)
        rows = max(CPU_FF_MIN_STEP_ROWS, CPU_FF_STEP_FLOATS // (2 * inner))
        return map_row_chunks(ff, x, balanced_chunk(length, rows))


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN x); x += attn2(LN x, context); x += ff(LN x). x: [B, L, C]."""

    heads: int
    head_dim: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        attn = lambda name: Attention(self.heads, self.head_dim, attention=self.attention,
                                      dtype=self.dtype, name=name)
        x = x + attn("attn1")(LayerNorm(1e-5, self.dtype, name="norm1")(x))
        x = x + attn("attn2")(LayerNorm(1e-5, self.dtype, name="norm2")(x), context)
        return x + GEGLUFeedForward(dtype=self.dtype, name="ff")(
            LayerNorm(1e-5, self.dtype, name="norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm → proj_in → one BasicTransformerBlock → proj_out, plus the input.

    x: [B, H, W, C]; context: [B, Lc, Cc]. `use_linear_projection` (SD2) makes
    proj_in/proj_out Linear layers applied after flattening; otherwise 1×1 convs.
    """

    heads: int
    head_dim: int
    use_linear_projection: bool = True
    groups: int = 32
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        y = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
        if self.use_linear_projection:
            y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            y = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(y).reshape(b, h * w, inner)
        y = BasicTransformerBlock(self.heads, self.head_dim, self.attention, self.dtype,
                                  name="transformer_blocks_0")(y, context.astype(self.dtype))
        if self.use_linear_projection:
            y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(y.reshape(b, h, w, inner))
        return y + x
