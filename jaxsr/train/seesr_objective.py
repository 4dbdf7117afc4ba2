"""SeeSR's training loss as pure functions of (trainable, frozen, batch, keys).

Per example, all on the device (seesr_reference.md sections 5 and 6):
1. second-order degradation of the clean crop → LR [S/4]² and the USM-sharpened GT;
   both quantised to 8 bits, as the released pipeline stores them as PNG files;
2. ControlNet image = bicubic ×4 of the LR (PyTorch's kernel), saturated to [0, 1]
   like the stored `sr_bicubic` PNG;
3. soft prompt = frozen DAPE on the ControlNet image (bicubic to the tagger size);
4. text = tags of the frozen tagger on the clean GT, ", "-joined, tokenised on the
   device (prompt_tokens), replaced by "" with probability `null_text_ratio`;
   the released trainer read tags made offline by the original RAM; here the frozen
   DAPE weights tag the GT (distilled to agree with RAM on clean images);
5. z = 0.18215 · VAE posterior sample of 2·GT − 1; t ~ U{0..T−1}; ε ~ N(0, I);
   x_t = √ᾱ_t z + √(1−ᾱ_t) ε;
6. ε̂ = UNet(x_t, t, text, soft prompt, ControlNet residuals); loss = mean (ε̂ − ε)²
   in float32.

Every random draw comes from the example's own key, so the loss of an example does
not depend on the batch size, the mesh, or which process holds it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsr.models.clip_text import CLIPTextModel
from jaxsr.models.controlnet import ControlNetModel
from jaxsr.models.dape import DAPE, ram_preprocess
from jaxsr.models.unet import UNet2DConditionModel
from jaxsr.models.vae import AutoencoderKL
from jaxsr.nn.resize import torch_resize_bicubic
from jaxsr.train.prompt_tokens import TagTokenTable, prompt_ids

RCA_MARK = "image_attentions"

# One independent stream per use of an example's key.
DEGRADE, TEXT_DROP, POSTERIOR, TIMESTEP, NOISE = range(5)


class SeeSRTrainNets(NamedTuple):
    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    dape: DAPE
    tag_table: TagTokenTable
    thresholds: np.ndarray          # [C] float32, the tagger's per-class thresholds
    alphas_cumprod: np.ndarray      # [T] float64 training schedule


def split_unet(unet_params) -> tuple[dict, dict]:
    """UNet params -> (frozen part, RCA part), each a nested dict of disjoint leaves."""
    flat = traverse_util.flatten_dict(unet_params)
    rca = {k: v for k, v in flat.items() if RCA_MARK in "/".join(k)}
    if not rca:
        raise ValueError("the UNet has no RCA blocks (image_attentions); SeeSR training "
                         "needs use_image_cross_attention")
    frozen = {k: v for k, v in flat.items() if k not in rca}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(rca)


def join_unet(frozen, rca) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(rca)})


def quantize8(x):
    """Round to the 8-bit levels of a PNG, saturating (cv2.imwrite of 255·x)."""
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0) / 255.0


def _stream(keys, stream):
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def conditioning(nets: SeeSRTrainNets, frozen, hr, keys, degrade_fn, null_text_ratio: float):
    """Frozen-network inputs of a batch of clean crops.

    hr: float32 [B, S, S, 3] in [0, 1]; keys: [B] typed keys.
    degrade_fn(keys [B], hr) -> (lr [B, S/4, S/4, 3], gt [B, S, S, 3]).
    Returns dict(gt, control [B,S,S,3], ram [B,N,E], text [B,77,D], ids [B,77]).
    """
    lr, gt = degrade_fn(_stream(keys, DEGRADE), hr)
    lr, gt = quantize8(lr), quantize8(gt)
    size = hr.shape[1:3]
    control = quantize8(torch_resize_bicubic(lr, size))

    tag_size = nets.dape.config.swin.img_size
    def tagger_input(x):
        return ram_preprocess(jnp.clip(torch_resize_bicubic(x, (tag_size, tag_size)), 0, 1))

    dape = lambda method, x: nets.dape.apply({"params": frozen["dape"]}, x, method=method)
    ram = dape(DAPE.image_embeds, tagger_input(control))
    gt_logits = dape(DAPE.tag_logits, tagger_input(gt))
    fired = jax.nn.sigmoid(gt_logits) > jnp.asarray(nets.thresholds)
    drop = jax.vmap(lambda k: jax.random.uniform(k) < null_text_ratio)(
        _stream(keys, TEXT_DROP))
    ids = prompt_ids(nets.tag_table, fired & ~drop[:, None])
    text = nets.text_encoder.apply({"params": frozen["text_encoder"]}, ids)
    return {"gt": gt, "control": control, "ram": jax.lax.stop_gradient(ram),
            "text": jax.lax.stop_gradient(text), "ids": ids}


def noisy_latents(nets: SeeSRTrainNets, frozen, gt, keys):
    """(x_t [B,h,w,c], t [B] int32, ε [B,h,w,c]) from the GT's VAE latents."""
    posterior = nets.vae.apply({"params": frozen["vae"]}, 2.0 * gt - 1.0,
                               method=AutoencoderKL.encode)
    eps_post = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, jnp.float32))(
        _stream(keys, POSTERIOR), posterior.mean)
    z = posterior.sample_with_noise(eps_post) * nets.vae.config.scaling_factor
    z = jax.lax.stop_gradient(z)
    num_t = len(nets.alphas_cumprod)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_t))(_stream(keys, TIMESTEP))
    eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, jnp.float32))(
        _stream(keys, NOISE), z)
    ac = jnp.asarray(nets.alphas_cumprod, jnp.float32)[t][:, None, None, None]
    return jnp.sqrt(ac) * z + jnp.sqrt(1.0 - ac) * eps, t.astype(jnp.int32), eps


def eps_loss(nets: SeeSRTrainNets, trainable, frozen, cond, x_t, t, eps):
    """Mean squared ε error (float32) of ControlNet + UNet with the trainable params."""
    down, mid = nets.controlnet.apply({"params": trainable["controlnet"]}, x_t, t,
                                      cond["text"], cond["control"], cond["ram"])
    unet_params = join_unet(frozen["unet"], trainable["unet_rca"])
    pred = nets.unet.apply({"params": unet_params}, x_t, t, cond["text"], cond["ram"],
                           down_block_additional_residuals=down,
                           mid_block_additional_residual=mid)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - eps))


def seesr_loss(nets: SeeSRTrainNets, trainable, frozen, hr, keys, degrade_fn,
               null_text_ratio: float):
    """The training loss of one (micro-)batch: a float32 scalar."""
    cond = conditioning(nets, frozen, hr, keys, degrade_fn, null_text_ratio)
    x_t, t, eps = noisy_latents(nets, frozen, cond["gt"], keys)
    return eps_loss(nets, trainable, frozen, cond, x_t, t, eps)
