"""Where, and in which dtype, an inference pipeline holds its parameters.

The pipelines read a converted folder one tensor at a time and put each tensor on
the devices as it is read (`Placement.leaf`, the `leaf` of `load_converted`), so the
host never holds a second copy of the weights: SeeSR's float32 folder is 8.8 GB,
and keeping the numpy tree beside the device arrays used to double that.

The dtype rule (`held_dtype`): a network that computes in bfloat16 holds every
`kernel` (Dense and convolution weights, over 98 % of each network's parameters) in
bfloat16. nn.Dense, nn.Conv and jaxsr's feed-forward cast their kernels to the
compute dtype before use anyway, so the programs compute exactly what they computed
from float32 kernels (tests/test_placement.py checks this bit for bit). Everything
else (biases, norm scales, embedding tables whose sums run in float32, raw
parameters) stays float32: it is small, and some of it feeds float32 arithmetic.
A network that computes in float32 holds float32, whatever the folder stores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from jaxsr.platform import resolve_compute_dtype


def compute_dtype(name_or_dtype):
    """"auto" (bfloat16 on accelerators and CPUs with native bfloat16, else float32,
    see jaxsr.platform.auto_compute_dtype), "bfloat16", "float32" or a dtype → a
    jnp dtype."""
    if isinstance(name_or_dtype, str):
        return jnp.dtype(resolve_compute_dtype(name_or_dtype))
    return jnp.dtype(name_or_dtype)


def held_dtype(key: str, stored, compute_dtype) -> np.dtype:
    """The dtype a parameter is held in: see the module docstring.

    key: its "/"-joined path ("down_blocks_0/resnets_0/conv1/kernel"); stored: its
    stored dtype; compute_dtype: its network's compute dtype.
    """
    stored = np.dtype(stored)
    if stored.kind != "f" and stored != np.dtype(ml_dtypes.bfloat16):
        return stored                                # integer buffers stay as they are
    compute = jnp.dtype(compute_dtype)
    if compute == jnp.bfloat16 and key.rsplit("/", 1)[-1] == "kernel":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


def to_held(key: str, array, compute_dtype) -> np.ndarray:
    """array cast on the host to `held_dtype` (ml_dtypes rounds to nearest even, as
    XLA's convert does)."""
    array = np.asarray(array)
    return array.astype(held_dtype(key, array.dtype, compute_dtype), copy=False)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Compute dtypes per module and the sharding every parameter gets (replicated
    over the pipeline's data-parallel mesh).

    modules: {module name: compute dtype}; a name missing from it (a sub-tree the
    pipeline does not run, or a module it runs in float32) is held in float32.
    """

    modules: dict
    sharding: jax.sharding.Sharding

    def leaf(self, module: str, key: str, array) -> jax.Array:
        """One tensor, as `load_converted` reads it, onto the devices."""
        return jax.device_put(to_held(key, array, self.modules.get(module, jnp.float32)),
                              self.sharding)

    def tree(self, module: str, params) -> dict:
        """A whole param tree (numpy or device arrays) onto the devices. Arrays already
        held right stay where they are (device_put of a placed array is free)."""
        flat = traverse_util.flatten_dict(params, sep="/")
        dtype = self.modules.get(module, jnp.float32)
        out = {}
        for key, value in flat.items():
            want = held_dtype(key, value.dtype, dtype)
            if isinstance(value, jax.Array) and value.dtype == want:
                out[key] = jax.device_put(value, self.sharding)
            else:
                out[key] = jax.device_put(to_held(key, value, dtype), self.sharding)
        return traverse_util.unflatten_dict(out, sep="/")


def held_bytes(info: dict[str, tuple], compute_dtype) -> int:
    """Bytes one copy of a module takes when held: info is {key: (stored dtype, shape)}
    as `jaxsr.convert.cache.tensor_info` gives it."""
    return sum(int(np.prod(shape)) * held_dtype(key, dtype, compute_dtype).itemsize
               for key, (dtype, shape) in info.items())
