"""Swin Transformer image encoder as used by RAM (Swin-L, 384 px), in Flax.

image NHWC [B, S, S, 3] (already normalised) → [B, 1 + N, C_last]: the mean of the
final tokens followed by the N = (S / patch / 2^(stages-1))² tokens themselves
(Swin-L 384: [B, 145, 1536]).

Param tree mirrors the torch module `visual_encoder`: `patch_embed/{proj,norm}`,
`layers_{l}/blocks_{b}/{norm1, attn/qkv, attn/proj, attn/relative_position_bias_table,
norm2, mlp/fc1, mlp/fc2}`, `layers_{l}/downsample/{norm, reduction}`, `norm`.
The buffers `relative_position_index` and `attn_mask` are recomputed here (numpy)
instead of being read from checkpoints.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.nn.layers import LayerNorm
from jaxsr.nn.lora import LoRADense

# Additive logit for token pairs that a shifted window joins but that were not
# neighbours in the image (the original uses -100, not -inf; kept for parity).
MASKED_LOGIT = -100.0
SWIN_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Swin hyper-parameters (names of the original `SwinTransformer` arguments)."""

    img_size: int = 384
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1

    def __post_init__(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in "
                             "length")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """Tokens of the output including the leading mean token."""
        res = self.img_size // self.patch_size // 2 ** (len(self.depths) - 1)
        return 1 + res * res


def swin_large_384() -> SwinConfig:
    """RAM's `config_swinL_384.json`."""
    return SwinConfig()


@dataclasses.dataclass(frozen=True)
class StageGeometry:
    resolution: int  # tokens per side entering the stage
    dim: int
    heads: int
    depth: int
    window: int      # effective window (= resolution when the resolution ≤ window_size)
    shift: int       # shift of the odd blocks (0 when the window covers the stage)


def stage_geometry(cfg: SwinConfig) -> list[StageGeometry]:
    """Per stage: resolution, width, heads, depth, effective window and shift.

    As in the original block constructor: when a stage's resolution is ≤ the window
    size the window becomes the whole stage and nothing is shifted.
    """
    out = []
    res = cfg.img_size // cfg.patch_size
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
        r = res // 2 ** i
        window, shift = cfg.window_size, cfg.window_size // 2
        if r <= window:
            window, shift = r, 0
        if r % window:
            raise ValueError(f"stage {i}: resolution {r} is not a multiple of window {window}")
        out.append(StageGeometry(r, cfg.embed_dim * 2 ** i, heads, depth, window, shift))
    return out


@cache
def relative_position_index(window: int) -> np.ndarray:
    """[w², w²] int32 rows of the bias table: for query token i and key token j in a
    window (row-major), (dy + w - 1) * (2w - 1) + (dx + w - 1) with d = pos_i - pos_j."""
    ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([ys.ravel(), xs.ravel()])              # [2, w²]
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


@cache
def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """[nW, w², w²] float32: 0 between tokens of the same image region, MASKED_LOGIT
    across regions, for the windows of the image rolled by -shift (windows row-major)."""
    regions = np.zeros((resolution, resolution), np.float32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            regions[hs, ws] = label
            label += 1
    n = resolution // window
    win = regions.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, -1)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, MASKED_LOGIT, 0.0).astype(np.float32)


