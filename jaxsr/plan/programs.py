"""jaxsr's programs as abstract, sharded jit calls: shapes only, no weights, no
allocation. `jaxsr plan` lowers and compiles them for a mesh.

    program = seesr_train_program(config, mesh, batch_per_chip=2)
    compiled = program.jitted.lower(*program.args).compile()

A Program also says how many images one call processes and which of its argument
bytes are trainable params, optimizer state, frozen params and the batch, per chip,
from the shardings (exact, before the compiler adds anything).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.parallel.mesh import batch_axes
from jaxsr.parallel.sharding import infer_shardings

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Program:
    name: str                      # "seesr train", "seesr sample"
    jitted: Callable               # jax.jit(...) with in/out shardings
    args: tuple                    # ShapeDtypeStructs carrying their shardings
    images_per_call: int           # global images one call processes
    argument_parts: dict           # {"params"|"optimizer"|"frozen"|"batch": bytes per chip}
    notes: list = dataclasses.field(default_factory=list)


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def bytes_per_chip(tree, shardings) -> int:
    """Bytes of the largest shard of every leaf (what one chip holds)."""
    return int(sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def as_dtype(tree, dtype):
    """Floating leaves of an abstract tree in `dtype` (others unchanged)."""
    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return x
    return jax.tree.map(one, tree)


def as_held(tree, dtype):
    """An abstract parameter tree in the dtypes an inference pipeline holds it in for
    compute `dtype` (`jaxsr.pipelines.placement.held_dtype`: kernels in bfloat16 when
    the network computes in bfloat16, the rest float32)."""
    from flax import traverse_util

    from jaxsr.pipelines.placement import held_dtype

    flat = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(v.shape, held_dtype(k, v.dtype, dtype))
         for k, v in flat.items()}, sep="/")


def inference_shardings(params, config, mesh: Mesh):
    """Shardings of an inference program's parameters: config.sharding.params rules
    (default: every parameter replicated)."""
    rules = [tuple(r) for r in config.get("sharding", {}).get("params", [(".*", "replicate")])]
    return infer_shardings(params, mesh, rules)


def image_keys(n: int, sharding):
    """The [n] per-image typed PRNG keys of a sampling program, abstract."""
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), n))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding)


def inference_parts(params, params_sh, inputs) -> dict:
    """argument_parts of an inference program: its parameters count as frozen, its
    image/text `inputs` (sharded ShapeDtypeStructs) as the batch."""
    return {"params": 0, "optimizer": 0, "frozen": bytes_per_chip(params, params_sh),
            "batch": sum(bytes_per_chip(x, x.sharding) for x in inputs)}


def global_batch(mesh: Mesh, batch_per_chip: int) -> int:
    """Images per step over the mesh's batch axes (every axis but 'tensor' and 'space')."""
    return batch_per_chip * math.prod(mesh.shape[a] for a in batch_axes(mesh))


def task_train_program(name: str, task, config, mesh: Mesh, batch_per_chip: int,
                       notes: list | None = None) -> Program:
    """A `jaxsr.train.loop.Task` of abstract trees as the loop's own train step on
    `mesh` (`loop.jit_train_step`): state donated, frozen params in
    config.frozen_dtype, batch leaves [1, global batch, ...] split over the batch axes,
    one micro-batch of `batch_per_chip` examples per chip."""
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
    return Program(name, jitted, args, images, parts, notes=list(notes or []))


def seesr_train_program(config, mesh: Mesh, batch_per_chip: int) -> Program:
    """The SeeSR train step (configs/seesr_train.py) on `mesh`: degradation, frozen DAPE
    / text encoder / VAE, ControlNet + UNet forward and backward, clip + AdamW, with
    the loss `seesr_trainer.seesr_task` gives the loop."""
    from jaxsr.train.seesr_trainer import seesr_task, seesr_weight_shapes

    task = seesr_task(config, None, weights=seesr_weight_shapes(config))
    remat = "on" if config.get("remat", False) else "off"
    return task_train_program(
        "seesr train", task, config, mesh, batch_per_chip,
        notes=[f"{config.data.crop_size}² crops, {config.degradation} degradation, "
               f"{config.model.dtype} compute, frozen networks in {config.frozen_dtype}, "
               f"remat {remat}"])


