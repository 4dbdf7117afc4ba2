"""Host <-> global array helpers for multi-process runs."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def global_batch(local_batch, sharding: NamedSharding):
    """This process's slice of the batch (leading dim) -> one global jax.Array per leaf.

    Every process passes its own `global_batch_size // process_count` rows.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def to_host(tree):
    """Global arrays -> full numpy arrays on every process (gathers across processes)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def check_batch_divisible(global_batch_size: int, mesh) -> None:
    from jaxsr.parallel.mesh import batch_axes

    n = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
    if global_batch_size % n:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the {n} devices "
                         f"of the batch axes {batch_axes(mesh)}; use a multiple of {n}")
