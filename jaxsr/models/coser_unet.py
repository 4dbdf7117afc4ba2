"""CoSeR's AiA UNet (LDM `UNetModelAiA`) in Flax.

The SD2 UNet of jaxsr.models.unet (same blocks, same diffusers names, so SD2 weights
and the LDM→diffusers rename rules apply unchanged) whose mid block and decoder
transformers are All-in-Attention transformers (jaxsr.models.aia). The encoder
transformers stay plain SD ones.

Control routing: the CoSeR ControlNet returns 13 features per latent (one per UNet
skip, then the mid block's). The mid transformer reads feature 12; decoder layer j
(LDM output_blocks[j]) reads feature 11−j, i.e. the feature at the index of the skip
that layer concatenates. LDM output blocks 0–2 have no transformer, so features 9–11
are unused. X comes from the LR latent, R from the reference latent.

Context: CoSeR conditions every cross-attention on [prompt; E] (77 + 50 = 127 tokens
for SD2.1 + the cognitive adapter); `coser_context` builds it.

Shapes (NHWC): sample [B, h, w, 4]; timesteps [B] or scalar; encoder_hidden_states
[B, Lc, 1024]; lr_features, ref_features: 13 arrays each, shapes from
`control_feature_shapes`, or both None (gen mode: the plain SD UNet with CoSeR's
context, used to generate the reference latent).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.models.aia import REFERENCE_ATTENTION_MODES, AiATransformer2D
from jaxsr.models.unet import (
    SD2_BASE_UNET,
    MidBlock,
    UNetConfig,
    UpBlock,
    checkpointed,
    embed_timesteps,
    unet_body,
)


@dataclasses.dataclass(frozen=True)
class CoSeRUNetConfig:
    """`base`: the SD UNet's diffusers config (SD-2.1-base by default; CoSeR keeps its
    weights frozen). `reference_attention`: "released" or "paper" (jaxsr.models.aia)."""

    base: UNetConfig = SD2_BASE_UNET
    reference_attention: str = "released"

    def __post_init__(self):
        if self.reference_attention not in REFERENCE_ATTENTION_MODES:
            raise ValueError(f"CoSeRUNetConfig.reference_attention={self.reference_attention!r};"
                             f" choose one of {REFERENCE_ATTENTION_MODES}")
        if self.base.use_image_cross_attention:
            raise ValueError("CoSeRUNetConfig: the base UNet must not have SeeSR's RCA blocks")
        if not self.base.use_linear_projection:
            raise ValueError("CoSeRUNetConfig: AiA transformers need use_linear_projection "
                             "(CoSeR's use_linear_in_transformer)")

    @property
    def num_features(self) -> int:
        """ControlNet features per latent: one per skip plus the mid block's (13 for SD)."""
        levels = len(self.base.block_out_channels)
        return 1 + levels * self.base.layers_per_block + (levels - 1) + 1


COSER_UNET = CoSeRUNetConfig()


def coser_context(prompt_emb, adapter_emb):
    """CoSeR's cross-attention context: [prompt (77); E (50)] along tokens, or E's slot
    alone when there is no prompt (the original's negative CFG branch passes the
    negative-prompt embedding there). [B, Lp, C], [B, Le, C] -> [B, Lp + Le, C]."""
    if prompt_emb is None:
        return adapter_emb
    return jnp.concatenate([prompt_emb, adapter_emb.astype(prompt_emb.dtype)], axis=1)


def control_feature_shapes(base: UNetConfig, batch: int, height: int, width: int):
    """Shapes of the 13 ControlNet features for a [batch, height, width, ·] latent: the
    UNet's skips (conv_in, every down layer and downsampler), then the mid block."""
    chans, lpb = base.block_out_channels, base.layers_per_block
    shapes = [(batch, height, width, chans[0])]
    for i, c in enumerate(chans):
        shapes += [(batch, height, width, c)] * lpb
        if i < len(chans) - 1:
            # 3×3 stride-2 conv with padding 1: ceil(n / 2)
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((batch, height, width, c))
    return shapes + [(batch, height, width, chans[-1])]