def window_partition(x, window: int):
    """[B, H, W, C] -> [B, nW, w², C] (windows row-major, tokens row-major)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def window_merge(windows, window: int, h: int, w: int):
    """Inverse of `window_partition`: [B, nW, w², C] -> [B, H, W, C]."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.reshape(b, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `rate` (and
    rescale the kept ones), only when not deterministic (rng stream 'dropout')."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    x [B, nW, N=w², C] -> [B, nW, N, C]; `mask` [nW, N, N] additive or None.
    """

    dim: int
    heads: int
    window: int
    qkv_bias: bool = True
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, nw, n, c = x.shape
        hd = c // self.heads
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           ((2 * self.window - 1) ** 2, self.heads), jnp.float32)
        qkv = LoRADense(3 * c, use_bias=self.qkv_bias, lora_rank=self.lora_rank,
                        lora_alpha=self.lora_alpha, lora_groups=(True, False, True),
                        dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, nw, n, 3, self.heads, hd)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        # Logits, bias, mask and softmax in float32 (the bias differences are small).
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k,
                            preferred_element_type=jnp.float32) * hd ** -0.5
        bias = table[relative_position_index(self.window)]      # [N, N, heads]
        logits = logits + jnp.transpose(bias, (2, 0, 1))[None, None]
        if mask is not None:
            logits = logits + jnp.asarray(mask)[None, :, None]
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v).reshape(b, nw, n, c)
        return nn.Dense(c, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, both residual. x [B, H, W, C]."""

    geometry: StageGeometry
    shift: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        g = self.geometry
        _, h, w, c = x.shape
        win, s = g.window, self.shift
        y = LayerNorm(SWIN_LN_EPS, self.dtype, name="norm1")(x)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        mask = shifted_window_mask(h, win, s) if s else None
        y = WindowAttention(c, g.heads, win, self.qkv_bias, self.lora_rank, self.lora_alpha,
                            self.dtype, name="attn")(window_partition(y, win), mask)
        y = window_merge(y, win, h, w)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + DropPath(self.drop_path)(y, deterministic)
        y = LayerNorm(SWIN_LN_EPS, self.dtype, name="norm2")(x)
        y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(y)
        return x + DropPath(self.drop_path)(y, deterministic)


class PatchMerging(nn.Module):
    """2×2 neighbourhood → one token: [B, H, W, C] -> [B, H/2, W/2, 2C].

    Concatenation order of the original: (even row, even col), (odd row, even col),
    (even row, odd col), (odd row, odd col); then LayerNorm(4C) and Linear(4C→2C)
    without bias.
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                             x[:, 1::2, 1::2]], axis=-1)
        x = LayerNorm(SWIN_LN_EPS, self.dtype, name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction")(x)


class SwinStage(nn.Module):
    """The original `BasicLayer`: `depth` blocks (odd ones shifted), then patch merging
    unless it is the last stage. [B, H, W, C] -> [B, H', W', C']."""

    geometry: StageGeometry
    downsample: bool
    drop_paths: tuple[float, ...]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        g = self.geometry
        for i in range(g.depth):
            x = SwinBlock(g, g.shift if i % 2 else 0, self.mlp_ratio, self.qkv_bias,
                          self.drop_paths[i], self.lora_rank, self.lora_alpha, self.dtype,
                          name=f"blocks_{i}")(x, deterministic)
        if self.downsample:
            x = PatchMerging(self.dtype, name="downsample")(x)
        return x


class PatchEmbed(nn.Module):
    """Conv(patch × patch, stride patch) + LayerNorm: [B, S, S, 3] -> [B, S/p, S/p, C]."""

    embed_dim: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="proj")(x)
        return LayerNorm(SWIN_LN_EPS, self.dtype, name="norm")(x)


class SwinTransformer(nn.Module):
    """RAM's `visual_encoder`.

    __call__(images [B, S, S, in_chans], deterministic=True, return_stages=False)
      -> [B, 1 + N, C_last] (float32 LayerNorm output in `dtype`), and with
      return_stages also the list of each stage's output [B, H_l, W_l, C_l] (after
      its patch merging, i.e. what the original `layers[l](x)` returns, as NHWC).
    """

    config: SwinConfig = dataclasses.field(default_factory=swin_large_384)
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, deterministic: bool = True, return_stages: bool = False):
        cfg = self.config
        if images.shape[1:3] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"Swin expects {cfg.img_size}x{cfg.img_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}")
        x = PatchEmbed(cfg.embed_dim, cfg.patch_size, self.dtype, name="patch_embed")(
            images.astype(self.dtype))
        # Stochastic depth rate grows linearly over all blocks (0 … drop_path_rate).
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        stages, start = [], 0
        geometry = stage_geometry(cfg)
        for i, g in enumerate(geometry):
            x = SwinStage(g, i < len(geometry) - 1, tuple(rates[start:start + g.depth]),
                          cfg.mlp_ratio, cfg.qkv_bias, self.lora_rank, self.lora_alpha,
                          self.dtype, name=f"layers_{i}")(x, deterministic)
            start += g.depth
            stages.append(x)
        b, h, w, c = x.shape
        tokens = LayerNorm(SWIN_LN_EPS, self.dtype, name="norm")(x.reshape(b, h * w, c))
        pooled = tokens.astype(jnp.float32).mean(axis=1, keepdims=True).astype(tokens.dtype)
        out = jnp.concatenate([pooled, tokens], axis=1)
        return (out, stages) if return_stages else out
