"""Sinusoidal timestep features and the MLP that embeds them (diffusers naming)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def timestep_features(timesteps, dim: int, *, flip_sin_to_cos: bool = True,
                      freq_shift: float = 0.0, max_period: float = 10000.0):
    """[B] timesteps → [B, dim] float32 of sin/cos at geometric frequencies.

    freq_k = exp(−ln(max_period)·k/(dim/2 − freq_shift)); `flip_sin_to_cos`
    puts cos first (SD2: True, shift 0, which is also LDM's [cos | sin]).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 → SiLU → linear_2: [B, Cin] → [B, dim]."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x.astype(self.dtype))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))
