"""MUSIQ (Ke et al. 2021), the no-reference quality model as pyiqa (0.1.x) computes it:
`pyiqa/archs/musiq_arch.py` with `pyiqa/data/multiscale_trans_util.py`; the metric
`musiq` is the KonIQ-10k checkpoint (`musiq_koniq_ckpt-e95806b9.pth`).

Input images x in [0, 1] are mapped to [-1, 1] (2x - 1, the original TF model's
range), then turned into one token sequence per image (`multiscale_patches`):

  for each longer side L in sorted(longer_side_lengths) (224, 384), scale id k = 0, 1:
      resize (aspect kept) to (round(h L / max(h, w)), round(w L / max(h, w))), Python's
          round, with PyTorch's bicubic (a = -0.75, align_corners=False, no antialias:
          images smaller than L are upsampled, larger ones shrunk without a low-pass)
      zero-pad to multiples of P = 32 ('SAME': the extra row/column goes after) and
          cut into P x P patches in row-major order
      each patch gets a hashed position: its row and column index, counted over the
          nh x nw patch grid, mapped to the G x G grid (G = 10) by nearest-neighbour
          interpolation of 0..G-1 (PyTorch's floor(i * float32(G / n))), pos = row G + col
      the patches are zero-padded (or cut) to ceil(L / P)^2 tokens; a padded token has
          zero pixels, position 0, scale 0 and mask 0
  the image at its own size follows with scale id len(longer_side_lengths), all its
  patches (`max_seq_len_from_original_res` = -1; >= 0 pads/cuts to that many; None drops
  the full-size scale). The three parts are concatenated: 49 + 144 + ceil(h/32) ceil(w/32)
  tokens for the defaults.

Network (`MUSIQ`), per patch then per sequence:
  stem: StdConv 7x7/2 to 64 (weight standardisation: (w - mean) / (std + 1e-5) per
        output channel, std with Bessel's correction as torch.std), GroupNorm(32, eps
        1e-6), ReLU, max pool 3x3/2; TF 'SAME' zero padding before the conv and the pool
  block1: one bottleneck 64 -> 256 (1x1, 3x3, 1x1 StdConvs, each GroupNorm(32, eps
        1e-4), ReLU; a projection StdConv 1x1 + GroupNorm on the shortcut)
  embedding: the (P/4) x (P/4) x 256 map flattened in (h, w, c) order, Linear to D = 384
  encoder: + position embedding[pos] + scale embedding[scale]; a learned `cls` token in
        front (mask 1); 14 pre-LN blocks (LayerNorm eps 1e-6, 6-head attention with
        biases, MLP 1152 with exact GELU); attention logits between any token pair with a
        padded token are set to -1000 (not -inf); final LayerNorm
  head: Linear(D, 1) on the cls token = the score (KonIQ, SPAQ, PaQ-2-PiQ checkpoints);
        with 10 outputs (the AVA checkpoint) softmax, and the score is sum_i i p_i.

Every step above, including the resize and patching, is jitted per image size; a batch
of equal-size images is one call. Not implemented (pyiqa has them but its metrics do not
use them): multi-crop inputs (4-D patch tensors averaged over crops), sinusoidal
position embeddings, and dropout/drop-path (identity at evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.nn.layers import GroupNorm
from jaxsr.nn.resize import torch_resize_bicubic

HIGHEST = jax.lax.Precision.HIGHEST  # scores must not depend on the backend's matmul default
STEM_WIDTH = 64  # pyiqa's `resnet_token_dim`, fixed
MASKED_LOGIT = -1e3  # pyiqa's `masked_fill` value


@dataclasses.dataclass(frozen=True)
class MusiqConfig:
    """pyiqa's `MUSIQ(...)` arguments (defaults: the released checkpoints')."""

    patch_size: int = 32
    hidden_size: int = 384
    mlp_dim: int = 1152
    num_heads: int = 6
    num_layers: int = 14
    num_scales: int = 3
    spatial_pos_grid_size: int = 10
    num_class: int = 1
    longer_side_lengths: tuple[int, ...] = (224, 384)
    max_seq_len_from_original_res: int | None = -1

    @classmethod
    def from_dict(cls, config: Mapping | MusiqConfig) -> MusiqConfig:
        if isinstance(config, MusiqConfig):
            return config
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown MUSIQ config keys: {sorted(unknown)}")
        values = dict(config)
        if "longer_side_lengths" in values:
            values["longer_side_lengths"] = tuple(int(s) for s in values["longer_side_lengths"])
        return cls(**values)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["longer_side_lengths"] = list(self.longer_side_lengths)
        return out


# ------------------------------------------------------------------ preprocessing


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of one axis, as pyiqa's `exact_padding_2d`."""
    total = (math.ceil(size / stride) - 1) * stride + kernel - size
    return total // 2, total - total // 2


