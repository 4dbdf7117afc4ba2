"""The DAPE and CoSeR train steps as Programs: each trainer's own Task, built from
abstract weights (no file read, nothing drawn), compiled as `jaxsr.train.loop.run`
compiles it.

    program = dape_train_program(config, mesh, batch_per_chip=2)     # configs/dape_train.py
    program = coser_train_program(config, mesh, batch_per_chip=2)    # configs/coser_train.py

The networks, dtypes, trainable / frozen split, loss, optimizer, shardings and extra
per-example inputs are the trainers' (`dape_task`, `coser_task` given
`dape_weight_shapes` / `weight_shapes`); the step is `loop.jit_train_step`, on one
micro-batch of `batch_per_chip` examples per chip of the batch axes.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.parallel.mesh import batch_axes
from jaxsr.parallel.sharding import infer_shardings
from jaxsr.plan.programs import (
    _DTYPES,
    Program,
    as_dtype,
    bytes_per_chip,
    global_batch,
    with_shardings,
)


def task_train_program(name: str, task, config, mesh: Mesh, batch_per_chip: int) -> Program:
    """A `jaxsr.train.loop.Task` of abstract trees as the loop's train step on `mesh`:
    state donated, frozen params in config.frozen_dtype, batch leaves [1, global batch,
    ...] split over the batch axes."""
    from jaxsr.train.loop import batch_shapes, jit_train_step, state_layout

    tx, schedule, state, state_sh = state_layout(task.trainable, config, mesh)
    frozen = as_dtype(task.frozen, _DTYPES[config.get("frozen_dtype", "float32")])
    frozen_sh = infer_shardings(frozen, mesh, [tuple(r) for r in config.sharding.frozen])
    images = global_batch(mesh, batch_per_chip)
    batch_sh = NamedSharding(mesh, P(None, batch_axes(mesh)))
    batch = batch_shapes(task, config, batch_sh, 1, images)
    jitted = jit_train_step(task, config, tx, schedule, state_sh, frozen_sh, batch_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (with_shardings(state, state_sh), with_shardings(frozen, frozen_sh), batch,
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P())))
    # The EMA (None without one) counts with the optimizer state.
    held = {"params": (state.params, state_sh.params),
            "optimizer": ((state.opt_state, state.ema), (state_sh.opt_state, state_sh.ema)),
            "frozen": (frozen, frozen_sh),
            "batch": (batch, jax.tree.map(lambda x: x.sharding, batch))}
    parts = {role: bytes_per_chip(*pair) for role, pair in held.items()}
    return Program(name, jitted, args, images, parts)


def dape_train_program(config, mesh: Mesh, batch_per_chip: int) -> Program:
    """DAPE distillation (configs/dape_train.py): degradation, the frozen RAM teacher,
    the RAM + LoRA student forward and backward, AdamW on the LoRA. RAM at
    config.model.dape's sizes (the base variant: Swin-L 384, as its checkpoint)."""
    from jaxsr.train.dape_trainer import dape_task, dape_weight_shapes

    task = dape_task(config, None, weights=dape_weight_shapes(config))
    return task_train_program("dape train", task, config, mesh, batch_per_chip)


def coser_train_program(config, mesh: Mesh, batch_per_chip: int) -> Program:
    """CoSeR stage 1 or 2 (configs/coser_train.py, config.task): stage 1 trains the
    SRResNet + Q-Former against the frozen CLIP text encoder; stage 2 the AiA UNet's
    *_lna layers + the ControlNet, with the VAE, text encoder and cognitive encoder
    frozen. Every network at config.model's sizes."""
    from jaxsr.train.coser_trainer import coser_task, stage_of, weight_shapes

    stage = stage_of(config)
    task, _ = coser_task(config, None, weights=weight_shapes(config, stage))
    return task_train_program(f"coser stage {stage} train", task, config, mesh,
                              batch_per_chip)
