"""DAPE distillation as pure functions of (LoRA, frozen RAM, batch, keys).

SeeSR's DAPE training (seesr_reference.md section 4): a student RAM with LoRA sees
the degraded image, the frozen original RAM (the teacher) sees the clean one, and
only the LoRA tensors learn to make the student's soft prompt and tag logits on the
degraded image match the teacher's on the clean image. Per example, on the device:

1. second-order degradation of the clean 512² image → LR 128² and the USM-sharpened
   GT, both quantised to 8 bits (the released pairs are PNG files);
2. `sr_bicubic` = PyTorch bicubic ×4 of the LR, saturated to 8 bits like the file;
3. both resized to the tagger's size with PyTorch bilinear (antialias off, the
   tensor `Resize` of the released dataset), ImageNet-normalised;
4. teacher(GT) → (f_gt [145, 512], ℓ_gt [4585]) without gradient, eval mode;
   student(sr_bicubic) → (f_lq, ℓ_lq) in train mode (drop-path 0.1 in the Swin,
   dropout 0.1 in the tagging head), with its own dropout stream per example;
5. loss = mean (f_lq − f_gt)² + w · mean BCE(σ(ℓ_lq), σ(ℓ_gt)), where BCE(q, p) =
   −[p log q + (1 − p) log(1 − q)] with the logs clamped at −100 as torch's
   BCELoss does; w = 1 in the released recipe.

The student's frozen weights ARE the teacher's weights (the student starts as the
same RAM checkpoint and only its LoRA trains), so one frozen tree serves both.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsr.models.dape import DAPE, ram_preprocess
from jaxsr.nn.resize import torch_resize_bicubic, torch_resize_bilinear
from jaxsr.train.seesr_objective import quantize8

LORA_LEAVES = ("lora_A", "lora_B")
# One independent stream per use of an example's key.
DEGRADE, DROPOUT = range(2)
# torch.nn.BCELoss clamps each log term at -100 so a saturated sigmoid stays finite.
BCE_LOG_FLOOR = -100.0


class DAPETrainNets(NamedTuple):
    student: DAPE          # lora_rank r > 0
    teacher: DAPE          # the same architecture with lora_rank 0


def split_lora(params) -> tuple[dict, dict]:
    """DAPE params with LoRA -> (frozen RAM weights, LoRA tensors), disjoint leaves."""
    flat = traverse_util.flatten_dict(params)
    lora = {k: v for k, v in flat.items() if k[-1] in LORA_LEAVES}
    if not lora:
        raise ValueError("the DAPE params carry no LoRA tensors (lora_rank 0)")
    frozen = {k: v for k, v in flat.items() if k not in lora}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(lora)


def join_lora(frozen, lora) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(lora)})


def _stream(keys, stream):
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def distillation_inputs(hr, keys, degrade_fn, size: int):
    """Clean images → (student input, teacher input), each normalised [B, size, size, 3].

    hr: float32 [B, S, S, 3] in [0, 1]; keys: [B] typed keys;
    degrade_fn(keys [B], hr) -> (lr [B, S/4, S/4, 3], gt [B, S, S, 3])."""
    lr, gt = degrade_fn(_stream(keys, DEGRADE), hr)
    lr, gt = quantize8(lr), quantize8(gt)
    sr_bicubic = quantize8(torch_resize_bicubic(lr, hr.shape[1:3]))

    def tagger_input(x):
        return ram_preprocess(torch_resize_bilinear(x, (size, size)))

    return tagger_input(sr_bicubic), tagger_input(gt)


def binary_cross_entropy(logits, target_probs):
    """Mean of −[p log σ(ℓ) + (1 − p) log(1 − σ(ℓ))], each log clamped at −100.

    The logs come from log-sigmoid rather than log(σ(ℓ)): equal wherever σ(ℓ) is
    representable, and finite (then clamped) where it rounds to 0 or 1."""
    log_q = jnp.maximum(jax.nn.log_sigmoid(logits), BCE_LOG_FLOOR)
    log_1mq = jnp.maximum(jax.nn.log_sigmoid(-logits), BCE_LOG_FLOOR)
    return jnp.mean(-(target_probs * log_q + (1.0 - target_probs) * log_1mq))


def distillation_loss(student_embeds, student_logits, teacher_embeds, teacher_logits,
                      bce_weight: float = 1.0):
    """(loss, {"mse", "bce"}) of soft prompts [B, L, E] and logits [B, C], float32."""
    mse = jnp.mean(jnp.square(student_embeds.astype(jnp.float32)
                              - teacher_embeds.astype(jnp.float32)))
    bce = binary_cross_entropy(student_logits.astype(jnp.float32),
                               jax.nn.sigmoid(teacher_logits.astype(jnp.float32)))
    return mse + bce_weight * bce, {"mse": mse, "bce": bce}


def student_forward(nets: DAPETrainNets, lora, frozen, images, keys):
    """The student in train mode, each example with its own dropout stream (so an
    example's result does not depend on the batch or the mesh): images [B, s, s, 3]
    normalised, keys [B] → (embeds [B, L, E], logits [B, C])."""
    params = join_lora(frozen, lora)

    def one(image, key):
        embeds, logits = nets.student.apply({"params": params}, image[None],
                                            deterministic=False, rngs={"dropout": key})
        return embeds[0], logits[0]

    return jax.vmap(one)(images, keys)


def dape_loss(nets: DAPETrainNets, lora, frozen, hr, keys, degrade_fn,
              bce_weight: float = 1.0):
    """The distillation loss of one (micro-)batch: (float32 scalar, {"mse", "bce"})."""
    size = nets.teacher.config.swin.img_size
    lq, gt = distillation_inputs(hr, keys, degrade_fn, size)
    t_embeds, t_logits = jax.lax.stop_gradient(
        nets.teacher.apply({"params": frozen}, gt))
    s_embeds, s_logits = student_forward(nets, lora, frozen, lq, _stream(keys, DROPOUT))
    return distillation_loss(s_embeds, s_logits, t_embeds, t_logits, bce_weight)
