"""Held-out evaluation during CoSeR stage-2 training, from the weights being trained.

    make = coser_evaluator(config, nets, tokenizer)
    evaluate = make(mesh, frozen_shardings)        # once, after the train step compiled
    scores = evaluate(step, state.params, frozen)   # every config.eval.every steps

config.eval: the fields of `jaxsr.train.held_out` (source, count, size, seed, metrics,
metric_weights, crop_border, y_channel) and steps. The photos are chosen and degraded
as SeeSR's are (config.degradation, here StableSR's second-order "coser" preset), and
each LR is super-resolved as `jaxsr sr` does in reference mode with CoSeR's defaults:
prompt "", its negative prompt, guidance 3.0 for the reference and the SR pass, the
respaced `steps`-step DDPM, and every image drawing from key(seed)
(`CoSeRPipeline.upscale` without ids). Decoding uses the plain VAE decoder: stage 2
does not train the CFW decoder, and the folder it exports holds none. The SR images
are scored against their HR crops; the training loop logs each metric's mean.

The sampler runs on the training mesh with the sharded params (no second copy of the
weights): the AiA UNet is the frozen SD part joined with the *_lna layers being trained,
with the ControlNet being trained. The two text embeddings come from the frozen text
encoder once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.diffusion.respace import respaced_schedule
from jaxsr.models.tokenizer import tokenize
from jaxsr.pipelines.coser import NEGATIVE_PROMPT
from jaxsr.pipelines.coser_sampling import CoSeRNetworks, CoSeRSettings, coser_restore
from jaxsr.train.coser_objective import Stage2Nets, merge
from jaxsr.train.held_out import held_out_metrics, held_out_pairs, replicated


def coser_evaluator(config, nets: Stage2Nets, tokenizer, note=print):
    """The `make_evaluator` of CoSeR stage 2 (see the module docstring)."""
    cfg = config.eval
    metrics = held_out_metrics(config, note)
    pairs = held_out_pairs(config, "eval")
    lrs = np.stack([lr for lr, _ in pairs]).astype(np.float32) / np.float32(255.0)
    hr = np.stack([hr for _, hr in pairs])
    restore_nets = CoSeRNetworks(cognitive=nets.cognitive, unet=nets.unet,
                                 controlnet=nets.controlnet, vae=nets.vae)
    settings = CoSeRSettings()
    schedule = respaced_schedule(int(cfg.steps))
    ids = tokenize(tokenizer, ["", NEGATIVE_PROMPT])
    n = len(pairs)

    def make(mesh, frozen_shardings):
        rep = NamedSharding(mesh, P())
        text_fn = jax.jit(lambda p, ids: nets.text_encoder.apply({"params": p}, ids),
                          out_shardings=rep)

        def restore_fn(trainable, frozen, schedule, lr, prompt, negative, key_data):
            params = {"cognitive": frozen["cognitive"],
                      "unet": merge(frozen["unet"], trainable["unet_lna"]),
                      "controlnet": trainable["controlnet"], "vae": frozen["vae"]}
            keys = jax.random.wrap_key_data(key_data)
            return coser_restore(restore_nets, settings, params, schedule, lr, prompt,
                                 negative, keys).image

        compiled = jax.jit(restore_fn, out_shardings=rep)
        lr = replicated(lrs, rep)
        base = jax.random.key_data(jax.random.key(int(cfg.seed)))
        key_data = replicated(np.broadcast_to(np.asarray(base), (n, *base.shape)), rep)
        cache = {}

        def evaluate(step: int, trainable, frozen) -> dict[str, float]:
            if "text" not in cache:     # the frozen text encoder's part, once
                emb = text_fn(frozen["text_encoder"], replicated(ids, rep))
                cache["text"] = tuple(jnp.broadcast_to(e, (n, *e.shape)) for e in emb)
            prompt, negative = cache["text"]
            sr = np.asarray(compiled(trainable, frozen, schedule, lr, prompt, negative,
                                     key_data))
            return metrics(sr, hr)

        return evaluate

    return make
