"""DAPE, SeeSR's degradation-aware prompt extractor: RAM (Swin-L 384 + tagging head)
with LoRA on the Swin qkv (q and v rows) and the tagging head's query/key.

    images [B, 384, 384, 3] normalised by `ram_preprocess`
      -> image_embeds [B, 145, 512]   the soft prompt (`ram_encoder_hidden_states`)
      -> tag_logits   [B, 4585]       thresholded into the hard prompt by `tags.hard_prompt`

With `lora_rank` 0 the LoRA updates are expected merged into the weights (what
loralib's `eval()` does and what `jaxsr.convert.ram.load_ram` returns). With
`lora_rank` 8 the LoRA tensors are separate params (`lora_A`, `lora_B`) that a
trainer can update alone; `merge_dape_lora` folds them in.

Param tree (torch names): `visual_encoder/...` (see swin.py), `image_proj`,
`label_embed` [C, 512], `wordvec_proj`, `tagging_head/encoder/layer_{i}/...`
(see ram_head.py), `fc`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.models.ram_head import TagHead, TagHeadConfig
from jaxsr.models.swin import SwinConfig, SwinTransformer, swin_large_384
from jaxsr.nn.lora import fold_lora_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# LoRA of the released DAPE: loralib r=8, lora_alpha=1 (scale 1/8).
DAPE_LORA_RANK = 8
DAPE_LORA_ALPHA = 1.0
SWIN_QKV_LORA_GROUPS = (True, False, True)   # q and v rows adapted, k untouched


@dataclasses.dataclass(frozen=True)
class DAPEConfig:
    swin: SwinConfig = dataclasses.field(default_factory=swin_large_384)
    head: TagHeadConfig = dataclasses.field(default_factory=TagHeadConfig)
    num_classes: int = 4585
    embed_width: int = 512           # image_proj output = label_embed width
    lora_rank: int = 0               # 0: LoRA merged (inference); 8: DAPE training
    lora_alpha: float = DAPE_LORA_ALPHA

    def __post_init__(self):
        if self.head.encoder_width != self.embed_width:
            raise ValueError(f"tag head encoder_width {self.head.encoder_width} != "
                             f"embed_width {self.embed_width}")


def ram_preprocess(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RAM's input normalisation: (x - mean) / std per channel.

    images: [B, H, W, 3] RGB in [0, 1], already resized to the encoder size (384²):
      SeeSR inference resizes the original LR with bilinear interpolation (antialias
      off), training uses bicubic from the 512² sr_bicubic and clamps to [0, 1]
      (see the pipelines); this function does not resize.
    Returns float32 [B, H, W, 3].
    """
    x = jnp.asarray(images, jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class DAPE(nn.Module):
    """RAM/DAPE image encoder and tag classifier.

    Methods (use with `apply(..., method=...)`):
      image_embeds(images) -> [B, 1 + N, embed_width]   (soft prompt)
      tag_logits_from_embeds(image_embeds) -> [B, num_classes]
      __call__(images) -> (image_embeds, tag_logits)
    `deterministic=False` enables Swin stochastic depth and BERT dropout (rng
    stream 'dropout'), as in DAPE training where the student is in train mode.
    """

    config: DAPEConfig = dataclasses.field(default_factory=DAPEConfig)
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.visual_encoder = SwinTransformer(cfg.swin, cfg.lora_rank, cfg.lora_alpha,
                                              self.dtype)
        self.image_proj = nn.Dense(cfg.embed_width, dtype=self.dtype)
        self.label_embed = self.param("label_embed", nn.initializers.normal(0.02),
                                      (cfg.num_classes, cfg.embed_width), jnp.float32)
        self.wordvec_proj = nn.Dense(cfg.head.hidden_size, dtype=self.dtype)
        self.tagging_head = TagHead(cfg.head, cfg.lora_rank, cfg.lora_alpha, self.attention,
                                    self.dtype)
        self.fc = nn.Dense(1, dtype=self.dtype)

    def image_embeds(self, images, deterministic: bool = True):
        """images [B, S, S, 3] normalised -> soft prompt [B, 1 + N, embed_width] float32."""
        feats = self.visual_encoder(images, deterministic)
        return self.image_proj(feats).astype(jnp.float32)

    def tag_logits_from_embeds(self, image_embeds, deterministic: bool = True):
        """soft prompt [B, L, embed_width] -> logits [B, num_classes] float32."""
        queries = nn.relu(self.wordvec_proj(self.label_embed.astype(self.dtype)))
        queries = jnp.broadcast_to(queries[None], (image_embeds.shape[0],) + queries.shape)
        hidden = self.tagging_head(queries, image_embeds, deterministic)
        return self.fc(hidden)[..., 0].astype(jnp.float32)

    def tag_logits(self, images, deterministic: bool = True):
        return self.tag_logits_from_embeds(self.image_embeds(images, deterministic),
                                           deterministic)

    def __call__(self, images, deterministic: bool = True):
        embeds = self.image_embeds(images, deterministic)
        return embeds, self.tag_logits_from_embeds(embeds, deterministic)


@functools.cache
def param_shapes(config: DAPEConfig):
    """The Flax param tree of `DAPE(config)` as ShapeDtypeStructs (no memory).

    Cached per config (tracing Swin-L takes seconds); treat the result as read-only.
    """
    size = config.swin.img_size
    images = jax.ShapeDtypeStruct((1, size, size, config.swin.in_chans), jnp.float32)
    return jax.eval_shape(lambda x: DAPE(config).init(jax.random.key(0), x), images)["params"]


def lora_groups_of(module_path: tuple[str, ...]) -> tuple[bool, ...]:
    """Row groups of a DAPE module's LoRA: Swin qkv adapts q and v, the rest all rows."""
    return SWIN_QKV_LORA_GROUPS if module_path[-1] == "qkv" else (True,)


def merge_dape_lora(params, config: DAPEConfig):
    """Unmerged (lora_rank > 0) DAPE params -> (config with lora_rank 0, merged params)."""
    if config.lora_rank <= 0:
        raise ValueError("config has no LoRA to merge (lora_rank is 0)")
    merged = fold_lora_params(params, config.lora_alpha, lora_groups_of)
    return dataclasses.replace(config, lora_rank=0), merged


def count_params(params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
