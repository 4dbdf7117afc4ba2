"""Stable Diffusion's UNet2DConditionModel in Flax, with SeeSR's RCA blocks.

Module tree mirrors diffusers (`down_blocks_0/attentions_1/...`). With
`use_image_cross_attention` every text transformer is followed by an RCA block
(`image_attentions_j`, a full Transformer2DModel whose cross-attention reads the
DAPE soft prompt, width 512); with it off the network is exactly SD2's.

Shapes: sample [B, H, W, Cin] (NHWC latents), timesteps [B] or scalar,
encoder_hidden_states [B, 77, 1024], image_encoder_hidden_states [B, 145, 512].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.embeddings import TimestepEmbedding, timestep_features
from jaxsr.nn.layers import GroupNorm, conv
from jaxsr.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jaxsr.nn.transformer import Transformer2DModel

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers config fields jaxsr uses (same names, same meaning).

    `attention_head_dim` is, as in SD2's config, the number of heads per level
    (diffusers' historical naming); `num_attention_heads` overrides it when set.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)
    num_attention_heads: tuple[int, ...] | None = None
    cross_attention_dim: int = 1024
    use_linear_projection: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64
    # SeeSR: representation cross-attention after every text transformer.
    use_image_cross_attention: bool = False
    image_cross_attention_dim: int = 512

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"UNetConfig.{name} must have {levels} entries")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"UNet widths {odd} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}")
        bad = [t for t in self.down_block_types if t not in _DOWN_TYPES]
        bad += [t for t in self.up_block_types if t not in _UP_TYPES]
        if bad:
            raise ValueError(f"unsupported UNet block types {bad}; jaxsr supports "
                             f"{_DOWN_TYPES} and {_UP_TYPES}")

    @property
    def heads(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        if isinstance(heads, int):
            heads = (heads,) * len(self.block_out_channels)
        return tuple(heads)

    @classmethod
    def from_diffusers_config(cls, d: dict) -> UNetConfig:
        """Build from a diffusers `unet/config.json` dict; unknown keys are ignored,
        settings jaxsr does not implement are refused."""
        unsupported = {
            "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
            "encoder_hid_dim": None, "time_embedding_type": "positional",
            "dual_cross_attention": False, "only_cross_attention": False,
            "upcast_attention": False, "resnet_time_scale_shift": "default",
            "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
            "transformer_layers_per_block": 1, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "class_embeddings_concat": False,
        }
        for key, default in unsupported.items():
            if key in d and d[key] not in (default, None if default is None else default):
                raise ValueError(f"unet config: {key}={d[key]!r} is not supported "
                                 f"(only {default!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        return cls(**kw)

    def to_diffusers_config(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in dataclasses.asdict(self).items()}
        if not self.use_image_cross_attention:
            d.pop("use_image_cross_attention")
            d.pop("image_cross_attention_dim")
        d.update({"_class_name": "UNet2DConditionModel", "act_fn": "silu",
                  "center_input_sample": False, "downsample_padding": 1,
                  "mid_block_scale_factor": 1, "dual_cross_attention": False,
                  "only_cross_attention": False, "upcast_attention": False})
        return d


SD2_BASE_UNET = UNetConfig()


def checkpointed(module_cls, remat: bool):
    """`module_cls` itself, or with `remat` its rematerialised version (nn.remat: the
    backward pass recomputes the layer's activations instead of keeping them). The
    parameter names are the same either way, so checkpoints load unchanged."""
    return nn.remat(module_cls) if remat else module_cls


def _transformer(cfg: UNetConfig, heads: int, channels: int, name: str, attention, dtype,
                 remat: bool = False):
    return checkpointed(Transformer2DModel, remat)(
        heads=heads, head_dim=channels // heads, use_linear_projection=cfg.use_linear_projection,
        groups=cfg.norm_num_groups, attention=attention, dtype=dtype, name=name)


class _Block(nn.Module):
    """Shared fields of the down, mid and up blocks. `remat`: every ResNet and
    transformer layer is rematerialised in the backward pass (training memory for
    compute: a layer's activations are recomputed instead of kept)."""

    config: UNetConfig
    channels: int
    heads: int
    with_attention: bool
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def resnet(self, name):
        cfg = self.config
        return checkpointed(ResnetBlock2D, self.remat)(
            self.channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name=name)

    def attend(self, h, j, ctx, img_ctx):
        """Text transformer `attentions_j`, then (SeeSR) RCA `image_attentions_j`."""
        if not self.with_attention:
            return h
        h = _transformer(self.config, self.heads, self.channels, f"attentions_{j}",
                         self.attention, self.dtype, self.remat)(h, ctx)
        if self.config.use_image_cross_attention:
            h = _transformer(self.config, self.heads, self.channels, f"image_attentions_{j}",
                             self.attention, self.dtype, self.remat)(h, img_ctx)
        return h


class DownBlock(_Block):
    """CrossAttnDownBlock2D / DownBlock2D: returns (h, the per-layer outputs for the skips)."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, h, temb, ctx, img_ctx):
        outputs = []
        for j in range(self.config.layers_per_block):
            h = self.attend(self.resnet(f"resnets_{j}")(h, temb), j, ctx, img_ctx)
            outputs.append(h)
        if self.add_downsample:
            h = Downsample2D(self.channels, dtype=self.dtype, name="downsamplers_0")(h)
            outputs.append(h)
        return h, outputs


class MidBlock(_Block):
    """UNetMidBlock2DCrossAttn: resnet → attention (→ RCA) → resnet."""

    @nn.compact
    def __call__(self, h, temb, ctx, img_ctx):
        h = self.resnet("resnets_0")(h, temb)
        h = self.attend(h, 0, ctx, img_ctx)
        return self.resnet("resnets_1")(h, temb)


class UpBlock(_Block):
    """CrossAttnUpBlock2D / UpBlock2D: each layer concatenates one skip (last first)."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, temb, ctx, img_ctx, upsample_size=None):
        for j, skip in enumerate(skips):
            h = jnp.concatenate([h, skip], axis=-1)
            h = self.attend(self.resnet(f"resnets_{j}")(h, temb), j, ctx, img_ctx)
        if self.add_upsample:
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h, upsample_size)
        return h


class UNet2DConditionModel(nn.Module):
    """ε-prediction UNet. Returns [B, H, W, out_channels] in float32.

    `down_block_additional_residuals` (one per skip: conv_in output plus every
    down-block layer and downsampler output, 12 for SD2) and
    `mid_block_additional_residual` are ControlNet's outputs, added as diffusers does.
    `remat` rematerialises every ResNet and transformer layer in the backward pass.
    """

    config: UNetConfig = SD2_BASE_UNET
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states,
                 image_encoder_hidden_states=None,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None):
        cfg, dt = self.config, self.dtype
        if cfg.use_image_cross_attention and image_encoder_hidden_states is None:
            raise ValueError("this UNet has RCA blocks: pass image_encoder_hidden_states")
        temb = self.time_embedding(sample, timesteps)
        ctx = encoder_hidden_states.astype(dt)
        img_ctx = None
        if image_encoder_hidden_states is not None:
            img_ctx = image_encoder_hidden_states.astype(dt)
        return unet_body(cfg, sample, temb, ctx, dtype=dt, attention=self.attention,
                         remat=self.remat, extra_ctx=img_ctx,
                         down_residuals=down_block_additional_residuals,
                         mid_residual=mid_block_additional_residual)

    def time_embedding(self, sample, timesteps):
        return embed_timesteps(self.config, sample.shape[0], timesteps, self.dtype)


