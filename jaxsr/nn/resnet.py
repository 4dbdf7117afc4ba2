"""diffusers ResnetBlock2D, Downsample2D and Upsample2D on NHWC feature maps."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxsr.nn.layers import GroupNorm, conv


class ResnetBlock2D(nn.Module):
    """GN → SiLU → conv → (+ time embedding) → GN → SiLU → conv, plus a (1×1) shortcut.

    x: [B, H, W, Cin]; temb: [B, Ct] or None (the VAE has none). Returns [B, H, W, out_channels].

    `dtype` is the convolutions' operand type. `activation_dtype` (default: `dtype`)
    is the type of everything between them: norm and SiLU outputs, conv results and
    the residual sum. The VAE keeps those in float32 under bfloat16 compute, so only
    the conv operands are rounded (see jaxsr.models.vae).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    activation_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, temb=None):
        act = self.activation_dtype or self.dtype
        out = None if act == self.dtype else act
        cv = lambda name, **kw: conv(self.out_channels, name, dtype=self.dtype, out_dtype=out, **kw)
        h = GroupNorm(self.groups, self.eps, act, name="norm1")(x)
        h = cv("conv1")(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, act, name="norm2")(h)
        h = cv("conv2")(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = cv("conv_shortcut", kernel=1, padding=0)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. The UNet pads 1 on every side; the VAE encoder pads only
    right and bottom (`asymmetric_pad=True`), as diffusers does for LDM weights."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None    # see `conv`

    @nn.compact
    def __call__(self, x):
        cv = lambda padding: conv(self.out_channels, "conv", stride=2, padding=padding,
                                  dtype=self.dtype, out_dtype=self.out_dtype)
        if self.asymmetric_pad:
            return cv(0)(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
        return cv(1)(x)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of PyTorch's `F.interpolate(mode="nearest")`: floor(i·in/out).

    (jax.image.resize's "nearest" samples pixel centres, floor((i+½)·in/out), which
    differs whenever out is not a multiple of in.) The scale is a float32 product
    as in PyTorch's kernel.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling, then a 3×3 conv.

    x [B, h, w, C] -> [B, H, W, out_channels] with (H, W) = `output_size`, default
    (2h, 2w). The UNet passes the size of the skip it is about to meet, as diffusers
    does when a latent side is not a multiple of 2^(levels-1) (e.g. 50 -> 25 -> 13 -> 7
    comes back up as 7 -> 13 -> 25 -> 50).
    """

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None    # see `conv`

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        b, h, w, c = x.shape
        oh, ow = output_size if output_size is not None else (2 * h, 2 * w)
        if (oh, ow) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = jnp.take(x, jnp.asarray(nearest_indices(h, oh)), axis=1)
            x = jnp.take(x, jnp.asarray(nearest_indices(w, ow)), axis=2)
        return conv(self.out_channels, "conv", dtype=self.dtype, out_dtype=self.out_dtype)(x)
