"""MANIQA (Yang et al., CVPRW 2022), the no-reference quality model as pyiqa 0.1.16
computes it (`pyiqa/archs/maniqa_arch.py`, `pyiqa/archs/maniqa_swin.py`); the metric
`maniqa` is the KonIQ-10k checkpoint `ckpt_koniq10k.pt` with Swin residual scale 0.8.

Input and crops (pyiqa's `uniform_crop`, deterministic at evaluation):
  x in [0, 1] is normalised with mean = std = 0.5 (pyiqa's IMAGENET_INCEPTION_*), i.e.
  2x - 1. When the short side is <= S = 224 the image is first upscaled with PyTorch's
  bilinear `F.interpolate(scale_factor=(S + 1) / short side)` (align_corners=False, no
  antialias; output size floor(side * factor), source coordinates from 1 / factor, not
  from the size ratio). Then K = test_sample = 20 crops of S x S: the first K cells,
  row-major, of a ceil(sqrt K) x ceil(sqrt K) grid whose cell (i, j) starts at
  (i step_h, j step_w), step = (side - S) // floor(sqrt K). (For K = 20 that is a 5 x 5
  grid cut to 4 rows; the bottom strip of a tall image is never seen.) An image that is
  exactly S x S becomes (S + 1) x (S + 1) and every crop sits at (0, 0). Callers may pass
  their own `offsets` instead (e.g. to mimic pyiqa's random training crops); both
  frameworks then score the same pixels.

Network, per crop (N = (S / 8)² = 784 tokens, D = 768):
  trunk: timm's ViT-B/8 (`jaxsr.metrics.vit`); the patch tokens (cls dropped) of blocks
      6, 7, 8, 9 (0-based, pyiqa's forward hooks) concatenated to [N, 4D]
  stage 1: 2 TABlocks on the transposed map [4D, N] (attention between channels: Linear
      over the N tokens for q, k, v, logits q k^T / sqrt(N), softmax, (attn v) then
      pyiqa's `transpose(1, 2).reshape(B, C, N)` - a reshuffle, not a transpose back - plus
      the input); 1x1 conv 4D -> D; a MANIQA Swin stage at width D
  stage 2: 2 TABlocks; 1x1 conv D -> D/2; a Swin stage at width D/2
  Swin stage (pyiqa's `SwinTransformer`): for each of 2 layers x <- 0.8 layer(x) + x,
      layer = 2 Swin blocks (window 4, the second shifted by 2, 4 heads, relative position
      bias, MLP width 768, LayerNorm eps 1e-5; `jaxsr.models.swin.SwinBlock`) then a 3x3
      conv and ReLU. Its `downsample` conv is never called by pyiqa (init-only param here).
  head, per token: score = ReLU(fc(ReLU(fc(x)))), weight = Sigmoid(fc(ReLU(fc(x))))
  image score = sum(weight score) / (sum(weight) + 1e-8) over all tokens of all K crops
      of the image (pyiqa reshapes the crops' outputs per image before the sums).
Dropout and drop path are identities at evaluation.
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

from jaxsr.metrics.vit import VisionTransformer
from jaxsr.models.swin import StageGeometry, SwinBlock

MEAN = STD = 0.5  # pyiqa's IMAGENET_INCEPTION_MEAN / _STD, every channel
WEIGHT_EPS = 1e-8  # added to the weight sum by pyiqa


@dataclasses.dataclass(frozen=True)
class ManiqaConfig:
    """pyiqa's `MANIQA(...)` arguments plus the timm trunk's sizes (defaults: the
    KonIQ release as pyiqa's `maniqa` metric builds it)."""

    embed_dim: int = 768          # ViT width, and the first Swin stage's
    patch_size: int = 8
    img_size: int = 224           # crop side S
    vit_depth: int = 12
    vit_heads: int = 12
    vit_classes: int = 1000
    taps: tuple[int, ...] = (6, 7, 8, 9)
    num_tab: int = 2
    depths: tuple[int, ...] = (2, 2)
    num_heads: tuple[int, ...] = (4, 4)
    window_size: int = 4
    dim_mlp: int = 768
    scale: float = 0.8            # pyiqa's `maniqa` passes 0.8 (MANIQA()'s default is 0.13)
    test_sample: int = 20

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if len(self.taps) != 4:
            raise ValueError(f"MANIQA concatenates 4 ViT blocks, got taps {self.taps}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ")
        for dim in (self.embed_dim, self.embed_dim // 2):
            # The shared Swin block sizes its MLP as int(dim * ratio).
            if int(dim * (self.dim_mlp / dim)) != self.dim_mlp:
                raise ValueError(f"dim_mlp {self.dim_mlp} is not reachable from width {dim}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @classmethod
    def from_dict(cls, config: Mapping | ManiqaConfig) -> ManiqaConfig:
        if isinstance(config, ManiqaConfig):
            return config
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown MANIQA config keys: {sorted(unknown)}")
        values = dict(config)
        for key in ("taps", "depths", "num_heads"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("taps", "depths", "num_heads"):
            out[key] = list(out[key])
        return out


# ------------------------------------------------------------------ crops


def upscaled_size(h: int, w: int, crop: int) -> tuple[int, int] | None:
    """The size pyiqa's `uniform_crop` upscales an h x w image to, or None if it does not."""
    if min(h, w) > crop:
        return None
    factor = (crop + 1) / min(h, w)
    return math.floor(h * factor), math.floor(w * factor)


def uniform_offsets(h: int, w: int, crop: int, count: int) -> tuple[tuple[int, int], ...]:
    """(top, left) of pyiqa's `uniform_crop` crops of an h x w image (after any upscale)."""
    size = upscaled_size(h, w, crop)
    if size is not None:
        h, w = size
    step_h, step_w = (h - crop) // math.isqrt(count), (w - crop) // math.isqrt(count)
    cells = math.ceil(math.sqrt(count))
    grid = [(i * step_h, j * step_w) for i in range(cells) for j in range(cells)]
    return tuple(grid[:count])


@functools.lru_cache(maxsize=32)
def _upscale_matrix(in_size: int, out_size: int, factor: float) -> np.ndarray:
    """[out, in] weights of PyTorch's bilinear interpolation called with `scale_factor`:
    the source coordinate uses float32(1 / factor), which differs from in/out when the
    output size was floored (`jaxsr.nn.resize` takes sizes, hence this variant). The
    half-pixel product is formed in float64 and rounded once, like PyTorch's fused
    multiply-add."""
    step = np.float64(np.float32(1.0 / factor))
    src = (step * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lo = np.floor(src).astype(np.int64)
    lam = (src - lo.astype(np.float32)).astype(np.float32)
    hi = np.minimum(lo + 1, in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), np.float32(1) - lam)
    np.add.at(m, (rows, hi), lam)
    return m


def crops(images, cfg: ManiqaConfig, offsets: Sequence[tuple[int, int]] | None = None):
    """images (B, H, W, 3) in [0, 1] -> normalised crops (B K, S, S, 3), an image's K
    crops adjacent. `offsets`: (top, left) per crop in the (upscaled) image; default
    pyiqa's uniform grid."""
    b, h, w, _ = images.shape
    x = (images.astype(jnp.float32) - MEAN) / STD
    size = upscaled_size(h, w, cfg.img_size)
    if size is not None:
        factor = (cfg.img_size + 1) / min(h, w)
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", _upscale_matrix(h, size[0], factor), x, precision=hp)
        x = jnp.einsum("pw,bowc->bopc", _upscale_matrix(w, size[1], factor), x, precision=hp)
        h, w = size
    if offsets is None:
        offsets = uniform_offsets(h, w, cfg.img_size, cfg.test_sample)
    s = cfg.img_size
    for top, left in offsets:
        if not (0 <= top <= h - s and 0 <= left <= w - s):
            raise ValueError(f"crop at {(top, left)} leaves the {h}x{w} image")
    out = jnp.stack([x[:, top:top + s, left:left + s] for top, left in offsets], axis=1)
    return out.reshape(b * len(offsets), s, s, 3)


# ------------------------------------------------------------------ network


class TABlock(nn.Module):
    """Channel attention of MANIQA: [B, C, N] -> [B, C, N] (Linear layers act on N)."""

    @nn.compact
    def __call__(self, x):
        b, c, n = x.shape
        q = nn.Dense(n, name="c_q")(x)
        k = nn.Dense(n, name="c_k")(x)
        v = nn.Dense(n, name="c_v")(x)
        attn = nn.softmax(jnp.einsum("bcn,bdn->bcd", q, k) * n**-0.5, axis=-1)
        y = jnp.einsum("bcd,bdn->bcn", attn, v)
        # pyiqa: (attn @ v).transpose(1, 2).reshape(B, C, N), which mixes token and
        # channel positions; the released weights were trained with it.
        return jnp.swapaxes(y, 1, 2).reshape(b, c, n) + x


class SwinLayer(nn.Module):
    """pyiqa's `BasicLayer`: Swin blocks (odd ones shifted), then 3x3 conv + ReLU.
    [B, R, R, C] -> [B, R, R, C]."""

    geometry: StageGeometry
    dim_mlp: int

    @nn.compact
    def __call__(self, x):
        g = self.geometry
        for i in range(g.depth):
            x = SwinBlock(g, g.shift if i % 2 else 0, mlp_ratio=self.dim_mlp / g.dim,
                          name=f"blocks_{i}")(x)
        return nn.relu(nn.Conv(g.dim, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x))


class SwinStage(nn.Module):
    """pyiqa's MANIQA `SwinTransformer`: x <- scale layer(x) + x per layer.
    [B, R, R, C] -> [B, R, R, C]."""

    cfg: ManiqaConfig
    dim: int

    @nn.compact
    def __call__(self, x):
        cfg, r = self.cfg, x.shape[1]
        window, shift = cfg.window_size, cfg.window_size // 2
        if r <= window:  # as pyiqa's block: one window covers the map, nothing shifts
            window, shift = r, 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            g = StageGeometry(r, self.dim, heads, depth, window, shift)
            x = cfg.scale * SwinLayer(g, cfg.dim_mlp, name=f"layers_{i}")(x) + x
        if self.is_initializing():
            # Built by pyiqa, never called in its forward; a param for strict conversion.
            nn.Conv(self.dim, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    name="downsample")(x)
        return x


class MANIQA(nn.Module):
    """Normalised crops (B, S, S, 3) -> per-token (score, weight), each (B, N)."""

    cfg: ManiqaConfig

    @nn.compact
    def __call__(self, x):
        cfg, d = self.cfg, self.cfg.embed_dim
        b, r = x.shape[0], cfg.grid
        taps = VisionTransformer(cfg.img_size, cfg.patch_size, d, cfg.vit_depth,
                                 cfg.vit_heads, cfg.vit_classes, cfg.taps, name="vit")(x)
        x = jnp.concatenate([t[:, 1:] for t in taps], axis=-1)     # [B, N, 4D]
        x = jnp.swapaxes(x, 1, 2)                                  # [B, 4D, N]
        for i in range(cfg.num_tab):
            x = TABlock(name=f"tablock1_{i}")(x)
        x = jnp.swapaxes(x, 1, 2).reshape(b, r, r, 4 * d)
        x = nn.Conv(d, (1, 1), name="conv1")(x)
        x = SwinStage(cfg, d, name="swintransformer1")(x)
        x = jnp.swapaxes(x.reshape(b, r * r, d), 1, 2)
        for i in range(cfg.num_tab):
            x = TABlock(name=f"tablock2_{i}")(x)
        x = jnp.swapaxes(x, 1, 2).reshape(b, r, r, d)
        x = nn.Conv(d // 2, (1, 1), name="conv2")(x)
        x = SwinStage(cfg, d // 2, name="swintransformer2")(x).reshape(b, r * r, d // 2)
        score = nn.Dense(d // 2, name="fc_score_0")(x)
        score = nn.relu(nn.Dense(1, name="fc_score_3")(nn.relu(score)))
        weight = nn.Dense(d // 2, name="fc_weight_0")(x)
        weight = nn.sigmoid(nn.Dense(1, name="fc_weight_3")(nn.relu(weight)))
        return score[..., 0], weight[..., 0]


# Crops per step of the scan over images: enough rows for the trunk's matmuls to run
# near the CPU's peak (one 784-token crop leaves them a third slower), few enough that
# the attention logits stay small on an accelerator (20 crops hold ~0.6 GB).
CROPS_PER_STEP = 8


def images_per_step(batch: int, crops: int) -> int:
    """The largest divisor of `batch` whose images hold at most CROPS_PER_STEP crops
    (at least one image)."""
    fit = max(1, CROPS_PER_STEP // crops)
    return max(d for d in range(1, min(batch, fit) + 1) if batch % d == 0)


@functools.partial(jax.jit, static_argnames=("cfg", "offsets"))
def maniqa_program(params, images, cfg: ManiqaConfig, offsets=None):
    """The jitted computation behind `maniqa` (one program per config, size, offsets)."""
    b = images.shape[0]
    x = crops(images, cfg, offsets)
    k = x.shape[0] // b                                    # crops per image
    per_step = images_per_step(b, k)
    x = x.reshape(b // per_step, per_step * k, *x.shape[1:])

    def step(step_crops):
        score, weight = MANIQA(cfg).apply({"params": params}, step_crops)
        score = score.reshape(per_step, -1)                # [images, crops x tokens]
        weight = weight.reshape(per_step, -1)
        return (weight * score).sum(-1) / (weight.sum(-1) + WEIGHT_EPS)

    return jax.lax.map(step, x).reshape(b)


def maniqa(params, images, *, config: Mapping | ManiqaConfig,
           offsets: Sequence[tuple[int, int]] | None = None):
    """Per-image MANIQA score (no reference image).

    Args:
      params: Flax params from `jaxsr.convert.metric_maniqa.convert`.
      images: (B, H, W, 3) float32 RGB in [0, 1], all of one size.
      config: the converter's config dict (or a `ManiqaConfig`).
      offsets: (top, left) of each S x S crop in the (upscaled, see the module docstring)
        image; default pyiqa's `uniform_crop` grid of `test_sample` crops.
    Returns:
      (B,) float32, about 0..1 for the KonIQ checkpoint, higher is better.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images (B, H, W, 3), got shape {images.shape}")
    offsets = None if offsets is None else tuple((int(top), int(left)) for top, left in offsets)
    # Scores must not depend on the backend's reduced-precision matmul default.
    with jax.default_matmul_precision("highest"):
        return maniqa_program(params, images, ManiqaConfig.from_dict(config), offsets)


def eval_shape_params(config: Mapping | ManiqaConfig):
    """The Flax param tree's shapes (`jax.ShapeDtypeStruct`s) for `config`."""
    cfg = ManiqaConfig.from_dict(config)
    x = jnp.zeros((1, cfg.img_size, cfg.img_size, 3), jnp.float32)
    return jax.eval_shape(lambda: MANIQA(cfg).init(jax.random.key(0), x))["params"]
