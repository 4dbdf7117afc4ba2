"""Train DAPE: distil RAM into a degradation-aware tagger by training LoRA only.

    result = train(config, workdir)          # configs/dape_train.py; status 0 when finished

This file says what DAPE training trains (RAM weights, fresh LoRA, the distillation
loss of `dape_objective`) and how the result leaves: WORKDIR/dape_lora.safetensors,
the released `DAPE.pth` layout (loralib `*.lora_A` / `*.lora_B` under RAM's module
names), which `jaxsr convert --ram RAM.pth --dape WORKDIR/dape_lora.safetensors`
(and SeeSR's PyTorch code) reads. `jaxsr.train.loop.run` is the loop.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsr.convert.tree import path_to_torch_key
from jaxsr.models.dape import DAPE, DAPEConfig, param_shapes
from jaxsr.train.dape_objective import LORA_LEAVES, DAPETrainNets, dape_loss
from jaxsr.train.loop import EXIT_TERMINATED, Task, TrainResult, run

__all__ = ["EXIT_TERMINATED", "TrainResult", "dape_task", "dape_weight_shapes",
           "export_dape_lora", "train"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LORA_FILE = "dape_lora.safetensors"


def fresh_lora(config: DAPEConfig, seed: int) -> dict:
    """loralib's initialisation of every LoRA tensor of `DAPE(config)`: A ~ U(±1/√in)
    (kaiming-uniform with a = √5), B = 0, so training starts from the plain RAM."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(param_shapes(config)).items():
        if path[-1] == "lora_A":
            bound = 1.0 / np.sqrt(leaf.shape[1])
            out[path] = rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        elif path[-1] == "lora_B":
            out[path] = np.zeros(leaf.shape, np.float32)
    return traverse_util.unflatten_dict(out)


def _lora_settings(config) -> tuple[int, float]:
    rank, alpha = int(config.model.lora_rank), float(config.model.lora_alpha)
    if rank < 1:
        raise ValueError(f"config.model.lora_rank must be >= 1 (only LoRA trains), got {rank}")
    return rank, alpha


def configured_ram(config) -> DAPEConfig:
    """The frozen RAM's architecture at config.model.dape's sizes (lora_rank 0)."""
    from jaxsr.demo import dape_config

    return dataclasses.replace(dape_config(config.model.dape),
                               lora_alpha=_lora_settings(config)[1])


def dape_weight_shapes(config) -> tuple[DAPEConfig, dict, dict]:
    """`load_dape_weights`' result as ShapeDtypeStructs, from config.model.dape's sizes
    alone (no checkpoint read, nothing drawn): what `jaxsr plan` compiles. The base
    variant's sizes are RAM's Swin-L 384, the architecture its checkpoint holds."""
    base = configured_ram(config)
    student = dataclasses.replace(base, lora_rank=_lora_settings(config)[0])
    lora = {k: v for k, v in traverse_util.flatten_dict(param_shapes(student)).items()
            if k[-1] in LORA_LEAVES}
    return student, param_shapes(base), traverse_util.unflatten_dict(lora)


def load_dape_weights(config) -> tuple[DAPEConfig, dict, dict]:
    """(student config with LoRA, frozen RAM params, fresh LoRA params).

    config.init.ram: the RAM checkpoint (`ram_swin_large_14m.pth`, or a safetensors
    copy), converted strictly; or "random" for random weights of
    config.model.dape's sizes (the tiny variant: tests, smoke runs)."""
    source = config.init.ram
    rank, alpha = _lora_settings(config)
    if not source:
        raise ValueError("config.init.ram is empty: give the RAM checkpoint "
                         "(ram_swin_large_14m.pth), or 'random' for the tiny variant")
    if source == "random":
        from jaxsr.demo import random_params

        base = configured_ram(config)
        size = base.swin.img_size
        frozen = random_params(DAPE(base), np.zeros((1, size, size, 3), np.float32),
                               seed=config.seed)
    else:
        from jaxsr.convert.ram import load_ram
        from jaxsr.convert.readers import read_state_dict

        base, frozen = load_ram(read_state_dict(Path(source)), None, lora_alpha=alpha,
                                what=f"RAM checkpoint {source}")
    student = dataclasses.replace(base, lora_rank=rank)
    return student, jax.tree.map(np.asarray, frozen), fresh_lora(student, config.seed)


def lora_state_dict(lora) -> dict[str, np.ndarray]:
    """Flax LoRA tensors -> DAPE.pth names and layouts (loralib keeps A [r·k, in] and
    B [out·k, r] in torch layout, so only the names change).

    RAM ties tag_encoder layers 0-1 to the tagging head's; the released DAPE.pth also
    holds LoRA for those twins, which loralib's merge adds to the same weights. The
    student never trains them, so they are written as zeros (no update): every
    loader that expects the released key set finds it, and the merge equals the
    student's computation."""
    out = {}
    for path, value in traverse_util.flatten_dict(lora).items():
        module = path_to_torch_key(path[:-1])
        out[f"{module}.{path[-1]}"] = np.asarray(value, np.float32)
        if module.startswith("tagging_head.encoder.layer.") and ".crossattention." in module:
            twin = "tag_encoder" + module[len("tagging_head"):]
            out[f"{twin}.{path[-1]}"] = np.zeros(np.shape(value), np.float32)
    return out


def export_dape_lora(lora, path, *, step: int | None = None) -> Path:
    """Write the trained LoRA as a DAPE.pth-layout safetensors file (process 0)."""
    from jaxsr.convert.safetensors_io import write_safetensors

    path = Path(path)
    tensors = lora_state_dict(jax.tree.map(np.asarray, lora))
    if jax.process_index() == 0:
        write_safetensors(path, tensors, metadata={"format": "pt", "train_step": step,
                                                   "source": "jaxsr DAPE distillation"})
    return path


def dape_task(config, workdir, weights=None) -> Task:
    """Weights, the trainable (LoRA) / frozen (RAM) split and the distillation loss.
    weights: (student config, frozen, LoRA) as `load_dape_weights` (the default) or
    `dape_weight_shapes` (abstract: `jaxsr plan`) give them."""
    from jaxsr.data.degrade import degrade_batch, preset_by_name

    student_cfg, frozen, lora = load_dape_weights(config) if weights is None else weights
    dt = _DTYPES[config.model.dtype]
    att = config.model.attention
    nets = DAPETrainNets(
        student=DAPE(student_cfg, attention=att, dtype=dt),
        teacher=DAPE(dataclasses.replace(student_cfg, lora_rank=0), attention=att, dtype=dt))
    preset = preset_by_name(config.degradation)
    degrade_fn = lambda keys, hr: degrade_batch(keys, hr, preset)
    bce_weight = float(config.bce_weight)

    def loss_fn(params, frozen, hr, keys):
        return dape_loss(nets, params, frozen, hr, keys, degrade_fn, bce_weight)

    def finish(state, step):
        out = export_dape_lora(state.params, Path(workdir) / LORA_FILE, step=step)
        if jax.process_index() == 0:
            print(f"wrote the trained LoRA to {out} (jaxsr convert --ram RAM --dape {out})",
                  flush=True)

    return Task(trainable=lora, frozen=frozen, loss_fn=loss_fn, finish=finish)


def train(config, workdir, *, devices=None, make_iterator=None) -> TrainResult:
    """Run (or resume) DAPE distillation in `workdir`; see `jaxsr.train.loop.run`."""
    return run(dape_task(config, workdir), config, workdir, devices=devices,
               make_iterator=make_iterator)
