"""Device meshes from config: a list of (axis name, size) with at most one -1.

    make_mesh([("data", -1)])                 pure data parallel (default)
    make_mesh([("data", -1), ("fsdp", 4)])    FSDP within groups of 4 devices
    make_mesh([("dcn", 2), ("data", -1), ("fsdp", 8)])   multi-slice: 'dcn' spans slices

Axes are `AxisType.Auto`: Flax Linen's logical sharding constraints act as
assertions on Explicit axes (the jax.make_mesh default now).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def resolve_axis_sizes(axes: Sequence[tuple[str, int]], num_devices: int) -> list[tuple[str, int]]:
    """Fill in the single -1 and check the product equals the device count."""
    names = [n for n, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names repeat: {names}")
    free = [i for i, (_, s) in enumerate(axes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {list(axes)}")
    fixed = math.prod(s for _, s in axes if s != -1)
    sizes = [s for _, s in axes]
    if free:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices do not divide into mesh {list(axes)}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {list(axes)} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return list(zip(names, sizes))


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),), devices=None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes).

    With several slices (TPU multislice), an axis named 'dcn' is laid across
    slices so only its collectives cross the data-centre network.
    """
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_axis_sizes(axes, len(devices))
    names = tuple(n for n, _ in resolved)
    shape = tuple(s for _, s in resolved)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1 and "dcn" in names:
        from jax.experimental import mesh_utils

        dcn = [s if n == "dcn" else 1 for n, s in resolved]
        ici = [1 if n == "dcn" else s for n, s in resolved]
        grid = _physical_grid(mesh_utils.create_hybrid_device_mesh, ici, dcn, devices)
    elif devices[0].platform in ("tpu", "gpu"):
        from jax.experimental import mesh_utils

        grid = _physical_grid(mesh_utils.create_device_mesh, shape, devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def _physical_grid(create, *args):
    """`create(*args)` (a jax mesh_utils builder), laying each logical axis along whole
    physical torus axes where it can. An axis that is no product of physical axes
    (FSDP 8 on a 4x4x4 v5p slice) then splits a physical axis: its collectives run
    over part of a ring, slower than a whole ring but correct, and still on ICI."""
    try:
        return create(*args)
    except NotImplementedError:
        return create(*args, allow_split_physical_axes=True)


# Axes that split something other than the batch: model width ('tensor') and the
# image height of spatially sharded sampling ('space').
NON_BATCH_AXES = ("tensor", "space")


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """Every mesh axis that splits the batch (all but 'tensor' and 'space')."""
    return tuple(n for n in mesh.axis_names if n not in NON_BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all batch axes; the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
