"""Shardings of a whole TrainState from the config's parameter rules.

The optimizer state holds trees shaped like the params (Adam's mu and nu, the EMA):
each of those gets the params' shardings, so FSDP splits them the same way; every
other leaf (step counters) is replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.parallel.sharding import infer_shardings
from jaxsr.train.step import TrainState


def like_params(tree, params, param_shardings, mesh: Mesh):
    """Shardings for `tree`: param-shaped subtrees take `param_shardings`, the rest P()."""
    params_def = jax.tree.structure(params)
    rep = NamedSharding(mesh, P())

    def is_params(node):
        return node is not None and jax.tree.structure(node) == params_def

    return jax.tree.map(lambda n: param_shardings if is_params(n) else rep, tree,
                        is_leaf=is_params)


def state_shardings(state_shapes: TrainState, mesh: Mesh, trainable_rules) -> TrainState:
    """NamedShardings for a TrainState of ShapeDtypeStructs (from jax.eval_shape)."""
    params_sh = infer_shardings(state_shapes.params, mesh, trainable_rules)
    rep = NamedSharding(mesh, P())
    return TrainState(
        step=rep, params=params_sh,
        opt_state=like_params(state_shapes.opt_state, state_shapes.params, params_sh, mesh),
        ema=None if state_shapes.ema is None else params_sh)
