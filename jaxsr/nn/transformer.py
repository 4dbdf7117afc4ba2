"""diffusers Transformer2DModel / BasicTransformerBlock (SD2 form) on NHWC maps.

SeeSR's RCA blocks (`image_attentions`) are this same module with a 512-wide
context, so both the text and the image cross-attention use it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxsr.nn.attention import Attention
from jaxsr.nn.layers import GroupNorm, LayerNorm


class GEGLUFeedForward(nn.Module):
    """net_0/proj: C → 2·4C, split into (value, gate); value·GELU(gate) with the
    exact erf GELU; net_2: 4C → C."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _GEGLU(x.shape[-1] * self.mult, self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class _GEGLU(nn.Module):
    inner: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, -1)
        return value * nn.gelu(gate, approximate=False)


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
