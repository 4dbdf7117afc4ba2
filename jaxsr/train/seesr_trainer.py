"""Train SeeSR: ControlNet + the UNet's RCA blocks; everything else frozen.

    result = train(config, workdir)          # configs/seesr_train.py; status 0 when finished

This file says what SeeSR trains (weights, the frozen / trainable split, the loss, the
sample images); `jaxsr.train.loop.run` is the loop (mesh, sharded state, input,
resume, compile, checkpoints, SIGTERM, NaN guard).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.convert.seesr_init import controlnet_params_from_unet
from jaxsr.convert.seesr_weights import SeeSRWeights, load_seesr_folder
from jaxsr.diffusion.schedule import SchedulerConfig
from jaxsr.models.clip_text import CLIPTextModel
from jaxsr.models.controlnet import ControlNetModel
from jaxsr.models.dape import DAPE
from jaxsr.models.tokenizer import load_tokenizer
from jaxsr.models.unet import UNet2DConditionModel
from jaxsr.models.vae import AutoencoderKL
from jaxsr.train.loop import EXIT_TERMINATED, Task, TrainResult, run
from jaxsr.train.prompt_tokens import TagTokenTable
from jaxsr.train.seesr_objective import SeeSRTrainNets, seesr_loss, split_unet

__all__ = ["EXIT_TERMINATED", "TrainResult", "seesr_task", "seesr_weight_shapes", "train"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_weights(config):
    """(SeeSRWeights, tokenizer) from `config.init.weights`: a converted folder, or
    "random" (tiny random weights through a temporary folder; the same in every
    process, since they are drawn from config.seed)."""
    source = config.init.weights
    if not source:
        raise ValueError("config.init.weights is empty: give a `jaxsr convert --seesr` "
                         "folder (or 'random' for the tiny variant)")
    if source != "random":
        weights = load_seesr_folder(source)
        if weights.tokenizer_dir is None:
            raise FileNotFoundError(f"{source} has no tokenizer/; reconvert with jaxsr convert")
        return weights, load_tokenizer(weights.tokenizer_dir)
    from jaxsr.demo import write_random_seesr

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_seesr(Path(tmp) / "weights", config.model, seed=config.seed,
                                    log=lambda *_: None)
        weights = load_seesr_folder(folder)
        # The tokenizer is read now, before the folder goes away.
        return weights, load_tokenizer(folder / "tokenizer")


def seesr_weight_shapes(config):
    """`load_weights`' result with every parameter tree as ShapeDtypeStructs, from
    config.model's sizes alone (no file read, nothing drawn): what `jaxsr plan`
    compiles. The tag list and thresholds are the packaged RAM ones; the tokenizer is
    the demo one (the tag table's shapes depend on the tags, not on the vocabulary)."""
    from jaxsr.demo import SD2_SCHEDULER_CONFIG, demo_tokenizer, model_configs
    from jaxsr.models import clip_text, controlnet, dape, unet, vae
    from jaxsr.models.tags import load_tag_list, load_thresholds

    unet_cfg, cn_cfg, vae_cfg, text_cfg, dape_cfg = model_configs(config.model)
    weights = SeeSRWeights(
        unet=(unet_cfg, unet.param_shapes(unet_cfg)),
        controlnet=(cn_cfg, controlnet.param_shapes(cn_cfg)),
        vae=(vae_cfg, vae.param_shapes(vae_cfg)),
        text_encoder=(text_cfg, clip_text.param_shapes(text_cfg)),
        dape=(dape_cfg, dape.param_shapes(dape_cfg)),
        tags=list(load_tag_list()), thresholds=load_thresholds(),
        scheduler_config=dict(SD2_SCHEDULER_CONFIG), tokenizer_dir=None)
    return weights, demo_tokenizer()


def build_networks(config, weights, tokenizer) -> SeeSRTrainNets:
    dt = _DTYPES[config.model.dtype]
    att = config.model.attention
    remat = bool(config.get("remat", False))
    return SeeSRTrainNets(
        unet=UNet2DConditionModel(weights.unet[0], dtype=dt, attention=att, remat=remat),
        controlnet=ControlNetModel(weights.controlnet[0], dtype=dt, attention=att,
                                   remat=remat),
        vae=AutoencoderKL(weights.vae[0], dtype=dt, attention=att),
        text_encoder=CLIPTextModel(weights.text_encoder[0], dtype=dt, attention=att),
        dape=DAPE(weights.dape[0], attention=att, dtype=dt),
        tag_table=TagTokenTable.build(tokenizer, weights.tags),
        thresholds=np.asarray(weights.thresholds, np.float32),
        alphas_cumprod=SchedulerConfig.from_diffusers(weights.scheduler_config, "ddpm")
        .alphas_cumprod())


def split_params(config, weights) -> tuple[dict, dict]:
    """(trainable, frozen) host trees: ControlNet + UNet RCA vs the rest (abstract
    trees from `seesr_weight_shapes` stay abstract)."""
    frozen_unet, rca = split_unet(weights.unet[1])
    cn = weights.controlnet[1]
    abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(cn))
    # Initialising the ControlNet from the UNet keeps every shape: nothing to do on shapes.
    if config.init.controlnet_from_unet and not abstract:
        cn = jax.tree.map(np.asarray, controlnet_params_from_unet(
            weights.unet[1], cn, jax.random.key(config.seed)))
    trainable = {"controlnet": cn, "unet_rca": rca}
    frozen = {"unet": frozen_unet, "vae": weights.vae[1],
              "text_encoder": weights.text_encoder[1], "dape": weights.dape[1]}
    return trainable, frozen


def degradation_fn(config):
    """(keys [B], hr [B,S,S,3]) -> (lr, target) with config.degradation's preset."""
    from jaxsr.data.degrade import degrade_batch, preset_by_name

    preset = preset_by_name(config.degradation)
    return lambda keys, hr: degrade_batch(keys, hr, preset)


def seesr_task(config, workdir, weights=None) -> Task:
    """Weights, the trainable/frozen split, the loss, the sample writer and the held-out
    evaluation of SeeSR. weights: (SeeSRWeights, tokenizer) as `load_weights` (the
    default) or `seesr_weight_shapes` (abstract: `jaxsr plan`) give them."""
    weights, tokenizer = load_weights(config) if weights is None else weights
    nets = build_networks(config, weights, tokenizer)
    trainable, frozen = split_params(config, weights)
    degrade_fn = degradation_fn(config)
    null_text_ratio = float(config.null_text_ratio)

    def loss_fn(params, frozen, hr, keys):
        return seesr_loss(nets, params, frozen, hr, keys, degrade_fn, null_text_ratio), {}

    # Samples and held-out evaluation of the same photos share one compiled restorer.
    shared = {}
    make_sampler = None
    if config.get("samples", {}).get("every", 0):
        from jaxsr.train.seesr_samples import seesr_sampler

        make_sampler = seesr_sampler(config, nets, list(weights.tags), tokenizer,
                                     weights.scheduler_config, workdir, shared=shared)
    make_evaluator = None
    if config.get("eval", {}).get("every", 0):
        from jaxsr.train.seesr_samples import seesr_evaluator

        make_evaluator = seesr_evaluator(config, nets, list(weights.tags), tokenizer,
                                         weights.scheduler_config, shared=shared)
    return Task(trainable=trainable, frozen=frozen, loss_fn=loss_fn,
                make_sampler=make_sampler, make_evaluator=make_evaluator)


def train(config, workdir, *, devices=None, make_iterator=None) -> TrainResult:
    """Run (or resume) SeeSR training in `workdir`; see `jaxsr.train.loop.run`."""
    return run(seesr_task(config, workdir), config, workdir, devices=devices,
               make_iterator=make_iterator)