def _aia_attend(block, h, j, ctx, control, dubch: bool):
    """Transformer `attentions_j` of a mid/up block as an AiA transformer; `control` is
    the block's per-layer (lr_feature, ref_feature) pairs, or None in gen mode."""
    if not block.with_attention:
        return h
    lr, ref = (None, None) if control is None else control[j]
    aia = checkpointed(AiATransformer2D, block.remat)
    return aia(heads=block.heads, head_dim=block.channels // block.heads,
               groups=block.config.norm_num_groups, dubch=dubch,
               reference_attention=block.reference_attention, attention=block.attention,
               dtype=block.dtype, name=f"attentions_{j}")(h, ctx, lr, ref)


class AiAMidBlock(MidBlock):
    """UNetMidBlock2DCrossAttn with an AiA transformer. The inherited __call__ passes
    its last argument (here: a 1-tuple with the mid (lr, ref) pair, or None) to
    `attend`."""

    reference_attention: str = "released"

    def attend(self, h, j, ctx, control):
        return _aia_attend(self, h, j, ctx, control, dubch=False)


class AiAUpBlock(UpBlock):
    """CrossAttnUpBlock2D with AiA transformers; the last __call__ argument before the
    upsample size is the per-layer (lr, ref) pairs, or None."""

    reference_attention: str = "released"

    def attend(self, h, j, ctx, control):
        # LDM's "dubch" blocks (output_blocks 5 and 8 in SD): the last layer of each
        # level but the full-resolution one reads the previous level's downsampler
        # output, half as wide, through a 3×3 conv.
        dubch = self.add_upsample and j == self.config.layers_per_block
        return _aia_attend(self, h, j, ctx, control, dubch)


class CoSeRUNet(nn.Module):
    """ε-prediction AiA UNet. Returns [B, h, w, out_channels] in float32. `remat`
    rematerialises every ResNet, SD and AiA transformer layer in the backward pass."""

    config: CoSeRUNetConfig = COSER_UNET
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states,
                 lr_features: Sequence[jax.Array] | None = None,
                 ref_features: Sequence[jax.Array] | None = None):
        cfg, dt = self.config.base, self.dtype
        if (lr_features is None) != (ref_features is None):
            raise ValueError("CoSeRUNet: pass both lr_features and ref_features (SR), or "
                             "neither (gen mode)")
        mid_control = up_controls = None
        if lr_features is not None:
            n = self.config.num_features
            if len(lr_features) != n or len(ref_features) != n:
                raise ValueError(f"CoSeRUNet expects {n} ControlNet features each, got "
                                 f"{len(lr_features)} LR and {len(ref_features)} reference")
            mid_control, up_controls = route_control(cfg, list(zip(lr_features, ref_features)))

        temb = embed_timesteps(cfg, sample.shape[0], timesteps, dt)
        return unet_body(cfg, sample, temb, encoder_hidden_states.astype(dt), dtype=dt,
                         attention=self.attention, remat=self.remat, mid_block=AiAMidBlock,
                         up_block=AiAUpBlock,
                         decoder_kwargs=dict(reference_attention=self.config.reference_attention),
                         mid_extra=mid_control, up_extra=up_controls)


def route_control(base: UNetConfig, feats: list):
    """The 13 (lr, ref) feature pairs -> (the mid block's 1-tuple, per up level the
    pairs its layers read, in layer order): level i takes the features at the indices
    of the skips it concatenates, so the last layer of the encoder feeds the first
    decoder layer."""
    mid, rest = (feats[-1],), feats[:-1]
    n, levels = base.layers_per_block + 1, len(base.block_out_channels)
    ups = []
    for _ in range(levels):
        ups.append(rest[-n:][::-1])
        rest = rest[:-n]
    return mid, ups


def dummy_inputs(config: CoSeRUNetConfig, batch: int = 1, size: int = 8):
    """Inputs of the right ranks for `init`/`eval_shape` (size: latent side), with
    control features so that every AiA parameter is created."""
    base = config.base
    size = max(size, 2 ** (len(base.block_out_channels) - 1))
    sample = jnp.zeros((batch, size, size, base.in_channels), jnp.float32)
    ctx = jnp.zeros((batch, 127, base.cross_attention_dim), jnp.float32)
    feats = [jnp.zeros(s, jnp.float32) for s in control_feature_shapes(base, batch, size, size)]
    return sample, jnp.zeros((batch,), jnp.int32), ctx, feats, feats


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: CoSeRUNetConfig = COSER_UNET):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating it."""
    model = CoSeRUNet(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
    return shapes["params"]
