"""Stable Diffusion's KL-f8 autoencoder (diffusers `AutoencoderKL`) in Flax.

Images are NHWC in [-1, 1]; latents NHWC with `latent_channels` channels at 1/8
resolution (for SD2's four levels). Scaling by `scaling_factor` (0.18215) is the
caller's job, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.attention import dot_product_attention
from jaxsr.nn.layers import GroupNorm, conv
from jaxsr.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D

_EPS = 1e-6  # every VAE norm (resnets, mid attention, output) uses 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config fields (same names)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    def __post_init__(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE widths {bad} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> VAEConfig:
        levels = len(d.get("block_out_channels", cls.block_out_channels))
        expect = {"down_block_types": ["DownEncoderBlock2D"] * levels,
                  "up_block_types": ["UpDecoderBlock2D"] * levels}
        for key, want in expect.items():
            if key in d and list(d[key]) != want:
                raise ValueError(f"vae config: {key}={d[key]} is not supported (only {want})")
        for key, want in {"act_fn": "silu", "mid_block_add_attention": True,
                          "use_quant_conv": True, "use_post_quant_conv": True}.items():
            if key in d and d[key] != want:
                raise ValueError(f"vae config: {key}={d[key]!r} is not supported (only {want!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
              if k in fields and v is not None}
        return cls(**kw)

    def to_diffusers_config(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in dataclasses.asdict(self).items()}
        levels = len(self.block_out_channels)
        d.update({"_class_name": "AutoencoderKL", "act_fn": "silu",
                  "down_block_types": ["DownEncoderBlock2D"] * levels,
                  "up_block_types": ["UpDecoderBlock2D"] * levels})
        return d


SD2_VAE = VAEConfig()


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior: mean and log-variance, [B, h, w, latent_channels]."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def mode(self):
        return self.mean

    def sample_with_noise(self, noise):
        """mean + std·noise with a given standard-normal `noise` (for exact replay)."""
        return self.mean + self.std * noise

    def sample(self, key):
        return self.sample_with_noise(jax.random.normal(key, self.mean.shape, self.mean.dtype))


class VAEMidBlock(nn.Module):
    """resnet → single-head self-attention over all pixels (GroupNorm, residual) → resnet."""

    channels: int
    groups: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        h = ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, name="resnets_0")(h)
        h = _VAEAttention(self.groups, self.attention, self.dtype, name="attentions_0")(h)
        return ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, name="resnets_1")(h)


class _VAEAttention(nn.Module):
    """GroupNorm, one head of width C over all h·w pixels, output projection, residual."""

    groups: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, _EPS, self.dtype, name="group_norm")(x).reshape(b, h * w, c)
        proj = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
        q, k, v = (proj(n)(y).reshape(b, h * w, 1, c) for n in ("to_q", "to_k", "to_v"))
        y = dot_product_attention(q, k, v, backend=self.attention).reshape(b, h * w, c)
        return x + proj("to_out_0")(y).reshape(b, h, w, c)


class Encoder(nn.Module):
    """[B, H, W, 3] → [B, H/2^(L-1), W/2^(L-1), 2·latent] (mean and log-variance)."""

    config: VAEConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        chans = cfg.block_out_channels
        h = conv(chans[0], "conv_in", dtype=dt)(x.astype(dt))
        for i, ch in enumerate(chans):
            h = _DownEncoderBlock(ch, cfg.layers_per_block, cfg.norm_num_groups,
                                  add_downsample=i < len(chans) - 1, dtype=dt,
                                  name=f"down_blocks_{i}")(h)
        h = VAEMidBlock(chans[-1], cfg.norm_num_groups, self.attention, dt, name="mid_block")(h)
        h = GroupNorm(cfg.norm_num_groups, _EPS, dt, name="conv_norm_out")(h)
        return conv(2 * cfg.latent_channels, "conv_out", dtype=dt)(nn.silu(h))


class Decoder(nn.Module):
    """[B, h, w, latent] → [B, h·2^(L-1), w·2^(L-1), 3]."""

    config: VAEConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        rev = cfg.block_out_channels[::-1]
        h = conv(rev[0], "conv_in", dtype=dt)(z.astype(dt))
        h = VAEMidBlock(rev[0], cfg.norm_num_groups, self.attention, dt, name="mid_block")(h)
        for i, ch in enumerate(rev):
            h = _UpDecoderBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups,
                                add_upsample=i < len(rev) - 1, dtype=dt, name=f"up_blocks_{i}")(h)
        h = GroupNorm(cfg.norm_num_groups, _EPS, dt, name="conv_norm_out")(h)
        return conv(cfg.out_channels, "conv_out", dtype=dt)(nn.silu(h))


class _DownEncoderBlock(nn.Module):
    channels: int
    layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.layers):
            h = ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, name=f"resnets_{j}")(h)
        if self.add_downsample:
            h = Downsample2D(self.channels, asymmetric_pad=True, dtype=self.dtype,
                             name="downsamplers_0")(h)
        return h


class _UpDecoderBlock(nn.Module):
    channels: int
    layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.layers):
            h = ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, name=f"resnets_{j}")(h)
        if self.add_upsample:
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h)
        return h


class AutoencoderKL(nn.Module):
    """encode: image → DiagonalGaussian; decode: latent → image (float32 out)."""

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
        # diffusers clamps the log-variance to keep exp() finite.
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x):
        return self.decode(self.encode(x).mode())


def dummy_image(config: VAEConfig):
    side = 2 ** (len(config.block_out_channels) - 1)
    return jnp.zeros((1, side, side, config.in_channels), jnp.float32)


def param_shapes(config: VAEConfig):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating it."""
    model = AutoencoderKL(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_image(config)))["params"]


def load_vae(state, config: VAEConfig, *, what: str = "vae checkpoint"):
    """A diffusers-named VAE state dict (numpy) → Flax params. Strict."""
    from jaxsr.convert.tree import torch_to_flax

    return torch_to_flax(state, param_shapes(config), what=what)
