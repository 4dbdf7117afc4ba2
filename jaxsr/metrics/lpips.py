"""LPIPS v0.1 (Zhang et al. 2018) with AlexNet (`lpips`, pyiqa's default) or VGG16
(`lpips-vgg`) trunks, as the `lpips` package (0.1.4) and pyiqa compute it.

For images x, y in [0, 1]:
    x' = (2x - 1 - shift) / scale            shift (-.030, -.088, -.188),
                                             scale (.458, .448, .450)
    f_l = trunk tap l of x', unit-normalised over channels: f / (||f||_2 + 1e-10)
    d_l = mean over pixels of  w_l . (f_l(x) - f_l(y))^2     (1x1 conv, no bias)
    LPIPS = sum over the five taps of d_l
The heads' dropout is identity at evaluation. Taps: `jaxsr.metrics.backbones`.

pyiqa (`pyiqa/archs/lpips_arch.py`) against the `lpips` package:
  - pyiqa's `forward(in1, in0, normalize=True)` maps [0, 1] inputs to [-1, 1] by
    default; the package's `normalize` defaults to False (its callers pass [-1, 1]).
    pyiqa, which the SeeSR and CoSeR papers used, takes [0, 1]: so does `lpips` here.
  - Argument order is swapped (distorted image first); LPIPS is symmetric, so the score
    is the same.
  - pyiqa loads one file per trunk (`LPIPS_v0.1_<net>-<hash>.pth`: the whole module's
    state dict, trunk keys `net.sliceK.N.*` next to the heads `linK.model.1.weight`),
    non-strictly, over torchvision's ImageNet trunk; the package loads torchvision's
    trunk and only the heads from `weights/v0.1/<net>.pth`. Same numbers when the
    files hold the same trunk; `jaxsr.convert.metric_lpips` reads either layout.
  - pyiqa returns `(B,)` (squeezed); the package `(B, 1, 1, 1)`.
Nothing else differs: same shift/scale, eps, taps and spatial mean.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.metrics.backbones import (
    ALEXNET_CHANNELS,
    HIGHEST,
    VGG16_CHANNELS,
    alexnet_features,
    vgg16_features,
)

NETS = ("alex", "vgg")
CHANNELS = {"alex": ALEXNET_CHANNELS, "vgg": VGG16_CHANNELS}
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class _Head(nn.Module):
    """lpips's NetLinLayer: `model` is (Dropout, Conv2d(C, 1, 1, bias=False)), so the
    conv's torch key is `linK.model.1.weight`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(1, (1, 1), use_bias=False, precision=HIGHEST, name="model_1")(x)


def unit_normalize(f: jax.Array) -> jax.Array:
    """(..., C) -> f / (||f||_2 over C + 1e-10); eps outside the root, as lpips has it."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


class LPIPS(nn.Module):
    """Params: `net` (the trunk, torchvision names) and `lin0`..`lin4` (the heads)."""

    net: str = "alex"

    @nn.compact
    def __call__(self, sr: jax.Array, hr: jax.Array) -> jax.Array:
        """sr, hr (B, H, W, 3) RGB in [0, 1] -> (B,) float32 distances."""
        if self.net not in NETS:
            raise ValueError(f"LPIPS net must be one of {NETS}, not {self.net!r}")
        x = jnp.concatenate([sr, hr], axis=0).astype(jnp.float32)
        x = (2 * x - 1 - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        trunk = alexnet_features() if self.net == "alex" else vgg16_features()
        total = 0.0
        for k, tap in enumerate(trunk(x)):
            a, b = jnp.split(unit_normalize(tap), 2, axis=0)
            d = _Head(name=f"lin{k}")((a - b) ** 2)
            total = total + jnp.mean(d, axis=(1, 2, 3))
        return total


def lpips(params, sr: jax.Array, hr: jax.Array, *, net: str) -> jax.Array:
    """Per-image LPIPS v0.1.

    Args:
      params: the Flax params from `jaxsr.convert.metric_lpips.convert`.
      sr, hr: (B, H, W, 3) float32 RGB in [0, 1]; H, W at least 32 for AlexNet's and 16
        for VGG16's deepest tap.
      net: "alex" or "vgg" (static under jit).
    Returns:
      (B,) float32, 0 for identical images, larger is more different.
    """
    return LPIPS(net=net).apply({"params": params}, sr, hr)
