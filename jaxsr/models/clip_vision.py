"""OpenCLIP ViT-H/14's vision tower as CoSeR reads it, in Flax.

    pixels [B, 224, 224, 3] (CLIP-normalised, see `clip_preprocess`)
      -> tokens [B, 257, output_dim]: all 256 patch tokens and the CLS token

CoSeR calls open_clip 2.20's `visual(img)` with `output_tokens=True,
global_average_pool=True`: the pooled vector (mean over tokens → ln_post → proj)
is thrown away and the returned `tokens` are the transformer's output for ALL
positions, CLS included, taken BEFORE `ln_post`; CoSeR then multiplies them by
`visual.proj`. So `ln_post` never touches the tokens. It is still a real param
here (created at init, never read by `__call__`): the checkpoint holds it and
`jaxsr.convert.tree.torch_to_flax` then stays strict without an ignore rule, and
an exported tree round-trips to the open_clip layout unchanged.

Blocks are open_clip's `ResidualAttentionBlock` (pre-norm, no layer scale):
x + attn(ln_1(x)), then x + mlp(ln_2(x)), mlp = c_fc → exact GELU → c_proj. The
attention is `torch.nn.MultiheadAttention`, whose packed `in_proj_weight` [3W, W]
and `in_proj_bias` [3W] are raw parameters (same name and layout in Flax: rows
0..W-1 are q, then k, then v) while `out_proj` is a Linear (Flax `kernel` [W, W],
transposed). Param names mirror the torch names under `visual.`:
`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
`transformer/resblocks_{i}/{ln_1, attn/{in_proj_weight, in_proj_bias, out_proj},
ln_2, mlp/{c_fc, c_proj}}`, `ln_post`, `proj`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.attention import dot_product_attention
from jaxsr.nn.layers import LayerNorm
from jaxsr.nn.resize import torch_resize_bicubic

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """open_clip `CLIPVisionCfg` fields that shape the tower (ViT-H-14 defaults)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    output_dim: int = 1024
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Patch tokens plus the CLS token (257 for ViT-H/14 at 224 px)."""
        return self.grid**2 + 1


VIT_H_14 = CLIPVisionConfig()


def clip_preprocess(images, config: CLIPVisionConfig = VIT_H_14):
    """CoSeR's `clipT`: SRResNet output -> CLIP vision input.

    images: [B, H, W, 3] float, nominally [0, 1] (not clamped: CoSeR feeds the raw
    SRResNet output). Resized to image_size² with PyTorch's bicubic (a = -0.75,
    align_corners=False, no antialias: CoSeR's `clip_transfrom` is torchvision 0.13's
    tensor `Resize`, which does not antialias tensors), again not clamped, then
    normalised with the CLIP mean/std.
    Returns [B, image_size, image_size, 3] float32.
    """
    size = (config.image_size, config.image_size)
    x = torch_resize_bicubic(jnp.asarray(images, jnp.float32), size)
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (x - mean) / std


class MultiheadSelfAttention(nn.Module):
    """torch.nn.MultiheadAttention(width, heads) called as self-attention, no mask.

    [B, L, W] -> [B, L, W]. Packed input projection (in_proj_weight / in_proj_bias,
    torch layout) and an `out_proj` Linear.
    """

    heads: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, length, width = x.shape
        init = nn.initializers.xavier_uniform()
        w_in = self.param("in_proj_weight", init, (3 * width, width), jnp.float32)
        b_in = self.param("in_proj_bias", nn.initializers.zeros, (3 * width,), jnp.float32)
        qkv = jnp.einsum("blc,oc->blo", x, w_in.astype(self.dtype)) + b_in.astype(self.dtype)
        # Rows of in_proj are [q; k; v], each head a contiguous slice of W/heads.
        qkv = qkv.reshape(b, length, 3, self.heads, width // self.heads)
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                    backend=self.attention)
        out = out.reshape(b, length, width)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


class MLP(nn.Module):
    """c_fc -> exact GELU -> c_proj: [B, L, W] -> [B, L, W]."""

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="c_fc")(x)
        h = nn.gelu(h, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="c_proj")(h)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1 x), then x + mlp(ln_2 x). [B, L, W] -> [B, L, W]."""

    config: CLIPVisionConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_1")(x)
        x = x + MultiheadSelfAttention(cfg.heads, self.attention, self.dtype, name="attn")(h)
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_2")(x)
        return x + MLP(cfg.mlp_dim, self.dtype, name="mlp")(h)


class Transformer(nn.Module):
    """`layers` blocks named resblocks_0 ... resblocks_{n-1}."""

    config: CLIPVisionConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.layers):
            x = ResidualAttentionBlock(self.config, self.attention, self.dtype,
                                       name=f"resblocks_{i}")(x)
        return x


class CLIPVisionTower(nn.Module):
    """open_clip `VisionTransformer` tokens as CoSeR uses them (see module docstring).

    pixels [B, S, S, 3] (S = image_size, CLIP-normalised) -> [B, grid² + 1, output_dim]
    float32, token 0 = CLS.
    """

    config: CLIPVisionConfig = VIT_H_14
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        b = pixels.shape[0]
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"CLIP vision tower expects [B, {cfg.image_size}, "
                             f"{cfg.image_size}, 3] pixels, got {pixels.shape}")
        scale = cfg.width**-0.5  # open_clip's init scale of the embeddings and proj
        embed_init = nn.initializers.normal(scale)
        x = nn.Conv(cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                    padding="VALID", use_bias=False, dtype=self.dtype,
                    name="conv1")(pixels.astype(self.dtype))
        x = x.reshape(b, cfg.grid * cfg.grid, cfg.width)      # row-major, as torch flatten(2)
        cls = self.param("class_embedding", embed_init, (cfg.width,), jnp.float32)
        pos = self.param("positional_embedding", embed_init, (cfg.num_tokens, cfg.width),
                         jnp.float32)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_pre")(x)
        x = Transformer(cfg, self.attention, self.dtype, name="transformer")(x)
        if self.is_initializing():
            # open_clip normalises only the pooled vector with ln_post, and CoSeR drops
            # that vector; the param is created for checkpoint strictness only.
            LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_post")(x[:, :1])
        proj = self.param("proj", embed_init, (cfg.width, cfg.output_dim), jnp.float32)
        tokens = jnp.einsum("blc,cd->bld", x, proj.astype(x.dtype))
        return tokens.astype(jnp.float32)


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: CLIPVisionConfig = VIT_H_14):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating weights."""
    pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    model = CLIPVisionTower(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), pixels))["params"]
