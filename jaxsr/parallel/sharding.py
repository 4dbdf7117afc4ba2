"""Parameter shardings from config rules, big_vision style.

A strategy is an ordered list of (regex, rule); the first regex that matches a
parameter's path ("down_blocks_0/attentions_0/proj_in/kernel") decides:

    "replicate"                       a full copy on every device
    "fsdp"  or "fsdp(axis=fsdp, min_size_mb=4)"
                                      split the largest dimension divisible by the
                                      axis size; smaller tensors stay replicated

Model code carries no annotations; frozen and trainable subtrees can use
different strategies (e.g. frozen weights replicated, trainable ones FSDP).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_RULE = re.compile(r"^(\w+)(?:\((.*)\))?$")


def _parse_rule(rule: str) -> tuple[str, dict]:
    m = _RULE.match(rule.strip())
    if not m or m.group(1) not in ("replicate", "fsdp"):
        raise ValueError(f"unknown sharding rule {rule!r}; use 'replicate' or "
                         "'fsdp(axis=fsdp, min_size_mb=4)'")
    kwargs = {}
    for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        key, _, value = part.partition("=")
        kwargs[key.strip()] = value.strip().strip("'\"")
    return m.group(1), kwargs


def fsdp_spec(shape: Sequence[int], itemsize: int, axis: str, axis_size: int,
              min_size_mb: float = 4.0) -> P:
    """Shard the largest dimension divisible by `axis_size`, if the tensor is big enough."""
    if axis_size == 1 or np.prod(shape, dtype=np.int64) * itemsize < min_size_mb * 2**20:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = axis
            return P(*spec)
    return P()


def infer_shardings(tree, mesh: Mesh, strategy: Sequence[tuple[str, str]]):
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    compiled = [(re.compile(pattern), _parse_rule(rule)) for pattern, rule in strategy]
    flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else None
    if flat is None:
        raise TypeError("infer_shardings expects a nested dict of parameters")
    out = {}
    for path, leaf in flat.items():
        rule = next((r for pattern, r in compiled if pattern.fullmatch(path)), None)
        if rule is None:
            raise ValueError(f"no sharding rule matches parameter {path!r}; end the "
                             "strategy with a catch-all ('.*', ...)")
        kind, kw = rule
        if kind == "replicate":
            spec = P()
        else:
            axis = kw.get("axis", "fsdp")
            if axis not in mesh.axis_names:
                raise ValueError(f"sharding rule for {path!r} names axis {axis!r}, "
                                 f"not in the mesh {mesh.axis_names}")
            spec = fsdp_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, axis,
                             mesh.shape[axis], float(kw.get("min_size_mb", 4)))
        out[path] = NamedSharding(mesh, spec)
    return traverse_util.unflatten_dict(out, sep="/")


def shard_params(params, shardings):
    """Place host (numpy) or device params with the given shardings.

    Each device receives only its slice (`make_array_from_callback`), so a large
    host tree is never gathered on one device first.
    """
    def place(x, s):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if isinstance(x, jax.Array):
            return jax.device_put(x, s)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(place, params, shardings)
