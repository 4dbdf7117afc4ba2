"""The SD2 text encoder in Flax: OpenCLIP ViT-H/14's text tower as transformers
`CLIPTextModel` holds it (23 of OpenCLIP's 24 layers, i.e. SD2's "penultimate"
output, followed by the final layer norm).

    input_ids [B, L] int32 -> last_hidden_state [B, L, hidden] float32

Numerics follow transformers' CLIPTextModel: token + learned position embeddings,
pre-norm encoder layers with causal self-attention (no padding mask, as the SD
pipelines call it), LayerNorm eps from the config, MLP activation `hidden_act`.
The param tree mirrors the transformers module names under `text_model/`, so the
generic `jaxsr.convert.tree` rule converts the released checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.attention import dot_product_attention
from jaxsr.nn.layers import LayerNorm

# transformers' ACT2FN entries a CLIP text config can name: "gelu" is the exact
# (erf) form that OpenCLIP-H / SD2 uses; "quick_gelu" is OpenAI CLIP's x*sigmoid(1.702x).
_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of transformers' CLIPTextConfig (same names).

    Defaults are SD2's text_encoder/config.json. The token ids do not change the
    hidden states (transformers reads eos_token_id only to pick the pooled
    token, which SD does not use); they are kept so that an exported model
    carries the config it was converted from.
    """

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"text encoder hidden_act {self.hidden_act!r} is not supported "
                             f"(choose from {sorted(_ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text encoder hidden_size {self.hidden_size} is not divisible "
                             f"by num_attention_heads {self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, d: dict) -> CLIPTextConfig:
        """From a transformers CLIPTextConfig dict (config.json); other keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields and v is not None})

    def to_hf_config(self) -> dict:
        """A config.json dict from which transformers rebuilds the same CLIPTextModel."""
        return {**dataclasses.asdict(self), "architectures": ["CLIPTextModel"],
                "model_type": "clip_text_model", "attention_dropout": 0.0,
                "initializer_factor": 1.0, "initializer_range": 0.02}


SD2_TEXT_ENCODER = CLIPTextConfig(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q_proj/k_proj/v_proj/out_proj: [B, L, C] -> [B, L, C]."""

    config: CLIPTextConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        b, length, c = x.shape
        proj = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
        heads = lambda t: t.reshape(b, length, cfg.num_attention_heads, cfg.head_dim)
        q, k, v = (heads(proj(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask, backend=self.attention)
        return proj("out_proj")(out.reshape(b, length, c))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: [B, L, C] -> [B, L, C]."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)). [B, L, C] -> [B, L, C]."""

    config: CLIPTextConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.attention, self.dtype, name="self_attn")(h, mask)
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(cfg, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` encoder layers named layers_0 ... layers_{n-1}."""

    config: CLIPTextConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.attention, self.dtype,
                                 name=f"layers_{i}")(x, mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned position embeddings: [B, L] -> [B, L, hidden] float32."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                             name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    """embeddings -> causal encoder -> final_layer_norm: [B, L] -> [B, L, hidden] in dtype."""

    config: CLIPTextConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed the text encoder's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids).astype(self.dtype)
        # Token i attends to tokens 0..i. Padding is not masked: SD conditions on
        # all 77 positions, pads included, exactly as the PyTorch pipelines do.
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        x = CLIPEncoder(cfg, self.attention, self.dtype, name="encoder")(x, causal)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_layer_norm")(x)


class CLIPTextModel(nn.Module):
    """transformers CLIPTextModel's `last_hidden_state`.

    input_ids [B, L] int (L <= max_position_embeddings) -> [B, L, hidden] float32
    (computed in `dtype`, returned in float32 for the UNet's cross-attention).
    """

    config: CLIPTextConfig = SD2_TEXT_ENCODER
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, input_ids):
        ids = jnp.asarray(input_ids, jnp.int32)
        out = CLIPTextTransformer(self.config, self.attention, self.dtype,
                                  name="text_model")(ids)
        return out.astype(jnp.float32)


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: CLIPTextConfig):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating weights."""
    model = CLIPTextModel(config)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
