"""StableSR's CFW autoencoder (`AutoencoderKLResi`, controllable feature wrapping) in Flax.

CoSeR decodes its final latent with it (vqgan_cfw_00011.ckpt, fusion weight 0.5).
It is SD's KL-f8 autoencoder (`jaxsr.models.vae`) plus two fusion layers in the
decoder:

    encode(im_lq)           -> posterior, (enc_1, enc_2)   maps after the resnets of
                               encoder levels 1 and 2 (before their downsamplers):
                               256 ch at H/2 and 512 ch at H/4 for SD's widths
    decode_cfw(z, enc, w)   -> image; in the decoder, at LDM levels 2 then 1, after the
                               resnets and before the upsampler:
                               h <- h + w · F_level(concat[enc_level, h])

F = ResBlock(2C -> C, 1×1 shortcut) -> `rrdb_blocks` × RRDB(C) -> ResBlock(C -> C).
With w = 0 the decoder is the plain VAE decoder. In general the fused levels are
every level but the first and the last, as in StableSR's `Decoder_Mix`.

Param tree: exactly `AutoencoderKL`'s (`encoder`, `decoder`, `quant_conv`,
`post_quant_conv`), so the plain VAE runs on the same params, plus the top-level
`fusion_layer_{1,2}` (LDM level index) holding `encode_enc_1` (ResnetBlock2D),
`encode_enc_2_{0,1}` (RRDB: `rdb{1,2,3}/conv{1..5}`) and `encode_enc_3`.
`jaxsr.convert.cfw` maps the checkpoint's `decoder.fusion_layer_*` names there.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.models.vae import SD2_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig, dummy_image
from jaxsr.nn.layers import conv
from jaxsr.nn.resnet import ResnetBlock2D

_EPS = 1e-6  # StableSR's `Normalize`: every GroupNorm of the autoencoder, fusion included
_LRELU_SLOPE = 0.2
_RESIDUAL_SCALE = 0.2  # ESRGAN's dense-block / RRDB residual scaling


@dataclasses.dataclass(frozen=True)
class CFWConfig:
    """The fusion layers' shape and the default fusion weight.

    `rrdb_blocks` (StableSR's `num_fuse_block`) and `grow_channels` (`num_grow_ch`)
    are 2 and 32 in vqgan_cfw_00011.ckpt. `fusion_weight` is w when `decode_cfw` is
    not given one (CoSeR's and StableSR's `--dec_w` default, 0.5; the training
    config used 1.0).
    """

    rrdb_blocks: int = 2
    grow_channels: int = 32
    fusion_weight: float = 0.5

    def __post_init__(self):
        if self.rrdb_blocks < 0 or self.grow_channels < 1:
            raise ValueError(f"cfw config: rrdb_blocks={self.rrdb_blocks} and grow_channels="
                             f"{self.grow_channels} must be >= 0 and >= 1")


def fused_levels(vae: VAEConfig) -> tuple[int, ...]:
    """LDM level indices (0 = full resolution) the CFW decoder fuses: all but the
    first and the last, i.e. (1, 2) for SD's four levels."""
    return tuple(range(1, len(vae.block_out_channels) - 1))


class ResidualDenseBlock(nn.Module):
    """ESRGAN's dense block: conv1..conv4 (3×3, `grow` channels, LeakyReLU 0.2) each see
    the input and every earlier output; conv5 maps all of them back to C.

    x: [B, H, W, C] -> x + 0.2 · conv5(...), same shape.
    """

    channels: int
    grow: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        maps = [x]
        for k in range(1, 5):
            y = conv(self.grow, f"conv{k}", dtype=self.dtype)(jnp.concatenate(maps, axis=-1))
            maps.append(nn.leaky_relu(y, _LRELU_SLOPE))
        out = conv(self.channels, "conv5", dtype=self.dtype)(jnp.concatenate(maps, axis=-1))
        return out * _RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled residual.
    x: [B, H, W, C] -> same."""

    channels: int
    grow: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x
        for k in range(1, 4):
            h = ResidualDenseBlock(self.channels, self.grow, self.dtype, name=f"rdb{k}")(h)
        return h * _RESIDUAL_SCALE + x


class CFWFusion(nn.Module):
    """StableSR's `Fuse_sft_block_RRDB` without the weighted add: the correction
    F(concat[enc, dec]).

    enc, dec: [B, H, W, C] -> [B, H, W, C]. StableSR's `ResBlock` is diffusers'
    ResnetBlock2D without a time embedding (its 1×1 shortcut is called `conv_out`
    there, `conv_shortcut` here).
    """

    channels: int
    groups: int
    rrdb_blocks: int = 2
    grow: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, enc, dec):
        c = self.channels
        # Encoder features first: the order of the input channels of encode_enc_1.
        h = jnp.concatenate([enc.astype(self.dtype), dec.astype(self.dtype)], axis=-1)
        h = ResnetBlock2D(c, self.groups, _EPS, self.dtype, name="encode_enc_1")(h)
        for j in range(self.rrdb_blocks):
            h = RRDB(c, self.grow, self.dtype, name=f"encode_enc_2_{j}")(h)
        return ResnetBlock2D(c, self.groups, _EPS, self.dtype, name="encode_enc_3")(h)


class CFWAutoencoderKL(AutoencoderKL):
    """`AutoencoderKL` plus StableSR's CFW fusion layers. Images NHWC in [-1, 1],
    latents NHWC unscaled (divide diffusion latents by `config.scaling_factor`).

    Methods (through `apply(..., method=...)`):
      encode(x) -> DiagonalGaussian                      as AutoencoderKL
      encode_with_features(x) -> (DiagonalGaussian, features)
      encode_features(x) -> features    (under jit the unused encoder tail is dropped)
      decode(z) -> image                                 plain VAE decoder
      decode_cfw(z, features, fusion_weight=None) -> image
    `features` is a tuple with one map per fused level, [B, H/2^i, W/2^i,
    block_out_channels[i]] for LDM level i (i = 1, 2 for SD).
    """

    cfw: CFWConfig = CFWConfig()

    def setup(self):
        super().setup()
        cfg = self.config
        for level in fused_levels(cfg):
            # setattr names the submodule after the attribute: `fusion_layer_<level>`.
            setattr(self, f"fusion_layer_{level}",
                    CFWFusion(cfg.block_out_channels[level], cfg.norm_num_groups,
                              self.cfw.rrdb_blocks, self.cfw.grow_channels, self.dtype))

    def encode_with_features(self, x) -> tuple[DiagonalGaussian, tuple[jax.Array, ...]]:
        moments, features = self.encoder(x, feature_levels=fused_levels(self.config))
        return self._posterior(moments), features

    def encode_features(self, x) -> tuple[jax.Array, ...]:
        return self.encoder(x, feature_levels=fused_levels(self.config))[1]

    def _posterior(self, moments) -> DiagonalGaussian:
        # The tail of AutoencoderKL.encode, on moments the feature pass already computed.
        moments = self.quant_conv(moments).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode_cfw(self, z, features, fusion_weight=None):
        """z [B, h, w, latent] (unscaled), `features` from `encode_features` of an image
        the size of the output (CoSeR: im_lq, the ×4 bicubic LR) -> image
        [B, 8h, 8w, out] (SD's 8 = 2^(levels-1)), float32.

        `fusion_weight` may be a traced scalar, so sweeping it does not recompile.
        """
        levels = fused_levels(self.config)
        if len(features) != len(levels):
            raise ValueError(f"decode_cfw: {len(features)} feature maps given, the decoder "
                             f"fuses {len(levels)} levels {levels}")
        w = self.cfw.fusion_weight if fusion_weight is None else fusion_weight
        top = len(self.config.block_out_channels) - 1
        hooks = {}
        for level, enc in zip(levels, features, strict=True):
            fuse = getattr(self, f"fusion_layer_{level}")
            # Up-block i of the diffusers-ordered decoder is LDM level top - i.
            hooks[top - level] = (lambda h, fuse=fuse, enc=enc:
                                  h + (w * fuse(enc, h)).astype(h.dtype))
        h = self.decoder(self.post_quant_conv(z.astype(self.dtype)), before_upsample=hooks)
        return h.astype(jnp.float32)

    def __call__(self, x):
        posterior, features = self.encode_with_features(x)
        return self.decode_cfw(posterior.mode(), features)


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def cfw_param_shapes(config: VAEConfig = SD2_VAE, cfw: CFWConfig = CFWConfig()):
    """The Flax param tree as ShapeDtypeStructs, without allocating it."""
    model = CFWAutoencoderKL(config, cfw=cfw)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_image(config)))["params"]


def fusion_param_count(config: VAEConfig = SD2_VAE, cfw: CFWConfig = CFWConfig()) -> int:
    """Parameters the fusion layers add to the VAE (44,393,728 for SD's VAE)."""
    shapes = cfw_param_shapes(config, cfw)
    return sum(x.size for name, sub in shapes.items() if name.startswith("fusion_layer_")
               for x in jax.tree_util.tree_leaves(sub))
