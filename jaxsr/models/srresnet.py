"""MSRResNet (BasicSR's modified SRResNet), CoSeR's `pre_sr_model`, in Flax.

    lr [B, H, W, 3] in [0, 1] -> sr [B, s·H, s·W, 3], not clamped (s = upscale)

conv_first + LeakyReLU(0.1); `num_block` residual blocks `body_i` (conv1 → ReLU →
conv2, plus identity, no batch norm, no long skip); an upsampler of `upconv*` convs
each followed by PixelShuffle and LeakyReLU(0.1); conv_hr + LeakyReLU(0.1);
conv_last; and finally PyTorch's bilinear upsample of the input (align_corners=False)
is added, so the network learns a residual over bilinear. All convs are 3×3,
stride 1, padding 1. Param names mirror the torch module names
(`conv_first`, `body_0/conv1`, `upconv1`, ...), so `jaxsr.convert.tree` converts a
`pre_sr_model.*` state dict by name.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.resize import torch_resize_bilinear

# BasicSR's `default_init_weights(..., scale=0.1)`: Kaiming-normal (fan_in, gain √2)
# scaled by 0.1, i.e. variance 2·0.1²/fan_in, and zero biases. This keeps the residual
# branches small at the start of CoSeR's stage-1 training, as in the reference.
_KAIMING_X01 = nn.initializers.variance_scaling(2.0 * 0.1**2, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class SRResNetConfig:
    """BasicSR `MSRResNet(num_in_ch, num_out_ch, num_feat, num_block, upscale)`."""

    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_block: int = 16
    upscale: int = 4

    def __post_init__(self):
        if self.upscale not in (2, 3, 4):
            raise ValueError(f"MSRResNet upscale must be 2, 3 or 4, got {self.upscale}")


COSER_SRRESNET = SRResNetConfig()


def pixel_shuffle(x, r: int):
    """torch.nn.PixelShuffle(r) on NHWC: [B, H, W, C·r²] -> [B, H·r, W·r, C].

    PyTorch reads input channel c·r² + i·r + j into output pixel (h·r + i, w·r + j)
    of channel c, i.e. the channel axis splits as (C, r, r) with C outermost; a plain
    depth-to-space with C innermost would scramble converted weights.
    """
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))          # [B, H, i, W, j, C]
    return x.reshape(b, h * r, w * r, c)


def conv3x3(features: int, name: str, dtype=jnp.float32) -> nn.Conv:
    """torch Conv2d(…, 3, 1, 1) on NHWC with BasicSR's scaled Kaiming init."""
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                   kernel_init=_KAIMING_X01, name=name)


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))): [B, H, W, F] -> [B, H, W, F]."""

    num_feat: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = conv3x3(self.num_feat, "conv1", self.dtype)(x)
        h = conv3x3(self.num_feat, "conv2", self.dtype)(nn.relu(h))
        return x + h


class MSRResNet(nn.Module):
    """CoSeR's pre-SR network. lr [B, H, W, 3] -> [B, s·H, s·W, 3] in float32."""

    config: SRResNetConfig = COSER_SRRESNET
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, lr):
        cfg = self.config
        lrelu = lambda t: nn.leaky_relu(t, 0.1)
        x = jnp.asarray(lr, jnp.float32)
        feat = lrelu(conv3x3(cfg.num_feat, "conv_first", self.dtype)(x.astype(self.dtype)))
        out = feat
        for i in range(cfg.num_block):
            out = ResidualBlockNoBN(cfg.num_feat, self.dtype, name=f"body_{i}")(out)
        # ×4 is two ×2 stages; ×2 and ×3 are one stage with factor 2 or 3.
        factors = (2, 2) if cfg.upscale == 4 else (cfg.upscale,)
        for i, r in enumerate(factors, start=1):
            out = conv3x3(cfg.num_feat * r * r, f"upconv{i}", self.dtype)(out)
            out = lrelu(pixel_shuffle(out, r))
        out = lrelu(conv3x3(cfg.num_feat, "conv_hr", self.dtype)(out))
        out = conv3x3(cfg.num_out_ch, "conv_last", self.dtype)(out).astype(jnp.float32)
        h, w = x.shape[1], x.shape[2]
        base = torch_resize_bilinear(x, (h * cfg.upscale, w * cfg.upscale))
        return out + base


# Cached: tracing the init costs seconds, and conversions of one model ask repeatedly.
# Callers only read the tree.
@functools.cache
def param_shapes(config: SRResNetConfig = COSER_SRRESNET):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating weights."""
    lr = jnp.zeros((1, 8, 8, config.num_in_ch), jnp.float32)
    model = MSRResNet(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), lr))["params"]
