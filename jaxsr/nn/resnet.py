"""diffusers ResnetBlock2D, Downsample2D and Upsample2D on NHWC feature maps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.layers import GroupNorm, conv


class ResnetBlock2D(nn.Module):
    """GN → SiLU → conv → (+ time embedding) → GN → SiLU → conv, plus a (1×1) shortcut.

    x: [B, H, W, Cin]; temb: [B, Ct] or None (the VAE has none). Returns [B, H, W, out_channels].
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x)
        h = conv(self.out_channels, "conv1", dtype=self.dtype)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h)
        h = conv(self.out_channels, "conv2", dtype=self.dtype)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", kernel=1, padding=0, dtype=self.dtype)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. The UNet pads 1 on every side; the VAE encoder pads only
    right and bottom (`asymmetric_pad=True`), as diffusers does for LDM weights."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.asymmetric_pad:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(self.out_channels, "conv", stride=2, padding=0, dtype=self.dtype)(x)
        return conv(self.out_channels, "conv", stride=2, padding=1, dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return conv(self.out_channels, "conv", dtype=self.dtype)(x)
