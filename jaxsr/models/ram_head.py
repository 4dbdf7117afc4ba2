"""RAM's tagging head (Query2Label style), in Flax.

A BERT encoder whose embeddings and self-attention were deleted: each layer is a
cross-attention from the class queries to the image tokens, then BERT's FFN, both
post-LayerNorm residual (BertSelfOutput / BertOutput: LayerNorm(dense(h) + input)).

queries [B, C, hidden] (C = number of classes), image tokens [B, L, encoder_width]
-> [B, C, hidden]. The module is `tagging_head` of DAPE; its params follow the torch
names `encoder/layer_{i}/crossattention/self/{query,key,value}`,
`.../crossattention/output/{dense,LayerNorm}`, `.../intermediate/dense`,
`.../output/{dense,LayerNorm}`. Query and key carry the (optional) DAPE LoRA.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.attention import dot_product_attention
from jaxsr.nn.layers import LayerNorm
from jaxsr.nn.lora import LoRADense


@dataclasses.dataclass(frozen=True)
class TagHeadConfig:
    """RAM's `q2l_config.json` (BERT field names)."""

    hidden_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 3072
    encoder_width: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")


class _CrossAttentionSelf(nn.Module):
    """BertSelfAttention as cross-attention: q from the queries, k/v from the image."""

    config: TagHeadConfig
    lora_rank: int = 0
    lora_alpha: float = 1.0
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):
        cfg = self.config
        heads, width = cfg.num_attention_heads, cfg.hidden_size
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, dtype=self.dtype)
        q = LoRADense(width, name="query", **lora)(x)
        k = LoRADense(width, name="key", **lora)(context)
        v = nn.Dense(width, dtype=self.dtype, name="value")(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, width // heads)
        q, k, v = split(q), split(k), split(v)
        rate = cfg.attention_probs_dropout_prob
        if deterministic or rate == 0.0:
            # The image mask is all ones in RAM, so no mask is applied.
            out = dot_product_attention(q, k, v, backend=self.attention)
        else:
            # Training: BERT drops attention probabilities, which the fused backends
            # cannot do; the key sequence is short (145), so plain einsum is cheap.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits * (width // heads) ** -0.5, axis=-1)
            probs = nn.Dropout(rate)(probs, deterministic=False).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.reshape(out.shape[0], out.shape[1], width)


class _ResidualOutput(nn.Module):
    """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + residual)."""

    config: TagHeadConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, residual, deterministic: bool = True):
        cfg = self.config
        h = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="dense")(h)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(h + residual)


class _CrossAttention(nn.Module):
    config: TagHeadConfig
    lora_rank: int = 0
    lora_alpha: float = 1.0
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):
        h = _CrossAttentionSelf(self.config, self.lora_rank, self.lora_alpha, self.attention,
                                self.dtype, name="self")(x, context, deterministic)
        return _ResidualOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class _Intermediate(nn.Module):
    config: TagHeadConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="dense")(x)
        return nn.gelu(h, approximate=False)


class TagHeadLayer(nn.Module):
    """One head layer: cross-attention block, then the FFN block."""

    config: TagHeadConfig
    lora_rank: int = 0
    lora_alpha: float = 1.0
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):
        x = _CrossAttention(self.config, self.lora_rank, self.lora_alpha, self.attention,
                            self.dtype, name="crossattention")(x, context, deterministic)
        h = _Intermediate(self.config, self.dtype, name="intermediate")(x)
        return _ResidualOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class _Encoder(nn.Module):
    config: TagHeadConfig
    lora_rank: int = 0
    lora_alpha: float = 1.0
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):
        for i in range(self.config.num_hidden_layers):
            x = TagHeadLayer(self.config, self.lora_rank, self.lora_alpha, self.attention,
                             self.dtype, name=f"layer_{i}")(x, context, deterministic)
        return x


class TagHead(nn.Module):
    """RAM `tagging_head` (BertModel in 'tagging' mode, no embeddings, no pooler).

    queries [B, C, hidden], image_embeds [B, L, encoder_width] -> [B, C, hidden].
    """

    config: TagHeadConfig = dataclasses.field(default_factory=TagHeadConfig)
    lora_rank: int = 0
    lora_alpha: float = 1.0
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, image_embeds, deterministic: bool = True):
        return _Encoder(self.config, self.lora_rank, self.lora_alpha, self.attention,
                        self.dtype, name="encoder")(
            queries.astype(self.dtype), image_embeds.astype(self.dtype), deterministic)
