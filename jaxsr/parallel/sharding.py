"""Parameter shardings from config rules, big_vision style.

A strategy is an ordered list of (regex, rule); the first regex that matches a
parameter's path ("down_blocks_0/attentions_0/proj_in/kernel") decides:

    "replicate"                       a full copy on every device
    "fsdp"  or "fsdp(axis=fsdp, min_size_mb=4)"
                                      split the largest dimension divisible by the
                                      axis size; smaller tensors stay replicated
    "tensor(dim=-1)" or "tensor(dim=0, axis=tensor, fsdp=fsdp, min_size_mb=4)"
                                      Megatron-style: split dimension `dim` over the
                                      tensor axis (when divisible), then FSDP-split
                                      the largest other divisible dimension over
                                      `fsdp` (if that axis is in the mesh)

A rule naming an axis the mesh lacks, or one of size 1, leaves that split out, so
one rule list serves data-only, FSDP and tensor-parallel meshes.

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
    if not m or m.group(1) not in ("replicate", "fsdp", "tensor"):
        raise ValueError(f"unknown sharding rule {rule!r}; use 'replicate', "
                         "'fsdp(axis=fsdp, min_size_mb=4)' or 'tensor(dim=-1, fsdp=fsdp)'")
    kwargs = {}
    for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        key, _, value = part.partition("=")
        kwargs[key.strip()] = value.strip().strip("'\"")
    return m.group(1), kwargs


def fsdp_spec(shape: Sequence[int], itemsize: int, axis: str, axis_size: int,
              min_size_mb: float = 4.0, base: Sequence | None = None) -> P:
    """Shard the largest dimension divisible by `axis_size`, if the tensor is big enough.

    base: a spec already split over other axes; its split dimensions are kept and
    not considered."""
    spec = list(base) if base is not None else [None] * len(shape)
    spec += [None] * (len(shape) - len(spec))
    as_spec = lambda: P(*spec) if any(a is not None for a in spec) else P()
    if axis_size == 1 or np.prod(shape, dtype=np.int64) * itemsize < min_size_mb * 2**20:
        return as_spec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if spec[dim] is None and shape[dim] % axis_size == 0:
            spec[dim] = axis
            break
    return as_spec()


def tensor_spec(shape: Sequence[int], itemsize: int, mesh: Mesh, kw: dict) -> P:
    """The spec of a "tensor(dim=..., axis=tensor, fsdp=fsdp, min_size_mb=...)" rule."""
    axis = kw.get("axis", "tensor")
    spec: list = [None] * len(shape)
    size = mesh.shape.get(axis, 1)
    if shape and size > 1:
        dim = int(kw.get("dim", -1)) % len(shape)
        if shape[dim] % size == 0:
            spec[dim] = axis
    fsdp = kw.get("fsdp", "fsdp")
    if fsdp in mesh.axis_names:
        return fsdp_spec(shape, itemsize, fsdp, mesh.shape[fsdp],
                         float(kw.get("min_size_mb", 4)), base=spec)
    return P(*spec) if any(a is not None for a in spec) else P()


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
        elif kind == "tensor":
            spec = tensor_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, mesh, kw)
        else:
            axis = kw.get("axis", "fsdp")
            spec = fsdp_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, axis,
                             mesh.shape.get(axis, 1), float(kw.get("min_size_mb", 4)))
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
