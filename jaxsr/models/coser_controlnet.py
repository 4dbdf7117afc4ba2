"""CoSeR's ControlNet (LDM `ControlNet`, the `structcond_stage_model`) in Flax.

The SD UNet's encoder half (conv_in, time_embedding, down_blocks, mid_block: the
blocks and diffusers names of jaxsr.models.unet, so the SD weights it starts from
load by name) with three CoSeR changes:
  - no transformers at the second level (LDM attention_resolutions [4, 3, 1]): its
    down block is ResNet-only;
  - the hint is a latent, added after conv_in through a zero-initialised 3×3 conv
    (`hint_zero_conv`), instead of diffusers' pixel-space conditioning embedding;
  - it returns 13 features: a zero-initialised 1×1 conv of every skip
    (`controlnet_down_blocks_k`, LDM `zero_convs.k.0`) and of the mid block output
    (`controlnet_mid_block`, LDM `middle_block_out.0`), unscaled.
Its transformers are plain softmax SD transformers reading CoSeR's context [prompt; E].

CoSeR calls it twice per step with shared weights: hint = LR latent gives the X
features, hint = reference latent the R features, same z_t, t and context. Use
`lr_and_reference` (`model.apply(params, ..., method="lr_and_reference")`) to run
both in one forward over a doubled batch: one set of kernels at twice the batch
instead of two passes, the natural layout for a jitted sampler or training step.

Shapes (NHWC): sample, hint [B, h, w, 4] latents; timesteps [B] or scalar;
encoder_hidden_states [B, Lc, 1024]. Feature shapes: jaxsr.models.coser_unet.
`control_feature_shapes`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.models.unet import (
    SD2_BASE_UNET,
    MidBlock,
    UNetConfig,
    embed_timesteps,
    encoder_blocks,
)
from jaxsr.nn.layers import conv

_UP_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class CoSeRControlNetConfig:
    """`base`: the SD UNet config whose encoder the ControlNet copies. `attention_levels`:
    the encoder levels that keep their transformers (CoSeR: 0 and 2, i.e. LDM
    attention_resolutions [4, 3, 1] at downsampling rates 1, 2, 4, 8); the mid block
    always has one."""

    base: UNetConfig = SD2_BASE_UNET
    attention_levels: tuple[int, ...] = (0, 2)

    def __post_init__(self):
        levels = len(self.base.block_out_channels)
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"CoSeRControlNetConfig.attention_levels {bad} outside "
                             f"0..{levels - 1}")
        if self.base.use_image_cross_attention:
            raise ValueError("CoSeRControlNetConfig: the base UNet must not have SeeSR's RCA "
                             "blocks")
        self.block_config()

    def block_config(self) -> UNetConfig:
        """The UNetConfig of the blocks this ControlNet builds (up types mirrored only to
        satisfy UNetConfig's checks)."""
        down = tuple("CrossAttnDownBlock2D" if i in self.attention_levels else "DownBlock2D"
                     for i in range(len(self.base.block_out_channels)))
        return dataclasses.replace(self.base, down_block_types=down,
                                   up_block_types=tuple(_UP_OF[t] for t in down[::-1]))


COSER_CONTROLNET = CoSeRControlNetConfig()


def _zero_conv(features: int, name: str, dtype, kernel: int = 1) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   kernel_init=nn.initializers.zeros, name=name)


class CoSeRControlNet(nn.Module):
    """Returns the 13 features (tuple, compute dtype): 12 skip features then the mid one.
    `remat` rematerialises every ResNet and transformer layer in the backward pass."""

    config: CoSeRControlNetConfig = COSER_CONTROLNET
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, hint):
        cfg, dt = self.config.block_config(), self.dtype
        if hint.shape[:3] != sample.shape[:3]:
            # The original tiles x along width when the hint is wider; CoSeR never does.
            raise ValueError(f"CoSeR ControlNet: hint {hint.shape} must match the latent "
                             f"{sample.shape} in batch, height and width")
        temb = embed_timesteps(cfg, sample.shape[0], timesteps, dt)
        ctx = encoder_hidden_states.astype(dt)
        chans, heads = cfg.block_out_channels, cfg.heads

        h = conv(chans[0], "conv_in", dtype=dt)(sample.astype(dt))
        h = h + _zero_conv(chans[0], "hint_zero_conv", dt, kernel=3)(hint.astype(dt))
        block = dict(config=cfg, attention=self.attention, dtype=dt, remat=self.remat)
        h, skips = encoder_blocks(cfg, h, temb, ctx, None, dtype=dt, attention=self.attention,
                                  remat=self.remat)
        h = MidBlock(channels=chans[-1], heads=heads[-1], with_attention=True, name="mid_block",
                     **block)(h, temb, ctx, None)
        feats = [_zero_conv(s.shape[-1], f"controlnet_down_blocks_{k}", dt)(s)
                 for k, s in enumerate(skips)]
        return tuple(feats) + (_zero_conv(chans[-1], "controlnet_mid_block", dt)(h),)

    def lr_and_reference(self, sample, timesteps, encoder_hidden_states, lr_latent, ref_latent):
        """Both CoSeR calls in one forward: (X features, R features), each a 13-tuple of
        [B, ...] arrays. Runs the network once on the batch [sample; sample] with hints
        [lr_latent; ref_latent]."""
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        twice = lambda a: jnp.concatenate([a, a], axis=0)
        feats = self(twice(sample), twice(t), twice(encoder_hidden_states),
                     jnp.concatenate([lr_latent, ref_latent.astype(lr_latent.dtype)], axis=0))
        return tuple(f[:b] for f in feats), tuple(f[b:] for f in feats)


def dummy_inputs(config: CoSeRControlNetConfig, batch: int = 1, size: int = 8):
    """Inputs of the right ranks for `init`/`eval_shape` (size: latent side)."""
    base = config.base
    size = max(size, 2 ** (len(base.block_out_channels) - 1))
    sample = jnp.zeros((batch, size, size, base.in_channels), jnp.float32)
    ctx = jnp.zeros((batch, 127, base.cross_attention_dim), jnp.float32)
    return sample, jnp.zeros((batch,), jnp.int32), ctx, sample


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: CoSeRControlNetConfig = COSER_CONTROLNET):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating it."""
    model = CoSeRControlNet(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
    return shapes["params"]
