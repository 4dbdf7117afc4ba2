"""CoSeR's Q-Former (`global_adapter`, class CogAdapter), in Flax.

    image_tokens [B, L, encoder_width] (CLIP tokens) -> E [B, num_query_tokens, hidden]

A LAVIS/BLIP-2 `BertModel` run on its learned query tokens only (no input ids):
  h = dropout(LayerNorm(query_tokens))                       (embeddings.LayerNorm)
  per layer i:
    h = LN(h + dropout(dense(SelfAttn(h))))                  (attention.*)
    if i % cross_attention_freq == 0:
      h = LN(h + dropout(dense(CrossAttn(h, image_tokens)))) (crossattention.*)
    h = LN(h + dropout(dense(gelu(dense(h)))))               (intermediate_query / output_query)
  E = h
Post-LN BERT, exact GELU, LayerNorm eps 1e-12, no attention mask (the image mask is
all ones), no pooler. Attention probabilities and hidden states get dropout 0.1
when `deterministic=False` (rng stream 'dropout'); stage-1 training runs so.

Batch: like the reference, the queries stay a batch of one until the first
cross-attention, where they broadcast against the image batch. In eval mode this is
only cheaper; in train mode it gives the reference's dropout statistics: the
embedding dropout and layer 0's self-attention dropouts draw ONE mask that all
samples of the batch share (later dropouts are per sample).

Checkpoint tensors that the forward never reads are still real params, created at
init only (see `UNUSED_PARAMS`): `embeddings.word_embeddings`,
`embeddings.position_embeddings` (the text path of BERT) and every layer's text FFN
`intermediate` / `output`. That keeps conversion strict with no ignore rule beyond
BERT's `position_ids` buffer, and lets an exported tree load back into the PyTorch
CogAdapter. Trainers should
exclude them from the optimizer (`trainable_mask`): PyTorch's AdamW skips params
without a gradient, whereas optax would decay them.
Param names mirror the torch names: `query_tokens`, `Qformer/embeddings/...`,
`Qformer/encoder/layer_{i}/{attention, crossattention}/{self/{query, key, value},
output/{dense, LayerNorm}}`, `.../{intermediate, intermediate_query}/dense`,
`.../{output, output_query}/{dense, LayerNorm}`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsr.nn.attention import dot_product_attention
from jaxsr.nn.layers import LayerNorm


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """CogAdapter's BertConfig: bert-base-uncased with CoSeR's overrides (defaults)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    intermediate_size: int = 3072
    encoder_width: int = 1024
    cross_attention_freq: int = 2
    num_query_tokens: int = 50
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Q-Former hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError("cross_attention_freq must be >= 1")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


COSER_QFORMER = QFormerConfig()

# Param paths ('/'-joined) that exist in the checkpoint but that the query-only
# forward never reads (full match).
UNUSED_PARAMS = (
    r"Qformer/embeddings/(word|position)_embeddings/.*",
    r"Qformer/encoder/layer_\d+/(intermediate|output)/.*",
)


def trainable_mask(params):
    """Bool tree like `params` (the QFormer's own tree): False on `UNUSED_PARAMS`."""
    patterns = [re.compile(p) for p in UNUSED_PARAMS]
    flat = traverse_util.flatten_dict(params)
    mask = {k: not any(p.fullmatch("/".join(k)) for p in patterns) for k in flat}
    return traverse_util.unflatten_dict(mask)


def _dense(config: QFormerConfig, features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(config.initializer_range))


class BertSelfAttention(nn.Module):
    """query from x [B, Lq, H]; key/value from context [B, Lk, Ck] (x for self-attention).

    Returns the heads' merged context [B, Lq, H], before the output dense.
    """

    config: QFormerConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):
        cfg = self.config
        width, heads = cfg.hidden_size, cfg.num_attention_heads
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, width // heads)
        q = split(_dense(cfg, width, "query", self.dtype)(x))
        k = split(_dense(cfg, width, "key", self.dtype)(context))
        v = split(_dense(cfg, width, "value", self.dtype)(context))
        rate = cfg.attention_probs_dropout_prob
        if deterministic or rate == 0.0:
            out = dot_product_attention(q, k, v, backend=self.attention)
        else:
            # BERT drops attention probabilities, which the fused backends cannot do;
            # the sequences are short (50 queries, 257 image tokens), so einsum is cheap.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits * (width // heads) ** -0.5, axis=-1)
            probs = nn.Dropout(rate)(probs, deterministic=False).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.reshape(out.shape[0], out.shape[1], width)


