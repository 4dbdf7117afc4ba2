"""Torchvision's AlexNet and VGG16 `features` stacks as Flax modules, for the perceptual
metrics (LPIPS, DISTS) that compare images through their activations.

Each layer keeps torchvision's index in its name (`features_0`, `features_3`, ...), so
torchvision's state-dict keys `features.N.weight` map onto the params with the project's
one naming rule (`jaxsr.convert.tree`). A module returns the activations after the ReLUs
the metrics tap, NHWC float32, and runs only as far as the last tap (AlexNet's last
max-pool and VGG16's are never used).

    AlexNet  taps after relu1..relu5 (torchvision indices 1, 4, 7, 9, 11)
             channels 64, 192, 384, 256, 256
    VGG16    taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices 3, 8, 15, 22, 29)
             channels 64, 128, 256, 512, 512

DISTS replaces VGG16's four 2x2 max-pools (indices 4, 9, 16, 23) with L2 pooling:
sqrt(depthwise_conv(x^2, hanning3x3, stride 2, padding 1) + 1e-12).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Metrics are compared to float32 references: keep full float32 products whatever the
# backend's default matmul precision (TF32 on GPUs, bfloat16 passes on TPUs).
HIGHEST = jax.lax.Precision.HIGHEST

# (kind, ...) per torchvision index: ("conv", out_channels, kernel, stride, padding),
# ("relu",), ("max", window, stride).
ALEXNET_LAYERS = (
    ("conv", 64, 11, 4, 2), ("relu",), ("max", 3, 2),
    ("conv", 192, 5, 1, 2), ("relu",), ("max", 3, 2),
    ("conv", 384, 3, 1, 1), ("relu",),
    ("conv", 256, 3, 1, 1), ("relu",),
    ("conv", 256, 3, 1, 1), ("relu",),
)
ALEXNET_TAPS = (1, 4, 7, 9, 11)
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)


def _vgg16_layers() -> tuple:
    layers = []
    for i, width in enumerate((64, 128, 256, 512, 512)):
        for _ in range(2 if i < 2 else 3):
            layers += [("conv", width, 3, 1, 1), ("relu",)]
        if i < 4:    # the fifth pool (index 30) follows the last tap
            layers.append(("max", 2, 2))
    return tuple(layers)


VGG16_LAYERS = _vgg16_layers()
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_CHANNELS = (64, 128, 256, 512, 512)


def hanning_filter() -> np.ndarray:
    """DISTS's 3x3 L2-pooling window: the inner three taps of a 5-point Hanning window,
    outer product, normalised to sum 1 (in float32, as the reference builds it)."""
    a = np.hanning(5)[1:-1]
    g = (a[:, None] * a[None, :]).astype(np.float32)
    return g / g.sum()


def l2_pool(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C): sqrt of the Hanning-weighted mean of
    x^2 over 3x3 windows, stride 2, zero padding 1.

    The window is the outer product of one 3-tap filter (`hanning_filter` normalises
    the product, which is the product of the normalised taps), so it runs as two
    strided 3-tap passes, rows then columns: a depthwise 3x3 convolution is several
    times slower on XLA:CPU."""
    taps = np.hanning(5)[1:-1].astype(np.float32)
    taps = taps / taps.sum()
    h, w = x.shape[1], x.shape[2]
    ho, wo = (h + 1) // 2, (w + 1) // 2
    p = jnp.pad(x * x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = sum(float(t) * p[:, k:k + 2 * ho - 1:2] for k, t in enumerate(taps))
    out = sum(float(t) * rows[:, :, k:k + 2 * wo - 1:2] for k, t in enumerate(taps))
    return jnp.sqrt(out + 1e-12)


class FeatureStack(nn.Module):
    """A torchvision `features` stack up to its last tap.

    Attributes:
      layers: per torchvision index, ("conv", out, kernel, stride, padding), ("relu",) or
        ("max", window, stride).
      taps: indices whose outputs are returned.
      l2_pooling: replace every max-pool by DISTS's L2 pooling.
    """

    layers: tuple
    taps: tuple
    l2_pooling: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x (B, H, W, 3) float32, already normalised -> the tapped activations (B, h, w, C)."""
        out = []
        for index, layer in enumerate(self.layers[: max(self.taps) + 1]):
            kind = layer[0]
            if kind == "conv":
                _, width, k, stride, pad = layer
                x = nn.Conv(width, (k, k), strides=(stride, stride),
                            padding=((pad, pad), (pad, pad)), precision=HIGHEST,
                            name=f"features_{index}")(x)
            elif kind == "relu":
                x = nn.relu(x)
            elif self.l2_pooling:
                x = l2_pool(x)
            else:
                _, window, stride = layer
                x = nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")
            if index in self.taps:
                out.append(x)
        return out


def alexnet_features(name: str = "net") -> FeatureStack:
    """AlexNet's features, tapped after relu1..relu5."""
    return FeatureStack(ALEXNET_LAYERS, ALEXNET_TAPS, name=name)


def vgg16_features(name: str = "net", *, l2_pooling: bool = False) -> FeatureStack:
    """VGG16's features, tapped after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
    return FeatureStack(VGG16_LAYERS, VGG16_TAPS, l2_pooling, name=name)
