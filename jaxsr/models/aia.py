"""CoSeR's All-in-Attention transformer (LDM `SpatialTransformerV8_refV5`) on NHWC maps.

An SD2 Transformer2DModel whose single block first reads two ControlNet features of
the same resolution: X (from the LR latent) and R (from the reference latent).

    x   = proj_in(GN(h))                                   tokens [B, L, C]
    x_c = proj_in_clr_lna(GN_clr(D(X)))                    LR tokens
    r_c = GN_cref(D_r(R))                                  reference tokens (see below)
    x  += zero_conv_r_lna(attn4_ref_lna(q=x_c, kv=r_c))    argmax attention
    x  += zero_conv_lna(attn3_lr_lna(q=norm4_lna(x), kv=x_c))   softmax attention
    x  += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x)
    out = proj_out(x) + h

D / D_r are 3×3 convs (`dubconv_lna` / `dubconv_r_lna`, C/2 → C) in the two "dubch"
decoder blocks whose feature comes from a narrower level, identity elsewhere. The
zero convs are 1×1 convs, i.e. per-token linear maps.

`reference_attention` picks the reference branch:
  "released"  what CoSeR's released weights were trained with: r_c is NOT projected
              (a `use_linear` branch in the original skips `proj_in_cref_lna`), and
              attn4 returns s_ij*·v_j* (hard argmax scaled by the raw maximum logit).
  "paper"     r_c = proj_in_cref_lna(GN_cref(D_r(R))), and attn4 selects v_j* one-hot
              in the forward pass with a softmax straight-through gradient
              (jaxsr.nn.hard_attention). Released weights load, but were not trained
              this way: the mode is for retraining.

With no X/R (`lr_feature=None`), the module is the plain SD transformer (CoSeR's
`gen_mode`, used to generate the reference image). Dead parameters of the released
checkpoints (`norm5_lna`, and `proj_in_cref_lna` in "released" mode) are created at
init so conversion stays strict, but are never computed in `apply`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxsr.nn.attention import Attention
from jaxsr.nn.hard_attention import SELECTIONS, argmax_attention
from jaxsr.nn.layers import GroupNorm, LayerNorm, conv
from jaxsr.nn.transformer import BasicTransformerBlock

REFERENCE_ATTENTION_MODES = SELECTIONS


class ReferenceAttention(nn.Module):
    """`attn4_ref_lna`: to_q/to_k/to_v (no bias) → per-head argmax attention → to_out_0.

    x: [B, L, C] queries (LR tokens); context: [B, Lr, C] (reference tokens).
    Returns [B, L, C].
    """

    heads: int
    head_dim: int
    selection: str = "released"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        inner = self.heads * self.head_dim
        dense = lambda n, f, b: nn.Dense(f, use_bias=b, dtype=self.dtype, name=n)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
        q = split(dense("to_q", inner, False)(x))
        k = split(dense("to_k", inner, False)(context))
        v = split(dense("to_v", inner, False)(context))
        out = argmax_attention(q, k, v, selection=self.selection)
        return dense("to_out_0", x.shape[-1], True)(out.reshape(x.shape[0], x.shape[1], inner))


def _token_conv(features: int, name: str, dtype):
    """A torch 1×1 Conv2d applied to tokens [B, L, C] viewed as [B, L, 1, C]: the same
    per-token map, and the Flax kernel keeps the conv layout [1, 1, C, C] that the
    checkpoint's [C, C, 1, 1] converts to."""
    layer = nn.Conv(features, (1, 1), padding="VALID", dtype=dtype,
                    kernel_init=nn.initializers.zeros, name=name)
    return lambda t: layer(t[:, :, None, :])[:, :, 0, :]


class AiATransformerBlock(BasicTransformerBlock):
    """`BasicTransformerBlockV8_refV5`: reference attention, LR attention, then the SD
    block (attn1, attn2, ff). x [B, L, C]; context [B, Lc, Cc]; lr_tokens, ref_tokens
    [B, L', C] or both None (gen mode). Residual adds in the order reference → LR →
    self → cross → FF."""

    reference_attention: str = "released"

    @nn.compact
    def __call__(self, x, context, lr_tokens=None, ref_tokens=None):
        c = x.shape[-1]
        if lr_tokens is not None:
            ref = ReferenceAttention(self.heads, self.head_dim, self.reference_attention,
                                     self.dtype, name="attn4_ref_lna")(lr_tokens, ref_tokens)
            x = x + _token_conv(c, "zero_conv_r_lna", self.dtype)(ref)
            lr = Attention(self.heads, self.head_dim, attention=self.attention, dtype=self.dtype,
                           name="attn3_lr_lna")(
                LayerNorm(1e-5, self.dtype, name="norm4_lna")(x), lr_tokens)
            x = x + _token_conv(c, "zero_conv_lna", self.dtype)(lr)
            if self.is_initializing():
                # In the checkpoints, never used by the original forward.
                LayerNorm(1e-5, self.dtype, name="norm5_lna")(x)
        return super().__call__(x, context)


class AiATransformer2D(nn.Module):
    """`SpatialTransformerV8_refV5` with linear projections (module docstring).

    h: [B, H, W, C]; context: [B, Lc, Cc]; lr_feature, ref_feature: ControlNet features
    [B, H, W, C] (or [B, H, W, C/2] when `dubch`), both or neither given.
    Returns [B, H, W, C].
    """

    heads: int
    head_dim: int
    groups: int = 32
    dubch: bool = False
    reference_attention: str = "released"
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, context, lr_feature=None, ref_feature=None):
        if self.reference_attention not in REFERENCE_ATTENTION_MODES:
            raise ValueError(f"reference_attention={self.reference_attention!r}; choose one "
                             f"of {REFERENCE_ATTENTION_MODES}")
        if (lr_feature is None) != (ref_feature is None):
            raise ValueError("AiA transformer: pass both the LR and the reference feature, "
                             "or neither (gen mode)")
        b, height, width, c = h.shape
        inner = self.heads * self.head_dim
        tokens = lambda t: t.reshape(b, height * width, t.shape[-1])
        dense = lambda f, n: nn.Dense(f, dtype=self.dtype, name=n)
        gn = lambda n: GroupNorm(self.groups, 1e-6, self.dtype, name=n)

        x = dense(inner, "proj_in")(tokens(gn("norm")(h)))
        lr_tokens = ref_tokens = None
        if lr_feature is not None:
            lr, ref = lr_feature.astype(self.dtype), ref_feature.astype(self.dtype)
            if self.dubch:
                lr = conv(c, "dubconv_lna", dtype=self.dtype)(lr)
                ref = conv(c, "dubconv_r_lna", dtype=self.dtype)(ref)
            if lr.shape[1:] != h.shape[1:] or ref.shape[1:] != h.shape[1:]:
                raise ValueError(f"AiA control features {lr.shape}, {ref.shape} (after the "
                                 f"optional dubconv) do not match the hidden state {h.shape}")
            lr_tokens = dense(inner, "proj_in_clr_lna")(tokens(gn("norm_clr_lna")(lr)))
            ref_tokens = tokens(gn("norm_cref_lna")(ref))
            if self.reference_attention == "paper" or self.is_initializing():
                projected = dense(inner, "proj_in_cref_lna")(ref_tokens)
                if self.reference_attention == "paper":
                    ref_tokens = projected

        x = AiATransformerBlock(self.heads, self.head_dim, self.attention, self.dtype,
                                reference_attention=self.reference_attention,
                                name="transformer_blocks_0")(
            x, context.astype(self.dtype), lr_tokens, ref_tokens)
        return dense(c, "proj_out")(x).reshape(b, height, width, c) + h