class BertResidualOutput(nn.Module):
    """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + residual) -> [B, L, H]."""

    config: QFormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, residual, deterministic: bool = True):
        cfg = self.config
        h = _dense(cfg, cfg.hidden_size, "dense", self.dtype)(h)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(h + residual)


class BertAttention(nn.Module):
    """`self` attention + `output` block; cross-attention when context is given."""

    config: QFormerConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, deterministic: bool = True):
        context = x if context is None else context
        h = BertSelfAttention(self.config, self.attention, self.dtype, name="self")(
            x, context, deterministic)
        return BertResidualOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class BertIntermediate(nn.Module):
    """BertIntermediate: exact GELU(dense(x)). [B, L, H] -> [B, L, intermediate_size]."""

    config: QFormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _dense(self.config, self.config.intermediate_size, "dense", self.dtype)(x)
        return nn.gelu(h, approximate=False)


class BertLayer(nn.Module):
    """One Q-Former layer on the queries: [1 or B, Lq, H] -> [B', Lq, H]."""

    config: QFormerConfig
    cross_attention: bool
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image_tokens, deterministic: bool = True):
        cfg = self.config
        x = BertAttention(cfg, self.attention, self.dtype, name="attention")(
            x, None, deterministic)
        if self.cross_attention:
            # Queries may still be a batch of one (see module docstring).
            x = jnp.broadcast_to(x, (image_tokens.shape[0],) + x.shape[1:])
            x = BertAttention(cfg, self.attention, self.dtype, name="crossattention")(
                x, image_tokens, deterministic)
        if self.is_initializing():
            # BERT's text FFN: in the checkpoint, never run on queries.
            h = BertIntermediate(cfg, self.dtype, name="intermediate")(x)
            BertResidualOutput(cfg, self.dtype, name="output")(h, x, True)
        h = BertIntermediate(cfg, self.dtype, name="intermediate_query")(x)
        return BertResidualOutput(cfg, self.dtype, name="output_query")(h, x, deterministic)


class BertEncoder(nn.Module):
    """`num_hidden_layers` layers named layer_0 ... layer_{n-1}."""

    config: QFormerConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image_tokens, deterministic: bool = True):
        cfg = self.config
        for i in range(cfg.num_hidden_layers):
            x = BertLayer(cfg, cfg.has_cross_attention(i), self.attention, self.dtype,
                          name=f"layer_{i}")(x, image_tokens, deterministic)
        return x


class BertEmbeddings(nn.Module):
    """Query-only embeddings: dropout(LayerNorm(query_embeds)). [1, Lq, H] -> [1, Lq, H]."""

    config: QFormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_embeds, deterministic: bool = True):
        cfg = self.config
        if self.is_initializing():
            # The text path (input ids + positions); in the checkpoint, never run here.
            init = nn.initializers.normal(cfg.initializer_range)
            ids = jnp.zeros((1, 1), jnp.int32)
            nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                     name="word_embeddings")(ids)
            nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                     name="position_embeddings")(ids)
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(query_embeds)
        return nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class BertModel(nn.Module):
    """LAVIS `BertModel(add_pooling_layer=False)` on query embeddings (`Qformer`)."""

    config: QFormerConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_embeds, image_tokens, deterministic: bool = True):
        h = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            query_embeds.astype(self.dtype), deterministic)
        return BertEncoder(self.config, self.attention, self.dtype, name="encoder")(
            h, image_tokens.astype(self.dtype), deterministic)


class QFormer(nn.Module):
    """CoSeR `CogAdapter` forward without a text target.

    image_tokens [B, L, encoder_width] -> last_hidden_state [B, num_query_tokens,
    hidden_size] float32. `deterministic=False` needs rngs={'dropout': key}.
    """

    config: QFormerConfig = COSER_QFORMER
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens, deterministic: bool = True):
        cfg = self.config
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != cfg.encoder_width:
            raise ValueError(f"Q-Former expects image tokens [B, L, {cfg.encoder_width}], "
                             f"got {image_tokens.shape}")
        queries = self.param("query_tokens", nn.initializers.normal(cfg.initializer_range),
                             (1, cfg.num_query_tokens, cfg.hidden_size), jnp.float32)
        out = BertModel(cfg, self.attention, self.dtype, name="Qformer")(
            queries, image_tokens, deterministic)
        # Without any cross-attention layer the queries never met the batch.
        out = jnp.broadcast_to(out, (image_tokens.shape[0],) + out.shape[1:])
        return out.astype(jnp.float32)


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: QFormerConfig = COSER_QFORMER):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating weights."""
    tokens = jnp.zeros((1, 4, config.encoder_width), jnp.float32)
    model = QFormer(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