def hashed_positions(grid: int, count_h: int, count_w: int) -> np.ndarray:
    """(count_h * count_w,) int32 indices into the grid x grid position table, row-major.

    PyTorch's nearest interpolation of 0..grid-1 to n samples: floor(i * s) with the
    float32 scale s = grid / n and a float32 product, clamped to grid - 1.
    """
    def axis(n):
        scale = np.float32(grid) / np.float32(n)
        idx = np.floor(np.arange(n, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(idx, grid - 1)

    return (axis(count_h)[:, None] * grid + axis(count_w)[None, :]).reshape(-1).astype(np.int32)


def resized_size(h: int, w: int, longer: int) -> tuple[int, int]:
    """Aspect-kept size with the longer side `longer`: Python's round (half to even)."""
    ratio = longer / max(h, w)
    return round(h * ratio), round(w * ratio)


def _patches(x: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, 3) -> (B, nh * nw, patch, patch, 3), zero 'SAME' padding, row-major."""
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), same_padding(h, patch, patch), same_padding(w, patch, patch),
                    (0, 0)))
    nh, nw = x.shape[1] // patch, x.shape[2] // patch
    x = x.reshape(b, nh, patch, nw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * nw, patch, patch, c)


def _one_scale(x, cfg: MusiqConfig, scale_id: int, max_len: int | None):
    b, h, w, _ = x.shape
    p = cfg.patch_size
    tokens = _patches(x, p)
    n = tokens.shape[1]
    pos = hashed_positions(cfg.spatial_pos_grid_size, math.ceil(h / p), math.ceil(w / p))
    scale = np.full(n, scale_id, np.int32)
    mask = np.ones(n, bool)
    if max_len is not None:
        # Padded tokens: zero pixels, position 0, scale 0, mask 0 (pyiqa pads the whole
        # concatenated vector with zeros).
        extra = max(max_len - n, 0)
        tokens = jnp.pad(tokens, ((0, 0), (0, extra), (0, 0), (0, 0), (0, 0)))[:, :max_len]
        pos = np.pad(pos, (0, extra))[:max_len]
        scale = np.pad(scale, (0, extra))[:max_len]
        mask = np.pad(mask, (0, extra))[:max_len]
    shape = (b, tokens.shape[1])
    return (tokens, jnp.broadcast_to(pos, shape), jnp.broadcast_to(scale, shape),
            jnp.broadcast_to(mask, shape))


def multiscale_patches(images: jax.Array, config: MusiqConfig):
    """The multi-scale token sequence of pyiqa's `get_multiscale_patches`.

    Args:
      images: (B, H, W, 3) float32 in [-1, 1] (already mapped from [0, 1]).
      config: the sizes (patch size, longer sides, grid, original-resolution length).
    Returns:
      patches (B, L, P, P, 3) float32, positions (B, L) int32, scales (B, L) int32,
      mask (B, L) bool; L = sum over scales (see the module docstring).
    """
    _, h, w, _ = images.shape
    p = config.patch_size
    parts = []
    for scale_id, longer in enumerate(sorted(config.longer_side_lengths)):
        resized = torch_resize_bicubic(images, resized_size(h, w, longer))
        parts.append(_one_scale(resized, config, scale_id, math.ceil(longer / p) ** 2))
    original = config.max_seq_len_from_original_res
    if original is not None:
        parts.append(_one_scale(images, config, len(config.longer_side_lengths),
                                None if original < 0 else original))
    return tuple(jnp.concatenate(field, axis=1) for field in zip(*parts, strict=True))


# ------------------------------------------------------------------------ network


class StdConv(nn.Module):
    """Conv with weight standardisation and TF 'SAME' padding, no bias (pyiqa's StdConv)."""

    features: int
    kernel: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, Cin) -> (N, ceil(H/stride), ceil(W/stride), features)."""
        w = self.param("kernel", nn.initializers.lecun_normal(),
                       (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
        w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
        w = w / (jnp.std(w, axis=(0, 1, 2), keepdims=True, ddof=1) + 1e-5)
        pads = [same_padding(x.shape[i], self.kernel, self.stride) for i in (1, 2)]
        return jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)


def _group_norm(eps: float, name: str):
    # jaxsr's GroupNorm (per-channel sums first): 1.5x faster than flax's on the stem's
    # thousands of 16x16 maps, and exact on flat ones.
    return GroupNorm(32, eps, name=name)


class Bottleneck(nn.Module):
    """pyiqa's Bottleneck with stride 1 (its only use): width = input channels."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, Cin) -> (N, H, W, features)."""
        width = x.shape[-1]
        identity = x
        if width != self.features:
            identity = _group_norm(1e-4, "gn_proj")(StdConv(self.features, 1,
                                                            name="conv_proj")(x))
        y = nn.relu(_group_norm(1e-4, "gn1")(StdConv(width, 1, name="conv1")(x)))
        y = nn.relu(_group_norm(1e-4, "gn2")(StdConv(width, 3, name="conv2")(y)))
        y = _group_norm(1e-4, "gn3")(StdConv(self.features, 1, name="conv3")(y))
        return nn.relu(y + identity)


def _dense(features: int, name: str, use_bias: bool = True):
    return nn.Dense(features, use_bias=use_bias, precision=HIGHEST, name=name)


def _layer_norm(name: str):
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


class MultiHeadAttention(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, N, D), mask (B, N) bool -> (B, N, D)."""
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads)  # noqa: E731
        q = split(_dense(d, "query")(x))
        k = split(_dense(d, "key")(x))
        v = split(_dense(d, "value")(x))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=HIGHEST) * (d // self.heads) ** -0.5
        pair = mask[:, None, :, None] & mask[:, None, None, :]
        logits = jnp.where(pair, logits, MASKED_LOGIT)
        attn = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhc->bqhc", attn, v, precision=HIGHEST).reshape(b, n, d)
        return _dense(d, "out")(y)


class Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.gelu(_dense(self.hidden, "fc1")(x), approximate=False)
        return _dense(x.shape[-1], "fc2")(y)


class TransformerBlock(nn.Module):
    mlp_dim: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Pre-LN: x + attn(LN(x)), then + mlp(LN(.)). (B, N, D) -> (B, N, D)."""
        x = x + MultiHeadAttention(self.heads, name="attention")(_layer_norm("norm1")(x), mask)
        return x + Mlp(self.mlp_dim, name="mlp")(_layer_norm("norm2")(x))


class _Blocks(nn.Module):
    """pyiqa's `nn.ModuleDict` `transformer` holding `encoderblock_{i}`."""

    cfg: MusiqConfig

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.cfg.num_layers):
            x = TransformerBlock(self.cfg.mlp_dim, self.cfg.num_heads,
                                 name=f"encoderblock_{i}")(x, mask)
        return x


class _Table(nn.Module):
    """One learned table parameter (pyiqa's AddHashSpatialPositionEmbs / AddScaleEmbs)."""

    param_name: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self):
        return self.param(self.param_name, nn.initializers.normal(0.02), self.shape, jnp.float32)