def encoder_blocks(cfg: UNetConfig, h, temb, ctx, extra_ctx, *, dtype, attention: str,
                   remat: bool = False):
    """The down blocks `down_blocks_i` after conv_in (shared by the UNets and the
    ControlNets, called inside their compact `__call__`). h [B, H, W, C0] ->
    (h [B, H/2^(L-1), W/2^(L-1), C_last], the skips: h itself, then every down layer's
    and downsampler's output)."""
    chans, heads, levels = cfg.block_out_channels, cfg.heads, len(cfg.block_out_channels)
    block = dict(config=cfg, attention=attention, dtype=dtype, remat=remat)
    skips = [h]
    for i in range(levels):
        h, outs = DownBlock(channels=chans[i], heads=heads[i],
                            with_attention=cfg.down_block_types[i] == "CrossAttnDownBlock2D",
                            add_downsample=i < levels - 1, name=f"down_blocks_{i}",
                            **block)(h, temb, ctx, extra_ctx)
        skips.extend(outs)
    return h, skips


def unet_body(cfg: UNetConfig, sample, temb, ctx, *, dtype, attention: str, remat=False,
              extra_ctx=None,
              down_residuals: Sequence[jax.Array] | None = None,
              mid_residual: jax.Array | None = None, mid_block=MidBlock, up_block=UpBlock,
              decoder_kwargs: dict | None = None, mid_extra=None,
              up_extra: Sequence | None = None):
    """The SD UNet's skeleton: conv_in → down blocks → mid block → up blocks → conv_out.

    Called inside a compact `__call__` (SeeSR's UNet, CoSeR's AiA UNet), so its
    submodules take diffusers' names under the caller. One copy of the skip
    bookkeeping means one place for the layers' sharding annotations.

    sample [B, H, W, Cin]; temb [B, 4·C0]; ctx [B, L, D]. `extra_ctx` is every block's
    last input (SeeSR's DAPE representation [B, 145, 512], or None); a different
    decoder (`mid_block`, `up_block`, built with `decoder_kwargs` besides the shared
    fields) may take its own last inputs instead: `mid_extra` for the mid block and
    `up_extra[i]` for up level i. `down_residuals` (one per skip) and `mid_residual`
    are ControlNet's outputs, added as diffusers does. Returns [B, H, W, Cout] float32.
    """
    decoder = dict(config=cfg, attention=attention, dtype=dtype, remat=remat,
                   **(decoder_kwargs or {}))
    chans, heads, levels = cfg.block_out_channels, cfg.heads, len(cfg.block_out_channels)

    h = conv(chans[0], "conv_in", dtype=dtype)(sample.astype(dtype))
    h, skips = encoder_blocks(cfg, h, temb, ctx, extra_ctx, dtype=dtype, attention=attention,
                              remat=remat)

    if down_residuals is not None:
        if len(down_residuals) != len(skips):
            raise ValueError(f"expected {len(skips)} down-block residuals, got "
                             f"{len(down_residuals)}")
        skips = [s + r.astype(dtype) for s, r in zip(skips, down_residuals)]

    h = mid_block(channels=chans[-1], heads=heads[-1], with_attention=True, name="mid_block",
                  **decoder)(h, temb, ctx, extra_ctx if mid_extra is None else mid_extra)
    if mid_residual is not None:
        h = h + mid_residual.astype(dtype)

    rev_chans, rev_heads = chans[::-1], heads[::-1]
    n = cfg.layers_per_block + 1
    for i in range(levels):
        layer_skips, skips = skips[-n:][::-1], skips[:-n]
        # The next skip's size, so odd sizes on the way down come back exactly.
        up_size = tuple(skips[-1].shape[1:3]) if skips else None
        h = up_block(channels=rev_chans[i], heads=rev_heads[i],
                     with_attention=cfg.up_block_types[i] == "CrossAttnUpBlock2D",
                     add_upsample=i < levels - 1, name=f"up_blocks_{i}",
                     **decoder)(h, layer_skips, temb, ctx,
                                extra_ctx if up_extra is None else up_extra[i], up_size)

    h = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype, name="conv_norm_out")(h)
    h = conv(cfg.out_channels, "conv_out", dtype=dtype)(nn.silu(h))
    return h.astype(jnp.float32)


def embed_timesteps(cfg, batch: int, timesteps, dtype):
    """Sinusoid features → `time_embedding` MLP: [B, 4·C0]. Call inside a compact method
    (the UNet's and the ControlNet's); the submodule is named as in diffusers."""
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    feats = timestep_features(timesteps, cfg.block_out_channels[0],
                              flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    return TimestepEmbedding(cfg.block_out_channels[0] * 4, dtype, name="time_embedding")(feats)


def dummy_inputs(config: UNetConfig, batch: int = 1, size: int = 8):
    """Inputs of the right ranks for `init`/`eval_shape` (size: latent side)."""
    size = max(size, 2 ** (len(config.block_out_channels) - 1))
    sample = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
    ctx = jnp.zeros((batch, 77, config.cross_attention_dim), jnp.float32)
    img = None
    if config.use_image_cross_attention:
        img = jnp.zeros((batch, 145, config.image_cross_attention_dim), jnp.float32)
    return sample, jnp.zeros((batch,), jnp.int32), ctx, img


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: UNetConfig):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating it."""
    model = UNet2DConditionModel(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
    return shapes["params"]
