"""CoSeR's two training losses as pure functions (coser_reference.md section 5).

Inputs per example: the clean GT [S, S, 3] in [0, 1], its caption's 77 token ids and
(stage 2) a same-class reference image [S, S, 3]. On the device:

    lr, gt = degrade(GT)      StableSR's second-order degradation (preset "coser"):
                              gt = the USM-sharpened GT, lr = its S/4 degradation,
                              clamped to [0, 1] (= lq_clip)

Stage 1 (SRResNet + Q-Former learn, CLIP frozen):
    E = QFormer(CLIP(SRResNet(lr)))            train mode: Q-Former dropout 0.1
    c = CLIP-text(ids)                         [B, 77, D]
    loss = mean (E − caption_target(c, ids))²  (no pixel loss on the SRResNet)

Stage 2 (the UNet's *_lna layers + the ControlNet learn, everything else frozen):
    ids ← ids of "" for the whole micro-batch with p = 0.5 (one draw)
    c = CLIP-text(ids); E = cognitive(lr); ctx = [c; E]
    z_gt  = 0.18215 · VAE posterior sample of 2·gt − 1
    z_lr  = 0.18215 · VAE mode of bicubic×4(2·lr − 1), or of 2·gt − 1 for the whole
            micro-batch with p = 0.01 (StableSR's "no degradation" draw)
    z_ref = 0.18215 · VAE mode of 2·ref − 1       (ref USM-sharpened like the GT)
    z_t = √ᾱ_t z_gt + √(1 − ᾱ_t) ε,  t ~ U{0..T−1}
    X, R = ControlNet(z_t, t, ctx, hint = z_lr | z_ref)
    loss = mean (UNet(z_t, t, ctx, X, R) − ε)²

The LR, GT, reference and caption of an example always stay together (the released
trainer's Real-ESRGAN pair pool swapped LR/GT away from their caption, reference and
E; that bug is not reproduced). The two per-batch draws come from the batch key
(the first example's key, folded), the rest from each example's own key, so an
example's loss does not depend on the mesh or on which process holds it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsr.data.degrade.usm import usm_sharpen
from jaxsr.models.clip_text import CLIPTextModel
from jaxsr.models.cognitive import CognitiveEncoder
from jaxsr.models.coser_controlnet import CoSeRControlNet
from jaxsr.models.coser_unet import CoSeRUNet, coser_context
from jaxsr.models.qformer import trainable_mask
from jaxsr.models.vae import AutoencoderKL
from jaxsr.nn.resize import torch_resize_bicubic

LNA_MARK = "_lna"
# One independent stream per use of an example's key.
DEGRADE, POSTERIOR, TIMESTEP, NOISE = range(4)
# Streams of the micro-batch's key: one draw shared by all its examples.
BATCH_STREAM = 0xBA7C
TEXT_DROP, NO_DEGRADATION, DROPOUT = range(3)


class Stage1Nets(NamedTuple):
    cognitive: CognitiveEncoder
    text_encoder: CLIPTextModel


class Stage2Nets(NamedTuple):
    cognitive: CognitiveEncoder
    text_encoder: CLIPTextModel
    unet: CoSeRUNet
    controlnet: CoSeRControlNet
    vae: AutoencoderKL
    alphas_cumprod: np.ndarray      # [T] training schedule
    empty_ids: np.ndarray           # [77] int32, the tokens of ""


class Stage2Draws(NamedTuple):
    """Every random number of a stage-2 loss (drawn by `stage2_draws`, or given)."""

    posterior: jax.Array            # [B, h, w, 4] N(0, 1), the GT latent's sample
    t: jax.Array                    # [B] int32
    noise: jax.Array                # [B, h, w, 4] ε
    drop_text: jax.Array            # bool [], the whole micro-batch's caption → ""
    gt_as_lr: jax.Array             # bool [], the whole micro-batch's LR → its GT


# ----------------------------------------------------------------- keys and splits


def _stream(keys, stream):
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def batch_key(keys, stream: int):
    """The micro-batch's key for `stream`: derived from its first example's key (the
    examples' keys depend only on the step and their place in the global batch)."""
    return jax.random.fold_in(jax.random.fold_in(keys[0], BATCH_STREAM), stream)


def split_qformer(qformer_params) -> tuple[dict, dict]:
    """Q-Former params -> (params its forward uses, the unused text-path ones)."""
    mask = traverse_util.flatten_dict(trainable_mask(qformer_params))
    flat = traverse_util.flatten_dict(qformer_params)
    used = {k: v for k, v in flat.items() if mask[k]}
    unused = {k: v for k, v in flat.items() if not mask[k]}
    return traverse_util.unflatten_dict(used), traverse_util.unflatten_dict(unused)


def split_lna(unet_params) -> tuple[dict, dict]:
    """AiA UNet params -> (the SD part, every param under a `*_lna` module)."""
    flat = traverse_util.flatten_dict(unet_params)
    lna = {k: v for k, v in flat.items() if any(s.endswith(LNA_MARK) for s in k)}
    if not lna:
        raise ValueError("the UNet has no *_lna params; CoSeR stage 2 needs the AiA UNet")
    base = {k: v for k, v in flat.items() if k not in lna}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(lna)


def merge(*trees) -> dict:
    """Union of nested dicts with disjoint leaves."""
    out = {}
    for tree in trees:
        out.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------- shared parts


def degraded_pair(hr, keys, degrade_fn):
    """hr [B, S, S, 3] in [0, 1] -> (lr [B, S/4, S/4, 3], gt [B, S, S, 3])."""
    return degrade_fn(_stream(keys, DEGRADE), hr)


def caption_target(text_emb, ids, length: int):
    """The Q-Former's target: `length` text tokens ending at the end token.

    text_emb [B, L, D], ids [B, L] (the end token has the largest id). With n the end
    token's position + 1: tokens [n − length, n) when n ≥ length, else [0, n) followed
    by the end token's embedding repeated length − n times. Returns [B, length, D]."""
    n = jnp.argmax(ids, axis=-1) + 1
    start = jnp.maximum(n - length, 0)
    pos = jnp.minimum(start[:, None] + jnp.arange(length)[None], (n - 1)[:, None])
    return jnp.take_along_axis(text_emb, pos[..., None], axis=1)


def adapter_embedding(cognitive: CognitiveEncoder, params, lr, dropout_key=None):
    """E [B, Lq, D] of lr [B, h, w, 3]; Q-Former dropout on when a key is given."""
    return cognitive.apply({"params": params}, lr, deterministic=dropout_key is None,
                           rngs=None if dropout_key is None else {"dropout": dropout_key})


# ----------------------------------------------------------------- stage 1


def stage1_loss_of(nets: Stage1Nets, trainable, frozen, lr, ids, dropout_key=None):
    """Stage-1 loss of degraded inputs: lr [B, h, w, 3] in [0, 1], ids [B, 77].
    trainable: {"pre_sr_model", "global_adapter"} (the used Q-Former params);
    frozen: {"visual", "text_encoder"}. Returns a float32 scalar."""
    params = {"pre_sr_model": trainable["pre_sr_model"], "visual": frozen["visual"],
              "global_adapter": trainable["global_adapter"]}
    e = adapter_embedding(nets.cognitive, params, lr, dropout_key)
    text = nets.text_encoder.apply({"params": frozen["text_encoder"]}, ids)
    target = jax.lax.stop_gradient(caption_target(text, ids, e.shape[1]))
    return jnp.mean(jnp.square(e - target))


def stage1_loss(nets: Stage1Nets, trainable, frozen, hr, keys, degrade_fn, ids):
    """The stage-1 training loss of a micro-batch of clean GTs hr [B, S, S, 3]."""
    lr, _ = degraded_pair(hr, keys, degrade_fn)
    return stage1_loss_of(nets, trainable, frozen, lr, ids, batch_key(keys, DROPOUT))


# ----------------------------------------------------------------- stage 2


def stage2_draws(keys, latent_hw, num_t: int, drop_prob: float,
                 gt_as_lr_prob: float) -> Stage2Draws:
    """The random numbers of a stage-2 loss from the examples' keys [B]."""
    shape = (*latent_hw, 4)
    normal = lambda stream: jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(
        _stream(keys, stream))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_t))(_stream(keys, TIMESTEP))
    return Stage2Draws(
        posterior=normal(POSTERIOR), t=t.astype(jnp.int32), noise=normal(NOISE),
        drop_text=jax.random.uniform(batch_key(keys, TEXT_DROP)) < drop_prob,
        gt_as_lr=jax.random.uniform(batch_key(keys, NO_DEGRADATION)) < gt_as_lr_prob)


