"""LoRA in loralib's layout: merged into a weight (pure functions) or kept apart
as trainable tensors (`LoRADense`).

loralib keeps a low-rank update next to a linear layer's weight W [out, in]:

    lora.Linear(r):                        lora_A [r, in], lora_B [out, r]
        ΔW = lora_B @ lora_A
    lora.MergedLinear(r, enable_lora=g):   W is split by rows into len(g) equal groups
        of out/len(g) rows; each enabled group j (the j-th True of g) has its own pair
        lora_A [j*r:(j+1)*r] and lora_B [j*o:(j+1)*o] (o = out/len(g)), so
        lora_A [r*k, in], lora_B [o*k, r] with k = sum(g), and
        ΔW[rows of group] = lora_B[j-th block] @ lora_A[j-th block]; other rows 0.

The update is scaled by lora_alpha / r; `model.eval()` in loralib folds it into W
(merge_weights=True), which is what the pure `merge_*` functions do here. Every
function takes and returns torch-layout matrices [out, in]; the Flax `kernel` is
the transpose. They work on numpy and jax arrays alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def _xp(*arrays):
    """numpy for numpy inputs (checkpoint conversion stays on the host), jnp otherwise."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def lora_scale(alpha: float, rank: int) -> float:
    """loralib's `scaling`: alpha / r."""
    return alpha / rank


def lora_delta(lora_A, lora_B, scale: float, groups: Sequence[bool] = (True,)):
    """ΔW [out, in] of a (Merged)Linear's LoRA pair, times `scale`.

    Args:
      lora_A: [r*k, in]; lora_B: [o*k, r] with k = sum(groups) enabled groups of o rows.
      groups: loralib's `enable_lora` (one flag per row group of W); (True,) = lora.Linear.
    Returns:
      [o*len(groups), in]; rows of disabled groups are zero.
    """
    xp = _xp(lora_A, lora_B)
    k = sum(bool(g) for g in groups)
    if k == 0:
        raise ValueError("LoRA groups enable no rows")
    rank = lora_B.shape[1]
    rows = lora_B.shape[0] // k
    if lora_A.shape[0] != rank * k or lora_B.shape[0] != rows * k:
        raise ValueError(f"LoRA shapes lora_A {tuple(lora_A.shape)} / lora_B "
                         f"{tuple(lora_B.shape)} do not fit {k} enabled group(s) of rank {rank}")
    blocks, j = [], 0
    for enabled in groups:
        if enabled:
            b = lora_B[j * rows:(j + 1) * rows]
            a = lora_A[j * rank:(j + 1) * rank]
            blocks.append((b @ a) * scale)
            j += 1
        else:
            blocks.append(xp.zeros((rows, lora_A.shape[1]), lora_A.dtype))
    return xp.concatenate(blocks, axis=0)


def merge_lora(weight, lora_A, lora_B, scale: float):
    """lora.Linear merged: W + scale·B@A. weight [out, in], A [r, in], B [out, r]."""
    return weight + lora_delta(lora_A, lora_B, scale).astype(weight.dtype)


def merge_grouped_lora(weight, lora_A, lora_B, scale: float,
                       groups: Sequence[bool] = (True, False, True)):
    """lora.MergedLinear merged. For Swin's qkv (groups q, k, v = True, False, True):
    rows [0:dim] += scale·B[:dim]@A[:r] and rows [2dim:3dim] += scale·B[dim:]@A[r:]."""
    delta = lora_delta(lora_A, lora_B, scale, groups)
    if delta.shape != weight.shape:
        raise ValueError(f"LoRA update {tuple(delta.shape)} does not fit weight "
                         f"{tuple(weight.shape)}")
    return weight + delta.astype(weight.dtype)


def _lora_A_init(key, shape, dtype=jnp.float32):
    # loralib: kaiming_uniform_(a=√5) on lora_A [r*k, in] -> U(±1/√in).
    bound = 1.0 / np.sqrt(shape[1])
    return nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound


class LoRADense(nn.Module):
    """nn.Dense whose torch twin is a loralib Linear / MergedLinear.

    With `lora_rank` 0 it is a plain Dense (params `kernel` [in, out], `bias`). With
    rank r > 0 it also owns `lora_A` [r*k, in] and `lora_B` [o*k, r] in torch layout
    (so loralib checkpoints convert by name), initialised like loralib (A uniform,
    B zero, so a fresh adapter starts as the identity update). The update is
    computed apart from the kernel, so an optimiser can train only the LoRA tensors.

    x [..., in] -> [..., features].
    """

    features: int
    use_bias: bool = True
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_groups: tuple[bool, ...] = (True,)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (in_features, self.features), jnp.float32)
        out = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            out = out + bias.astype(self.dtype)
        if self.lora_rank <= 0:
            return out
        groups = tuple(bool(g) for g in self.lora_groups)
        n, k, r = len(groups), sum(groups), self.lora_rank
        if self.features % n:
            raise ValueError(f"{self.features} outputs do not split into {n} LoRA groups")
        rows = self.features // n
        lora_A = self.param("lora_A", _lora_A_init, (r * k, in_features), jnp.float32)
        lora_B = self.param("lora_B", nn.initializers.zeros, (rows * k, r), jnp.float32)
        scale = lora_scale(self.lora_alpha, r)
        # x A^T per enabled group, then each group's B: [..., k, r] x [k, rows, r].
        after_a = jnp.dot(x.astype(self.dtype), lora_A.T.astype(self.dtype))
        after_a = after_a.reshape(*after_a.shape[:-1], k, r)
        after_b = jnp.einsum("...kr,kor->...ko", after_a,
                             lora_B.reshape(k, rows, r).astype(self.dtype)) * scale
        parts, j = [], 0
        for enabled in groups:
            if enabled:
                parts.append(after_b[..., j, :])
                j += 1
            else:
                parts.append(jnp.zeros(after_b.shape[:-2] + (rows,), after_b.dtype))
        return out + jnp.concatenate(parts, axis=-1)


def fold_lora_params(params, alpha: float,
                     groups_of: Callable[[tuple[str, ...]], Sequence[bool]] = lambda p: (True,)):
    """Fold every `lora_A`/`lora_B` pair of a Flax param tree into its module's `kernel`.

    The result is the param tree of the same model with `lora_rank` 0 (what loralib's
    `eval()` merge gives). `groups_of(module_path)` names the row groups of that
    module's LoRA (e.g. (True, False, True) for Swin qkv).
    """
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if path[-1] in ("lora_A", "lora_B"):
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_A",) in flat:
            a = flat[path[:-1] + ("lora_A",)]
            b = flat[path[:-1] + ("lora_B",)]
            delta = lora_delta(a, b, lora_scale(alpha, b.shape[1]), groups_of(path[:-1]))
            value = value + delta.T.astype(value.dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)