class TransformerEncoder(nn.Module):
    cfg: MusiqConfig

    @nn.compact
    def __call__(self, x, positions, scales, mask):
        """x (B, L, D), positions/scales (B, L) int, mask (B, L) bool -> (B, 1 + L, D)."""
        cfg, d = self.cfg, x.shape[-1]
        grid = cfg.spatial_pos_grid_size
        pos_table = _Table("position_emb", (1, grid * grid, d), name="posembed_input")()
        scale_table = _Table("scale_emb", (cfg.num_scales, d), name="scaleembed_input")()
        x = x + pos_table[0][positions] + scale_table[scales]
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
        mask = jnp.concatenate([jnp.ones((x.shape[0], 1), bool), mask], axis=1)
        x = _Blocks(cfg, name="transformer")(x, mask)
        return _layer_norm("encoder_norm")(x)


class MUSIQ(nn.Module):
    """pyiqa's MUSIQ network on prepared token sequences; params use its module names."""

    cfg: MusiqConfig

    @nn.compact
    def __call__(self, patches, positions, scales, mask) -> jax.Array:
        """patches (B, L, P, P, 3) in [-1, 1], positions/scales (B, L) int, mask (B, L)
        bool -> (B,) float32 scores."""
        cfg = self.cfg
        b, n = patches.shape[:2]
        x = patches.reshape(b * n, *patches.shape[2:])
        x = StdConv(STEM_WIDTH, 7, 2, name="conv_root")(x)
        x = nn.relu(_group_norm(1e-6, "gn_root")(x))
        # Zero 'SAME' padding before the pool (pyiqa pads with zeros; after the ReLU every
        # value is >= 0, so a zero never wins over a real maximum it should not).
        pads = [same_padding(x.shape[i], 3, 2) for i in (1, 2)]
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
        x = Bottleneck(STEM_WIDTH * 4, name="block1")(x)
        x = _dense(cfg.hidden_size, "embedding")(x.reshape(b, n, -1))
        x = TransformerEncoder(cfg, name="transformer_encoder")(x, positions, scales, mask)
        cls = x[:, 0]
        if cfg.num_class == 1:
            return _dense(1, "head")(cls)[:, 0]
        probs = jax.nn.softmax(_dense(cfg.num_class, "head_0")(cls), axis=-1)
        return probs @ jnp.arange(1, cfg.num_class + 1, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def musiq_program(params, images: jax.Array, cfg: MusiqConfig) -> jax.Array:
    """The jitted computation behind `musiq`: images (B, H, W, 3) in [0, 1] -> (B,), with
    the config static (one program per config and image size)."""
    x = (images.astype(jnp.float32) - 0.5) * 2
    return MUSIQ(cfg).apply({"params": params}, *multiscale_patches(x, cfg))


def musiq(params, images: jax.Array, *, config: Mapping | MusiqConfig) -> jax.Array:
    """Per-image MUSIQ score (no reference image).

    Args:
      params: Flax params from `jaxsr.convert.metric_musiq.convert`.
      images: (B, H, W, 3) float32 RGB in [0, 1], all of one size (one compiled program
        per size).
      config: the converter's config dict (or a `MusiqConfig`).
    Returns:
      (B,) float32; about 0..100 for the KonIQ checkpoint, higher is better.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images (B, H, W, 3), got shape {images.shape}")
    return musiq_program(params, images, MusiqConfig.from_dict(config))


def eval_shape_params(config: MusiqConfig, image_shape: Sequence[int] = (1, 64, 64, 3)):
    """The Flax param tree's shapes (`jax.ShapeDtypeStruct`s) for `config`."""
    cfg = MusiqConfig.from_dict(config)

    def init(images):
        return MUSIQ(cfg).init(jax.random.key(0), *multiscale_patches(images, cfg))

    return jax.eval_shape(init, jnp.zeros(image_shape, jnp.float32))["params"]
