"""Per-image random draws of the sampling programs, independent of how images are batched.

    noise = noise_source(keys, noises, latent_shape)
    eps = noise("steps", STEP_STREAM, i)     # [B, *latent_shape]

Image b's draw for (stream, index) is normal(fold_in(fold_in(keys[b], stream), index))
(index omitted for one-off draws), so it depends on that image's key only. `noises`
replaces the draws with given arrays (a reference run's) by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_image_normal(keys, stream: int, index, shape):
    """One standard-normal [B, *shape] float32 draw per image from its own key:
    key → fold_in stream → fold_in index (when not None)."""
    def one(key):
        key = jax.random.fold_in(key, stream)
        if index is not None:
            key = jax.random.fold_in(key, index)
        return jax.random.normal(key, shape, jnp.float32)
    return jax.vmap(one)(keys)


def noise_source(keys, noises, shape):
    """noise(name, stream, i=None) -> [B, *shape]: noises[name] (indexed by i when given)
    or a fresh `per_image_normal` draw. Fresh draws are made where they are used, one
    step at a time inside a loop (no [N, ...] buffer)."""
    def noise(name, stream, i=None):
        if noises is not None:
            x = noises[name]
            return (x[i] if i is not None else x).astype(jnp.float32)
        return per_image_normal(keys, stream, i, shape)
    return noise
