"""OpenAI CLIP's ModifiedResNet image tower (RN50 and its relatives) in Flax, as pyiqa's
copy of CLIP (`pyiqa/archs/clip_model.py`) runs it for CLIPIQA.

    pixels [B, H, W, 3] (CLIP-normalised) -> image features [B, output_dim] float32

Against torchvision's ResNet: a three-conv stem (3x3 stride 2, 3x3, 3x3, each
BatchNorm + ReLU) followed by a 2x2 average pool instead of the max pool; stride-2
bottlenecks average-pool after their 3x3 conv (and before their 1x1 downsample conv)
instead of striding a conv; and an attention pool instead of the global average pool:
the spatial tokens, with their mean prepended, attend in one multi-head attention
layer and the mean token's output is the image feature.

pyiqa's attention pool takes `pos_embedding`; CLIPIQA passes False, and then the
positional embedding is NOT added at all (OpenAI's original always adds it, which
ties the input to 224x224). Without it any input size works: H and W only need to
leave at least 1x1 after the 32x reduction (torch's pooling floors odd sizes, as
here). The positional embedding is still a param (shape from `input_resolution`),
created and never read, so the released checkpoint converts strictly.

Param names mirror the torch module names under `visual.`: `conv1..3`, `bn1..3`,
`layer{1..4}_{i}/{conv1..3, bn1..3, downsample_0, downsample_1}`,
`attnpool/{positional_embedding, q_proj, k_proj, v_proj, c_proj}`. BatchNorm (eval
mode, eps 1e-5) keeps torch's `running_mean` / `running_var` as params.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.layers import EvalBatchNorm

_PRECISION = jax.lax.Precision.HIGHEST
_BN_EPS = 1e-5
_EXPANSION = 4          # a bottleneck's output has 4x its inner width


@dataclasses.dataclass(frozen=True)
class ModifiedResNetConfig:
    """The `ModifiedResNet(layers, output_dim, heads, input_resolution, width)` arguments.

    Defaults are RN50's. `heads` follows OpenAI's `build_model`: width * 32 // 64.
    """

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    output_dim: int = 1024
    input_resolution: int = 224

    @property
    def embed_dim(self) -> int:
        """Channels of the last stage, the attention pool's width."""
        return self.width * 32

    @property
    def heads(self) -> int:
        return self.width * 32 // 64

    @property
    def pos_tokens(self) -> int:
        """Rows of the (unused) positional embedding: (resolution / 32)^2 + 1."""
        return (self.input_resolution // 32) ** 2 + 1

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "width": self.width,
                "output_dim": self.output_dim, "input_resolution": self.input_resolution}

    @classmethod
    def from_dict(cls, d: dict) -> ModifiedResNetConfig:
        return cls(layers=tuple(d["layers"]), width=d["width"], output_dim=d["output_dim"],
                   input_resolution=d["input_resolution"])


RN50 = ModifiedResNetConfig()


def _batch_norm(features: int, name: str) -> EvalBatchNorm:
    """Torch's BatchNorm2d in eval mode with this network's eps."""
    return EvalBatchNorm(features, _BN_EPS, name=name)


def _conv(features: int, kernel: int, name: str) -> nn.Conv:
    """Bias-free, stride 1, torch's symmetric padding kernel // 2."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                   use_bias=False, precision=_PRECISION, name=name)


def avg_pool(x, size: int):
    """torch AvgPool2d(size): window = stride = size, no padding, sizes floored."""
    if size == 1:
        return x
    return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg pool if stride > 1) -> 1x1 (x4 channels), plus the shortcut.

    [B, H, W, Cin] -> [B, H / stride, W / stride, 4 * planes].
    """

    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        out = nn.relu(_batch_norm(self.planes, name="bn1")(
            _conv(self.planes, 1, "conv1")(x)))
        out = nn.relu(_batch_norm(self.planes, name="bn2")(
            _conv(self.planes, 3, "conv2")(out)))
        out = avg_pool(out, self.stride)
        width = self.planes * _EXPANSION
        out = _batch_norm(width, name="bn3")(_conv(width, 1, "conv3")(out))
        if self.stride > 1 or x.shape[-1] != width:
            # torch's `downsample` Sequential: "-1" the avg pool (no params), "0" conv, "1" BN
            x = avg_pool(x, self.stride)
            x = _batch_norm(width, name="downsample_1")(_conv(width, 1, "downsample_0")(x))
        return nn.relu(out + x)


class AttentionPool2d(nn.Module):
    """[B, h, w, C] -> [B, output_dim]: the mean token's output of one attention layer
    over (mean token, h*w spatial tokens); no positional embedding (see module doc)."""

    config: ModifiedResNetConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, h, w, c = x.shape
        # Created for checkpoint strictness only: CLIPIQA's pos_embedding=False skips it.
        self.param("positional_embedding", nn.initializers.normal(c ** -0.5),
                   (cfg.pos_tokens, c), jnp.float32)
        tokens = x.reshape(b, h * w, c)                  # row-major, as torch's reshape
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        dense = lambda n, name: nn.Dense(n, precision=_PRECISION, name=name)
        head = c // cfg.heads
        split = lambda t: t.reshape(b, -1, cfg.heads, head)
        # Only the mean token's output is kept, so only its query is computed.
        q = split(dense(c, "q_proj")(tokens[:, :1])) * head ** -0.5
        k = split(dense(c, "k_proj")(tokens))
        v = split(dense(c, "v_proj")(tokens))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_PRECISION)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=_PRECISION)
        return dense(cfg.output_dim, "c_proj")(out.reshape(b, c))


class ModifiedResNet(nn.Module):
    """CLIP's ModifiedResNet `visual` tower: pixels [B, H, W, 3] (CLIP-normalised)
    -> [B, output_dim] float32 (not L2-normalised)."""

    config: ModifiedResNetConfig = RN50

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        x = jnp.asarray(pixels, jnp.float32)
        stem = ((cfg.width // 2, 2), (cfg.width // 2, 1), (cfg.width, 1))
        for i, (features, stride) in enumerate(stem, start=1):
            x = nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                        use_bias=False, precision=_PRECISION, name=f"conv{i}")(x)
            x = nn.relu(_batch_norm(features, name=f"bn{i}")(x))
        x = avg_pool(x, 2)
        for stage, blocks in enumerate(cfg.layers):
            planes = cfg.width * 2 ** stage
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                x = Bottleneck(planes, stride, name=f"layer{stage + 1}_{i}")(x)
        return AttentionPool2d(cfg, name="attnpool")(x)


# Cached: tracing the init costs seconds, and a conversion asks more than once.
@functools.cache
def param_shapes(config: ModifiedResNetConfig = RN50):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating weights."""
    pixels = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(
        lambda: ModifiedResNet(config).init(jax.random.key(0), pixels))["params"]


def config_from_params(params) -> ModifiedResNetConfig:
    """The config a converted param tree was built with, read from its shapes."""
    layers = tuple(sum(1 for name in params if name.startswith(f"layer{s}_"))
                   for s in range(1, 5))
    pos_tokens = params["attnpool"]["positional_embedding"].shape[0]
    return ModifiedResNetConfig(
        layers=layers, width=params["bn3"]["scale"].shape[0],
        output_dim=params["attnpool"]["c_proj"]["kernel"].shape[1],
        input_resolution=round((pos_tokens - 1) ** 0.5) * 32)