def seesr_sample_program(config, mesh: Mesh, batch_per_chip: int, size: int,
                         steps: int | None = None) -> Program:
    """SeeSR's device program (configs/seesr.py): VAE encode, the guided ControlNet +
    UNet sampling loop, VAE decode and colour fix, for `size`² outputs, as
    `SeeSRPipeline` jits it. Parameters are held as the pipeline holds them
    (`jaxsr.pipelines.placement.held_dtype`: bfloat16 kernels when the networks
    compute in bfloat16), placed by config.sharding.params (default: replicated)."""
    from jaxsr.demo import SD2_SCHEDULER_CONFIG, model_configs
    from jaxsr.diffusion.samplers import make_sampler
    from jaxsr.diffusion.schedule import SchedulerConfig
    from jaxsr.models import controlnet, dape, unet, vae
    from jaxsr.pipelines.seesr import SeeSROptions, sampling_settings
    from jaxsr.pipelines.seesr_sampling import Networks, restore, skip_steps_above

    dt = _DTYPES[config.get("dtype", "bfloat16")]
    vdt = _DTYPES[config.get("vae_dtype", "float32")]
    att = config.get("attention", "auto")
    unet_cfg, cn_cfg, vae_cfg, text_cfg, dape_cfg = model_configs(config)
    nets = Networks(unet=unet.UNet2DConditionModel(unet_cfg, dt, attention=att),
                    controlnet=controlnet.ControlNetModel(cn_cfg, dt, attention=att),
                    vae=vae.AutoencoderKL(vae_cfg, vdt, attention=att))
    s = config.sampling
    options = SeeSROptions(steps=int(steps or s.steps), sampler=s.sampler,
                           guidance_scale=s.guidance_scale, start_timestep=s.start_timestep,
                           color_fix=s.color_fix, latent_tile=s.latent_tile,
                           latent_tile_overlap=s.latent_tile_overlap,
                           vae_encoder_tile=s.vae_encoder_tile,
                           vae_decoder_tile=s.vae_decoder_tile)
    alphas = SchedulerConfig.from_diffusers(SD2_SCHEDULER_CONFIG, "ddpm").alphas_cumprod()
    settings = sampling_settings(options, alphas)
    plan = skip_steps_above(make_sampler(options.sampler, SD2_SCHEDULER_CONFIG,
                                         options.steps), options.start_timestep)

    params = {"unet": as_held(unet.param_shapes(unet_cfg), dt),
              "controlnet": as_held(controlnet.param_shapes(cn_cfg), dt),
              "vae": as_held(vae.param_shapes(vae_cfg), vdt)}
    params_sh = inference_shardings(params, config, mesh)
    n = global_batch(mesh, batch_per_chip)
    ram = jax.eval_shape(
        lambda p, x: dape.DAPE(dape_cfg, dtype=jnp.float32).apply({"params": p}, x)[0],
        dape.param_shapes(dape_cfg),
        jax.ShapeDtypeStruct((1, dape_cfg.swin.img_size, dape_cfg.swin.img_size, 3),
                             jnp.float32))
    guided = settings.guided
    text_len, text_width = text_cfg.max_position_embeddings, text_cfg.hidden_size
    bx = batch_axes(mesh)
    batch_sh = NamedSharding(mesh, P(bx))
    # A 'space' axis splits each image's height (SeeSRPipeline(spatial_shards=...)).
    control_sh = NamedSharding(mesh, P(bx, "space")) if "space" in mesh.axis_names \
        else batch_sh
    control = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=control_sh)
    text = jax.ShapeDtypeStruct((n, 2, text_len, text_width) if guided
                                else (n, text_len, text_width), jnp.float32,
                                sharding=batch_sh)
    ram_in = jax.ShapeDtypeStruct((n,) + ram.shape[1:], jnp.float32, sharding=batch_sh)
    keys = image_keys(n, batch_sh)
    fn = partial(restore, nets, settings)
    jitted = jax.jit(fn, in_shardings=(params_sh, None, control_sh, batch_sh, batch_sh,
                                       batch_sh),
                     out_shardings=control_sh)
    plan_arg = jax.tree.map(np.asarray, plan)
    args = (with_shardings(params, params_sh), plan_arg, control, text, ram_in, keys)
    parts = inference_parts(params, params_sh, (control, text, ram_in))
    return Program("seesr sample", jitted, args, n, parts,
                   notes=[f"{plan.num_steps} {options.sampler} steps, guidance "
                          f"{options.guidance_scale}, {size}² outputs"])
