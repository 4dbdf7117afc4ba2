"""Stable Diffusion's KL-f8 autoencoder (diffusers `AutoencoderKL`) in Flax.

Images are NHWC in [-1, 1]; latents NHWC with `latent_channels` channels at
1/2^(levels-1) resolution (1/8 for SD2's four levels). Multiplying latents by
`config.scaling_factor` (0.18215) is the pipeline's job, as in diffusers.

Parameter paths mirror diffusers' module names (`encoder/down_blocks_0/resnets_1/conv1`,
`decoder/mid_block/attentions_0/to_q`, ...), so `jaxsr.convert.networks.load_vae`
converts a diffusers state dict with the generic strict rule of `jaxsr.convert.tree`.

Precision: the module `dtype` is the operand type of the convolutions and of the
mid-block attention (which computes in `dtype` inside). Everything between the
convolutions (norm and SiLU outputs, conv results, residual sums) stays float32
(`_ACT`) whatever `dtype` is: under bfloat16 that keeps the decoder within 1.4 %
of float32 (relative error, tiny random weights) where rounding every activation
to bfloat16 gave 2.6 %; rounding the weights alone costs 1.2 %. The price is
float32 activation memory and traffic between the layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.attention import Attention
from jaxsr.nn.layers import GroupNorm, conv
from jaxsr.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D

_EPS = 1e-6  # every VAE norm (resnets, mid-block attention, output norms) uses 1e-6
_ACT = jnp.float32  # activations between convolutions, see the module docstring
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"

# diffusers `AutoencoderKL.__init__` defaults: what a config dict means when it
# leaves a key out.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=(_DOWN_BLOCK,), up_block_types=(_UP_BLOCK,),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4,
    norm_num_groups=32, sample_size=32, scaling_factor=0.18215, force_upcast=True,
    mid_block_add_attention=True,
)
# diffusers keys this model cannot honour, with the only value it supports.
_FIXED_KEYS = dict(use_quant_conv=True, use_post_quant_conv=True, shift_factor=None,
                   latents_mean=None, latents_std=None)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config (same field names). Defaults are SD2's VAE.

    `down_block_types` / `up_block_types` default to all DownEncoderBlock2D /
    UpDecoderBlock2D; no other block type, activation or mid-block layout exists
    in SD-family VAEs, so anything else is refused. `force_upcast` and
    `sample_size` only describe the model (diffusers uses them for its fp16
    upcast and tiling); the Flax module ignores them.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    down_block_types: tuple[str, ...] | None = None
    up_block_types: tuple[str, ...] | None = None
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    sample_size: int | None = 512

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if levels < 1 or self.layers_per_block < 1:
            raise ValueError("vae config: need at least one level and one layer per block")
        for field, kind in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            value = getattr(self, field)
            value = (kind,) * levels if value is None else tuple(value)
            object.__setattr__(self, field, value)
            if value != (kind,) * levels:
                raise ValueError(f"vae config: {field}={list(value)} is not supported; only "
                                 f"{kind} at each of the {levels} levels")
        if self.act_fn != "silu":
            raise ValueError(f"vae config: act_fn={self.act_fn!r} is not supported (only 'silu')")
        if self.mid_block_add_attention is not True:
            raise ValueError("vae config: mid_block_add_attention=False is not supported")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"vae config: widths {bad} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> VAEConfig:
        """A diffusers `AutoencoderKL` config dict (e.g. vae/config.json) -> VAEConfig.

        Missing keys take diffusers' defaults; bookkeeping keys (`_class_name`,
        `_diffusers_version`, ...) are ignored; keys this model cannot honour must
        have their stock value.
        """
        for key, want in _FIXED_KEYS.items():
            if d.get(key, want) != want:
                raise ValueError(f"vae config: {key}={d[key]!r} is not supported "
                                 f"(only {want!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        merged = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in fields}}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})

    def to_diffusers_config(self) -> dict:
        """The config dict `diffusers.AutoencoderKL.from_config` rebuilds this model from."""
        d = {k: list(v) if isinstance(v, tuple) else v
             for k, v in dataclasses.asdict(self).items()}
        if d["sample_size"] is None:
            del d["sample_size"]
        return {"_class_name": "AutoencoderKL", **d,
                "use_quant_conv": True, "use_post_quant_conv": True}


SD2_VAE = VAEConfig(in_channels=3, out_channels=3, latent_channels=4,
                    block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    norm_num_groups=32, scaling_factor=0.18215, sample_size=512)


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior N(mean, exp(logvar)), each [B, h, w, latent_channels], float32."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def mode(self):
        return self.mean

    def sample_with_noise(self, noise):
        """mean + std·noise for a given standard-normal `noise` [B, h, w, C] (exact replay)."""
        return self.mean + self.std * noise

    def sample(self, key):
        return self.sample_with_noise(jax.random.normal(key, self.mean.shape, self.mean.dtype))


class VAEAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head as wide as the channels over
    all h·w pixels (q/k/v with biases), output projection, residual.

    x: [B, h, w, C] -> [B, h, w, C]. The projections are the shared `Attention`
    layer, placed in this module's own scope so its params sit beside
    `group_norm` (`attentions_0/to_q`, as in diffusers).
    """

    channels: int
    groups: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.group_norm = GroupNorm(self.groups, _EPS, self.dtype)
        self.attn = Attention(heads=1, head_dim=self.channels, qkv_bias=True,
                              attention=self.attention, dtype=self.dtype)
        nn.share_scope(self, self.attn)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.attn(self.group_norm(x).reshape(b, h * w, c))
        # diffusers: residual added, then divided by rescale_output_factor = 1.
        return x + y.reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution; [B, h, w, C] -> same."""

    channels: int
    groups: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        resnet = lambda name: ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype,
                                            _ACT, name=name)
        h = resnet("resnets_0")(h)
        h = VAEAttention(self.channels, self.groups, self.attention, self.dtype,
                         name="attentions_0")(h)
        return resnet("resnets_1")(h)


class DownEncoderBlock(nn.Module):
    """`layers` resnets, then (except at the last level) a stride-2 conv padded
    only right and bottom, as the LDM VAE weights expect.

    With `return_features=True` returns (output, the map after the resnets and
    before the downsampler), the map StableSR's CFW decoder fuses.
    """

    channels: int
    layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, return_features: bool = False):
        for j in range(self.layers):
            h = ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, _ACT,
                              name=f"resnets_{j}")(h)
        features = h
        if self.add_downsample:
            h = Downsample2D(self.channels, asymmetric_pad=True, dtype=self.dtype,
                             out_dtype=_ACT, name="downsamplers_0")(h)
        return (h, features) if return_features else h


class UpDecoderBlock(nn.Module):
    """`layers` resnets, then (except at the last level) nearest ×2 and a conv.

    `before_upsample`, if given, maps the resnets' output [B, h, w, C] to a map of
    the same shape before the upsampler (StableSR's CFW decoder fuses there).
    """

    channels: int
    layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, before_upsample: Callable | None = None):
        for j in range(self.layers):
            h = ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, _ACT,
                              name=f"resnets_{j}")(h)
        if before_upsample is not None:
            h = before_upsample(h)
        if self.add_upsample:
            h = Upsample2D(self.channels, dtype=self.dtype, out_dtype=_ACT,
                           name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    """[B, H, W, in] -> [B, H/2^(L-1), W/2^(L-1), 2·latent] (mean and log-variance,
    before `quant_conv`).

    `feature_levels`: levels whose map after the resnets (before the downsampler),
    [B, H/2^i, W/2^i, block_out_channels[i]] for level i, is also returned; the
    result is then (output, tuple of those maps in the order given).
    """

    config: VAEConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, feature_levels: tuple[int, ...] = ()):
        cfg, dt = self.config, self.dtype
        chans = cfg.block_out_channels
        h = conv(chans[0], "conv_in", dtype=dt, out_dtype=_ACT)(x)
        features = {}
        for i, ch in enumerate(chans):
            block = DownEncoderBlock(ch, cfg.layers_per_block, cfg.norm_num_groups,
                                     add_downsample=i < len(chans) - 1, dtype=dt,
                                     name=f"down_blocks_{i}")
            if i in feature_levels:
                h, features[i] = block(h, return_features=True)
            else:
                h = block(h)
        h = VAEMidBlock(chans[-1], cfg.norm_num_groups, self.attention, dt, name="mid_block")(h)
        h = GroupNorm(cfg.norm_num_groups, _EPS, _ACT, name="conv_norm_out")(h)
        out = conv(2 * cfg.latent_channels, "conv_out", dtype=dt, out_dtype=_ACT)(nn.silu(h))
        if feature_levels:
            return out, tuple(features[i] for i in feature_levels)
        return out


class Decoder(nn.Module):
    """[B, h, w, latent] (after `post_quant_conv`) -> [B, h·2^(L-1), w·2^(L-1), out].

    `before_upsample`: {up-block index i: fn} applies fn to `up_blocks_i`'s resnet
    output before its upsampler (see UpDecoderBlock).
    """

    config: VAEConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z, before_upsample: Mapping[int, Callable] | None = None):
        cfg, dt = self.config, self.dtype
        hooks = before_upsample or {}
        rev = cfg.block_out_channels[::-1]
        h = conv(rev[0], "conv_in", dtype=dt, out_dtype=_ACT)(z)
        h = VAEMidBlock(rev[0], cfg.norm_num_groups, self.attention, dt, name="mid_block")(h)
        for i, ch in enumerate(rev):
            # One resnet more per level than the encoder, as in diffusers.
            h = UpDecoderBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups,
                               add_upsample=i < len(rev) - 1, dtype=dt,
                               name=f"up_blocks_{i}")(h, before_upsample=hooks.get(i))
        h = GroupNorm(cfg.norm_num_groups, _EPS, _ACT, name="conv_norm_out")(h)
        return conv(cfg.out_channels, "conv_out", dtype=dt, out_dtype=_ACT)(nn.silu(h))


class AutoencoderKL(nn.Module):
    """encode: image [B, H, W, in] -> DiagonalGaussian; decode: latent [B, h, w, latent]
    -> image [B, H, W, out]. Outputs are float32 whatever the compute `dtype`.

    Call the methods through `apply(..., method="encode" | "decode")`; `__call__`
    (decode of the posterior mode) exists for `init`.
    """

    config: VAEConfig = SD2_VAE
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.attention, self.dtype)
        self.decoder = Decoder(cfg, self.attention, self.dtype)
        self.quant_conv = conv(2 * cfg.latent_channels, "quant_conv", kernel=1, padding=0,
                               dtype=self.dtype)
        self.post_quant_conv = conv(cfg.latent_channels, "post_quant_conv", kernel=1, padding=0,
                                    dtype=self.dtype)

    def encode(self, x) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        # As diffusers: a bounded log-variance keeps exp() finite.
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x):
        return self.decode(self.encode(x).mode())


def dummy_image(config: VAEConfig):
    """The smallest image the encoder takes: one latent pixel, [1, s, s, in_channels]."""
    side = 2 ** (len(config.block_out_channels) - 1)
    return jnp.zeros((1, side, side, config.in_channels), jnp.float32)


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: VAEConfig):
    """The Flax param tree as ShapeDtypeStructs, without allocating it."""
    model = AutoencoderKL(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_image(config)))["params"]
