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

from jax.sharding import Mesh

from jaxsr.plan.programs import Program, task_train_program


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
    notes = []
    if stage == 2:
        notes.append(f"{config.data.crop_size}² crops, {config.model.dtype} compute, "
                     f"remat {'on' if config.get('remat', False) else 'off'}")
    return task_train_program(f"coser stage {stage} train", task, config, mesh,
                              batch_per_chip, notes=notes)
