"""CoSeR's cognitive encoder: the image-only path that turns an LR image into E.

    lr [B, h, w, 3] in [0, 1] -> E [B, num_query_tokens, hidden] (50 × 1024)

    E = QFormer(CLIPVision(clip_preprocess(MSRResNet(lr))))

The three parts are submodules named after their checkpoint prefixes' last
component: `pre_sr_model` (MSRResNet, `pre_sr_model.*`), `visual` (the OpenCLIP
ViT-H/14 vision tower, `cond_stage_model.model.visual.*`) and `global_adapter`
(Q-Former, `global_adapter.*`); `jaxsr.convert.coser_cognitive` fills them.
In stage-1 training the MSRResNet and the Q-Former are trained while CLIP is frozen,
so the SRResNet learns only through CLIP; splitting the param tree by these three
keys is all a trainer needs. In stage 2 and at inference all three are frozen.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.models.clip_vision import VIT_H_14, CLIPVisionConfig, CLIPVisionTower, clip_preprocess
from jaxsr.models.qformer import COSER_QFORMER, QFormer, QFormerConfig
from jaxsr.models.srresnet import COSER_SRRESNET, MSRResNet, SRResNetConfig


@dataclasses.dataclass(frozen=True)
class CognitiveConfig:
    srresnet: SRResNetConfig = COSER_SRRESNET
    vision: CLIPVisionConfig = VIT_H_14
    qformer: QFormerConfig = COSER_QFORMER

    def __post_init__(self):
        if self.qformer.encoder_width != self.vision.output_dim:
            raise ValueError(f"Q-Former encoder_width {self.qformer.encoder_width} must equal "
                             f"the CLIP output_dim {self.vision.output_dim}")
        if self.srresnet.num_out_ch != 3:
            raise ValueError("the SRResNet must output RGB for CLIP")


# CoSeR as released: MSRResNet ×4 (1.52M), ViT-H/14 (632.1M), Q-Former (258.6M).
COSER_COGNITIVE = CognitiveConfig()

# Same structure, laptop size: a four-layer Q-Former (cross-attention in layers 0
# and 2), a two-block 42 px ViT (3×3 patches + CLS), a two-block SRResNet ×4.
TINY_COGNITIVE = CognitiveConfig(
    srresnet=SRResNetConfig(num_feat=8, num_block=2, upscale=4),
    vision=CLIPVisionConfig(image_size=42, patch_size=14, width=32, layers=2, heads=4,
                            mlp_dim=64, output_dim=24),
    qformer=QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=48, encoder_width=24, num_query_tokens=6,
                          vocab_size=40, max_position_embeddings=16),
)


class CognitiveEncoder(nn.Module):
    """lr [B, h, w, 3] in [0, 1] -> E [B, num_query_tokens, hidden] float32.

    `deterministic=False` turns on the Q-Former's dropout (rng stream 'dropout').
    """

    config: CognitiveConfig = COSER_COGNITIVE
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, lr, deterministic: bool = True):
        cfg = self.config
        sr = MSRResNet(cfg.srresnet, self.dtype, name="pre_sr_model")(lr)
        pixels = clip_preprocess(sr, cfg.vision)
        tokens = CLIPVisionTower(cfg.vision, self.attention, self.dtype, name="visual")(pixels)
        return QFormer(cfg.qformer, self.attention, self.dtype, name="global_adapter")(
            tokens, deterministic)


def param_shapes(config: CognitiveConfig = COSER_COGNITIVE):
    """{'pre_sr_model', 'visual', 'global_adapter'} param shapes, without allocating."""
    lr = jnp.zeros((1, 8, 8, 3), jnp.float32)
    model = CognitiveEncoder(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), lr))["params"]
