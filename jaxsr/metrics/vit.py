"""timm's plain ViT (`VisionTransformer` as `vit_base_patch8_224` builds it), in Flax, as
a feature trunk that returns the outputs of chosen blocks.

    pixels [B, S, S, 3] (already normalised) -> list of [B, 1 + (S/P)², D], one per index
    in `taps` (token 0 = cls)

timm's computation: Conv(P x P, stride P, with bias) patch embedding flattened row-major,
the learned `cls_token` [1, 1, D] in front, plus the learned `pos_embed` [1, 1 + N, D];
then pre-LN blocks x + attn(norm1 x), x + mlp(norm2 x) with LayerNorm eps 1e-6, fused
`qkv` Linear (rows: q, k, v; each head a contiguous slice), logits scaled by
head_dim^-0.5, `proj` Linear, MLP fc1 -> exact GELU -> fc2 (4 D wide). No layer scale,
no dropout at evaluation. Blocks after the last tap, the final `norm` and the classifier
`head` do not change a tapped output, so they only run at init: they are real params
(the checkpoint holds them, and a strict conversion checks their shapes) that scoring
never reads. Param names mirror timm's: `patch_embed/proj`, `cls_token`, `pos_embed`,
`blocks_{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}`, `norm`, `head`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxsr.nn.layers import LayerNorm

VIT_LN_EPS = 1e-6


class Attention(nn.Module):
    """[B, L, D] -> [B, L, D] multi-head self-attention."""

    heads: int

    @nn.compact
    def __call__(self, x):
        b, length, d = x.shape
        hd = d // self.heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, length, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * hd**-0.5, k)
        out = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits, axis=-1), v)
        return nn.Dense(d, name="proj")(out.reshape(b, length, d))


class Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], name="fc2")(h)


class Block(nn.Module):
    """Pre-LN transformer block, [B, L, D] -> [B, L, D]."""

    heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.heads, name="attn")(LayerNorm(VIT_LN_EPS, name="norm1")(x))
        h = LayerNorm(VIT_LN_EPS, name="norm2")(x)
        return x + Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp")(h)


class PatchEmbed(nn.Module):
    """Conv(P x P, stride P): [B, S, S, 3] -> [B, S/P, S/P, D]; param `proj` as in timm."""

    dim: int
    patch_size: int

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        return nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="proj")(x)


class VisionTransformer(nn.Module):
    """See the module docstring. `taps`: block indices whose outputs are returned."""

    img_size: int = 224
    patch_size: int = 8
    dim: int = 768
    depth: int = 12
    heads: int = 12
    num_classes: int = 1000
    taps: tuple[int, ...] = (6, 7, 8, 9)

    @nn.compact
    def __call__(self, pixels):
        b, p = pixels.shape[0], self.patch_size
        if pixels.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(f"ViT expects [B, {self.img_size}, {self.img_size}, 3] pixels, "
                             f"got {pixels.shape}")
        if max(self.taps) >= self.depth:
            raise ValueError(f"taps {self.taps} need more than {self.depth} blocks")
        x = PatchEmbed(self.dim, p, name="patch_embed")(pixels).reshape(b, -1, self.dim)
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, self.dim), jnp.float32)
        pos = self.param("pos_embed", init, (1, 1 + x.shape[1], self.dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1) + pos
        last = self.depth if self.is_initializing() else max(self.taps) + 1
        outputs = {}
        for i in range(last):
            x = Block(self.heads, name=f"blocks_{i}")(x)
            outputs[i] = x
        if self.is_initializing():
            # Params of the checkpoint that no tapped output depends on (see docstring).
            x = LayerNorm(VIT_LN_EPS, name="norm")(x)
            nn.Dense(self.num_classes, name="head")(x[:, 0])
        return [outputs[i] for i in self.taps]
