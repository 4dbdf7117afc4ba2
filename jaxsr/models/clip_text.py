"""The SD2 text encoder: OpenCLIP ViT-H/14's text tower in the transformers
`CLIPTextModel` layout (23 of its 24 layers, the "penultimate" output, then the
final layer norm), in Flax.

input_ids [B, L] int32 → last_hidden_state [B, L, hidden] (float32 out).
The param tree follows the released checkpoints (`text_model/encoder/layers_0/...`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.nn.attention import dot_product_attention
from jaxsr.nn.layers import LayerNorm

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig fields (same names)."""

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"text encoder hidden_act {self.hidden_act!r} is not supported "
                             f"(choose from {sorted(_ACTIVATIONS)})")

    @classmethod
    def from_hf_config(cls, d: dict) -> CLIPTextConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields and v is not None})

    def to_hf_config(self) -> dict:
        return {**dataclasses.asdict(self), "architectures": ["CLIPTextModel"],
                "model_type": "clip_text_model", "bos_token_id": 49406, "eos_token_id": 49407,
                "pad_token_id": 1}


SD2_TEXT_ENCODER = CLIPTextConfig()


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm1")(x)
        x = x + _SelfAttention(cfg.num_attention_heads, self.attention, self.dtype,
                               name="self_attn")(h, mask)
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm2")(x)
        return x + _MLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)


class _SelfAttention(nn.Module):
    heads: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        b, length, c = x.shape
        proj = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(b, length, self.heads, c // self.heads)
        q, k, v = (split(proj(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask, backend=self.attention)
        return proj("out_proj")(out.reshape(b, length, c))


class _MLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(_ACTIVATIONS[self.hidden_act](h))


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        x = _Embeddings(cfg, name="embeddings")(input_ids).astype(self.dtype)
        # Causal: token i attends to tokens 0..i (SD uses no padding mask).
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        x = _Encoder(cfg, self.attention, self.dtype, name="encoder")(x, causal)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_layer_norm")(x)


class _Encoder(nn.Module):
    config: CLIPTextConfig
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.attention, self.dtype, name=f"layers_{i}")(x, mask)
        return x


class _Embeddings(nn.Module):
    """Token plus learned position embeddings: [B, L] → [B, L, hidden] float32."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextModel(nn.Module):
    """`last_hidden_state` of transformers' CLIPTextModel."""

    config: CLIPTextConfig = SD2_TEXT_ENCODER
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, input_ids):
        out = _TextTransformer(self.config, self.attention, self.dtype, name="text_model")(
            jnp.asarray(input_ids, jnp.int32))
        return out.astype(jnp.float32)


def param_shapes(config: CLIPTextConfig):
    model = CLIPTextModel(config)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


# Tensors of a text-encoder checkpoint that the SD text encoder never uses:
IGNORED_TEXT_KEYS = (
    r"text_model\.embeddings\.position_ids",  # buffer, recomputed (arange)
    r"text_projection\.weight",               # CLIPTextModelWithProjection / CLIPModel head
    r"logit_scale",                           # CLIPModel contrastive temperature
)


def load_clip_text(state: dict[str, np.ndarray], config: CLIPTextConfig, *,
                   what: str = "text encoder checkpoint"):
    """A transformers CLIPTextModel state dict (with or without the `text_model.`
    prefix; transformers 5 saves it without) → Flax params. Strict."""
    from jaxsr.convert.tree import torch_to_flax

    prefixed = {(k if k.startswith("text_model.") or k in ("text_projection.weight",
                                                            "logit_scale")
                 else "text_model." + k): v for k, v in state.items()}
    return torch_to_flax(prefixed, param_shapes(config), what=what, ignore=IGNORED_TEXT_KEYS)