def stage2_latents(nets: Stage2Nets, vae_params, lr, gt, ref, posterior_noise, gt_as_lr):
    """(z_gt, z_lr, z_ref), each [B, h, w, 4], from one VAE encode of the 3B images."""
    size = gt.shape[1:3]
    lq = jnp.where(gt_as_lr, 2.0 * gt - 1.0, torch_resize_bicubic(2.0 * lr - 1.0, size))
    images = jnp.concatenate([2.0 * gt - 1.0, lq, 2.0 * ref - 1.0], axis=0)
    posterior = nets.vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
    b = gt.shape[0]
    scale = nets.vae.config.scaling_factor
    z_gt = posterior.mean[:b] + posterior.std[:b] * posterior_noise
    return (jax.lax.stop_gradient(scale * z_gt),
            jax.lax.stop_gradient(scale * posterior.mode()[b:2 * b]),
            jax.lax.stop_gradient(scale * posterior.mode()[2 * b:]))


def stage2_example_losses(nets: Stage2Nets, trainable, frozen, lr, gt, ref, ids,
                          draws: Stage2Draws, dropout_key=None):
    """Per-example ε-MSE [B] of degraded inputs (lr [B, S/4, S/4, 3], gt and ref
    [B, S, S, 3] in [0, 1], ids [B, 77]) with the given draws.
    trainable: {"unet_lna", "controlnet"}; frozen: {"unet", "vae", "text_encoder",
    "cognitive"}; dropout_key: the frozen Q-Former's dropout (None: eval mode)."""
    ids = jnp.where(draws.drop_text, jnp.asarray(nets.empty_ids)[None], ids)
    text = nets.text_encoder.apply({"params": frozen["text_encoder"]}, ids)
    e = adapter_embedding(nets.cognitive, frozen["cognitive"], lr, dropout_key)
    ctx = jax.lax.stop_gradient(coser_context(text, e))
    z_gt, z_lr, z_ref = stage2_latents(nets, frozen["vae"], lr, gt, ref, draws.posterior,
                                       draws.gt_as_lr)
    ac = jnp.asarray(nets.alphas_cumprod, jnp.float32)[draws.t][:, None, None, None]
    z_t = jnp.sqrt(ac) * z_gt + jnp.sqrt(1.0 - ac) * draws.noise
    x_feats, r_feats = nets.controlnet.apply(
        {"params": trainable["controlnet"]}, z_t, draws.t, ctx, z_lr, z_ref,
        method=CoSeRControlNet.lr_and_reference)
    unet_params = merge(frozen["unet"], trainable["unet_lna"])
    pred = nets.unet.apply({"params": unet_params}, z_t, draws.t, ctx, x_feats, r_feats)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - draws.noise), axis=(1, 2, 3))


def stage2_loss(nets: Stage2Nets, trainable, frozen, hr, keys, degrade_fn, ref, ids, *,
                drop_prob: float, gt_as_lr_prob: float, adapter_dropout: bool,
                sharpen_reference: bool):
    """The stage-2 training loss of a micro-batch: clean GTs hr [B, S, S, 3], their
    references ref [B, S, S, 3] in [0, 1] and caption ids [B, 77]. The reference is
    USM-sharpened like the GT when `sharpen_reference` (StableSR sharpens both)."""
    lr, gt = degraded_pair(hr, keys, degrade_fn)
    if sharpen_reference:
        ref = usm_sharpen(ref)
    f = 2 ** (len(nets.vae.config.block_out_channels) - 1)
    draws = stage2_draws(keys, (gt.shape[1] // f, gt.shape[2] // f),
                         len(nets.alphas_cumprod), drop_prob, gt_as_lr_prob)
    dropout_key = batch_key(keys, DROPOUT) if adapter_dropout else None
    losses = stage2_example_losses(nets, trainable, frozen, lr, gt, ref, ids, draws,
                                   dropout_key)
    return jnp.mean(losses), {"text_dropped": draws.drop_text.astype(jnp.float32)}
