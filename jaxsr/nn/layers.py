"""Small layers with the numerics of their PyTorch counterparts.

Norms own their `scale`/`bias` directly (no nested module), so a torch
`norm1.weight` lands at Flax `norm1/scale`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.nn.moments import group_moments, moments, per_channel


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on channels-last input [B, ..., C] (at least one spatial
    axis), statistics in float32 from `group_moments`: exact on flat maps and within
    PyTorch's accuracy on offset and nearly flat ones (see jaxsr.nn.moments)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        maps = xf.reshape(xf.shape[0], xf.shape[1], -1, c)      # [B, H, rest, C]
        mean, var = group_moments(maps, self.num_groups)
        y = (maps - per_channel(mean, c)) * per_channel(jax.lax.rsqrt(var + self.epsilon), c)
        return (y.reshape(xf.shape) * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, statistics in float32 from `moments`."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean, var = moments(xf, (xf.ndim - 1,))
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


def conv(features: int, name: str, *, kernel: int = 3, stride: int = 1, padding=1,
         dtype=jnp.float32, use_bias: bool = True, out_dtype=None) -> nn.Conv:
    """torch.nn.Conv2d(…, kernel, stride, padding) on NHWC.

    Input and kernel are cast to `dtype`; `out_dtype` (e.g. float32 under bfloat16
    compute) makes the convolution accumulate and return that type instead of
    rounding its result to `dtype`.
    """
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    op = None
    if out_dtype is not None:
        op = functools.partial(jax.lax.conv_general_dilated, preferred_element_type=out_dtype)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                   use_bias=use_bias, dtype=dtype, name=name, conv_general_dilated=op)


class EvalBatchNorm(nn.Module):
    """BatchNorm2d in evaluation mode: (x - running_mean) * scale / sqrt(running_var +
    eps) + bias over the last axis, [..., C] -> [..., C]. The four tensors are params
    named after torch's weight (`scale`), bias and buffers, so the metrics' backbones
    (Inception, CLIP's ResNet) convert with the project's one naming rule."""

    features: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = (self.features,)
        scale = self.param("scale", nn.initializers.ones, c)
        bias = self.param("bias", nn.initializers.zeros, c)
        mean = self.param("running_mean", nn.initializers.zeros, c)
        var = self.param("running_var", nn.initializers.ones, c)
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias
