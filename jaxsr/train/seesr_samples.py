"""Sample SR images during SeeSR training, from the weights being trained.

    make = seesr_sampler(config, nets, tags, tokenizer, scheduler_config, workdir)
    sample = make(mesh, frozen_shardings)        # once, after the train step compiled
    images = sample(step, state.params, frozen)   # every config.samples.every steps

config.samples: every (steps; 0 = never), source, count, size, seed
(`jaxsr.train.held_out`), and steps (denoising steps). The frozen
networks (DAPE, text encoder) do not change during training, so the prompts and soft
prompts are computed once; each sample runs only the sampler (the inference pipeline's
`restore`, on the training mesh with the sharded params: no second copy of the
weights) with the current ControlNet and RCA blocks. Every process calls `sample`;
process 0 writes DIR/samples/step_NNNNNNN.png, one row per photo: LR (nearest ×4) |
SR | HR.

    make = seesr_evaluator(config, nets, tags, tokenizer, scheduler_config)
    evaluate = make(mesh, frozen_shardings)
    scores = evaluate(step, state.params, frozen)  # every config.eval.every steps

config.eval: the same fields as config.samples for its own held-out photos, plus the
metric fields of `jaxsr.train.held_out`; the mean score of each metric over the photos
is logged by the training loop.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.data.resize import seesr_upscale_input
from jaxsr.diffusion.samplers import make_sampler
from jaxsr.models.tags import hard_prompt
from jaxsr.models.tokenizer import tokenize
from jaxsr.pipelines.seesr import SeeSROptions, dape_input, sampling_settings
from jaxsr.pipelines.seesr_sampling import Networks, restore
from jaxsr.train.held_out import (
    comparison_strip,
    held_out_metrics,
    held_out_pairs,
    replicated,
)
from jaxsr.train.seesr_objective import SeeSRTrainNets, join_unet


def held_out_key(config, section: str) -> tuple:
    """What decides config.<section>'s held-out SR results: sections with equal keys
    (the quickstart's samples and eval) share one restorer, one compile and one run
    per step."""
    cfg = config[section]
    return (str(cfg.source), int(cfg.count), int(cfg.size), int(cfg.steps), int(cfg.seed))


def held_out_restorer(config, section: str, nets: SeeSRTrainNets, tags: list[str], tokenizer,
                      scheduler_config: dict, shared: dict | None = None):
    """(pairs, make): the held-out (LR, HR) pairs of config.<section> (source, count,
    size, steps, seed) and make(mesh, frozen_shardings) -> run(step, trainable, frozen),
    which super-resolves every LR with the weights being trained: uint8
    [N, size, size, 3]. `make` builds once; `run` keeps the last step's result. With a
    `shared` dict, sections with the same `held_out_key` get the same (pairs, make)."""
    if shared is not None:
        key = held_out_key(config, section)
        if key not in shared:
            shared[key] = held_out_restorer(config, section, nets, tags, tokenizer,
                                            scheduler_config)
        return shared[key]
    cfg = config[section]
    pairs = held_out_pairs(config, section)
    lrs = np.stack([lr for lr, _ in pairs])
    options = SeeSROptions(steps=int(cfg.steps), process_size=int(cfg.size))
    settings = sampling_settings(options, nets.alphas_cumprod)
    plan = make_sampler(options.sampler, scheduler_config, options.steps)
    restore_nets = Networks(unet=nets.unet, controlnet=nets.controlnet, vae=nets.vae)

    built = {}

    def make(mesh, frozen_shardings):
        if "run" not in built:
            built["run"] = build(mesh)
        return built["run"]

    def build(mesh):
        rep = NamedSharding(mesh, P())
        tag_size = nets.dape.config.swin.img_size
        dape_in = replicated(np.stack([dape_input(lr, tag_size) for lr in lrs]), rep)
        dape_fn = jax.jit(lambda p, x: nets.dape.apply({"params": p}, x), out_shardings=rep)

        text_fn = jax.jit(lambda p, ids: nets.text_encoder.apply({"params": p}, ids),
                          out_shardings=rep)

        def encode(frozen, prompts):
            return text_fn(frozen["text_encoder"], replicated(tokenize(tokenizer, prompts), rep))

        def restore_fn(trainable, frozen, plan, control, text, ram, key_data):
            keys = jax.random.wrap_key_data(key_data)
            params = {"unet": join_unet(frozen["unet"], trainable["unet_rca"]),
                      "controlnet": trainable["controlnet"], "vae": frozen["vae"]}
            return restore(restore_nets, settings, params, plan, control, text, ram, keys,
                           None)

        compiled_restore = jax.jit(restore_fn, out_shardings=rep)
        control = np.stack([seesr_upscale_input(lr, options.upscale, options.process_size)
                            for lr in lrs]).astype(np.float32) / np.float32(255.0)
        control = replicated(control, rep)
        # Image i's draws come from fold_in(key(seed), i), as in SeeSRPipeline.upscale.
        key_data = replicated(jax.random.key_data(jax.vmap(
            lambda i: jax.random.fold_in(jax.random.key(int(cfg.seed)), i))(
                jnp.arange(len(lrs)))), rep)
        cache = {}

        def run(step: int, trainable, frozen) -> np.ndarray:
            if cache.get("step") == step:   # a second section at the same step
                return cache["out"]
            if "text" not in cache:   # the frozen networks' part, once
                ram, logits = dape_fn(frozen["dape"], dape_in)
                prompts = [options.positive_prompt(t) for t in
                           hard_prompt(np.asarray(logits), tags, nets.thresholds)]
                text = encode(frozen, prompts)
                if settings.guided:
                    neg = encode(frozen, [options.negative_prompt] * len(prompts))
                    text = jnp.stack([neg, text], axis=1)
                cache.update(ram=ram, text=text)
            out = np.asarray(compiled_restore(trainable, frozen, plan, control, cache["text"],
                                              cache["ram"], key_data))
            cache.update(step=step, out=out)
            return out

        return run

    return pairs, make


def seesr_sampler(config, nets: SeeSRTrainNets, tags: list[str], tokenizer,
                  scheduler_config: dict, workdir, shared: dict | None = None):
    """The `make_sampler` of the SeeSR task (see the module docstring)."""
    from jaxsr.data.image_io import save_image

    out_dir = Path(workdir) / "samples"
    pairs, make_run = held_out_restorer(config, "samples", nets, tags, tokenizer,
                                        scheduler_config, shared)

    def make(mesh, frozen_shardings):
        run = make_run(mesh, frozen_shardings)

        def sample(step: int, trainable, frozen) -> dict[str, np.ndarray]:
            out = run(step, trainable, frozen)
            grid = np.concatenate([comparison_strip(lr, sr, hr)
                                   for (lr, hr), sr in zip(pairs, out)], axis=0)
            if jax.process_index() == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                save_image(out_dir / f"step_{step:07d}.png", grid)
            return {"samples": grid}

        return sample

    return make


def seesr_evaluator(config, nets: SeeSRTrainNets, tags: list[str], tokenizer,
                    scheduler_config: dict, note=print, shared: dict | None = None):
    """The `make_evaluator` of the SeeSR task: config.eval's held-out photos (chosen and
    degraded as the samples are), super-resolved and scored with config.eval.metrics
    (jaxsr.metrics.registry.HeldOutMetrics) against their HR crops."""
    metrics = held_out_metrics(config, note)
    pairs, make_run = held_out_restorer(config, "eval", nets, tags, tokenizer,
                                        scheduler_config, shared)
    hr = np.stack([hr for _, hr in pairs])

    def make(mesh, frozen_shardings):
        run = make_run(mesh, frozen_shardings)
        return lambda step, trainable, frozen: metrics(run(step, trainable, frozen), hr)

    return make
