"""CoSeR stage-2 initial parameters, made from SD-2.1-base UNet params.

CoSeR starts stage 2 from SD: the AiA UNet's SD part is SD's (frozen), its new
`*_lna` parts are copies of the SD layers they parallel, and the ControlNet is a
copy of SD's encoder. In Flax paths (jaxsr names):

  AiA UNet, inside every AiA transformer:
    transformer_blocks_0/attn3_lr_lna, attn4_ref_lna  <- transformer_blocks_0/attn1
    transformer_blocks_0/norm4_lna                     <- transformer_blocks_0/norm1
    norm_clr_lna, norm_cref_lna                        <- norm
    proj_in_clr_lna, proj_in_cref_lna                  <- proj_in
    transformer_blocks_0/zero_conv_lna, zero_conv_r_lna  zero
    dubconv_lna, dubconv_r_lna     PyTorch's default Conv2d init, U(±1/sqrt(fan_in))
    transformer_blocks_0/norm5_lna  LayerNorm default (ones, zeros); unused
  ControlNet: conv_in, time_embedding, down_blocks_*, mid_block <- the same SD paths;
    hint_zero_conv, controlnet_down_blocks_*, controlnet_mid_block zero.

Both functions are strict: a target parameter SD cannot supply, or supplies in another
shape, raises ConversionError naming it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsr.convert.tree import ConversionError
from jaxsr.models import coser_controlnet, coser_unet
from jaxsr.models.coser_controlnet import COSER_CONTROLNET, CoSeRControlNetConfig
from jaxsr.models.coser_unet import COSER_UNET, CoSeRUNetConfig

_COPIED_FROM = {"attn3_lr_lna": "attn1", "attn4_ref_lna": "attn1", "norm4_lna": "norm1",
                "norm_clr_lna": "norm", "norm_cref_lna": "norm",
                "proj_in_clr_lna": "proj_in", "proj_in_cref_lna": "proj_in"}
_ZERO = ("zero_conv_lna", "zero_conv_r_lna")
_TORCH_CONV_INIT = ("dubconv_lna", "dubconv_r_lna")
_FRESH_LAYER_NORM = ("norm5_lna",)


def _copy(out, path, source, sd, missing, mismatched, shape):
    name = "/".join(path)
    if source not in sd:
        missing.append(f"{name} (from {'/'.join(source)})")
    elif tuple(sd[source].shape) != shape:
        mismatched.append(f"{'/'.join(source)}: {list(sd[source].shape)} vs {list(shape)} "
                          f"for {name}")
    else:
        out[path] = jnp.asarray(sd[source], jnp.float32)


def aia_unet_params_from_sd(sd_unet_params, config: CoSeRUNetConfig = COSER_UNET, rng=None):
    """SD UNet Flax params (jaxsr.models.unet names) -> AiA UNet params for stage 2.

    Args:
      sd_unet_params: the SD UNet's param tree (numpy or jax arrays).
      config: the AiA UNet's config; its `base` must be the SD UNet's.
      rng: PRNG key for the dubconvs (default key 0).
    Returns:
      the AiA UNet param tree (float32 jax arrays).
    Raises:
      ConversionError for AiA params SD lacks or shapes differently, and SD params the
      AiA UNet does not have.
    """
    rng = jax.random.key(0) if rng is None else rng
    sd = traverse_util.flatten_dict(sd_unet_params)
    targets = traverse_util.flatten_dict(coser_unet.param_shapes(config))
    out, missing, mismatched, used = {}, [], [], set()
    for path, target in targets.items():
        shape = tuple(target.shape)
        new = [i for i, seg in enumerate(path) if seg.endswith("_lna")]
        if not new:
            used.add(path)
            _copy(out, path, path, sd, missing, mismatched, shape)
            continue
        i = new[0]
        seg = path[i]
        if seg in _COPIED_FROM:
            _copy(out, path, path[:i] + (_COPIED_FROM[seg],) + path[i + 1:], sd, missing,
                  mismatched, shape)
        elif seg in _ZERO:
            out[path] = jnp.zeros(shape, jnp.float32)
        elif seg in _FRESH_LAYER_NORM:
            out[path] = (jnp.ones if path[-1] == "scale" else jnp.zeros)(shape, jnp.float32)
        elif seg in _TORCH_CONV_INIT:
            # torch's kaiming_uniform(a=sqrt(5)) for the weight and its bias rule both
            # reduce to U(±1/sqrt(fan_in)), fan_in = kh·kw·C_in.
            fan_in = math.prod(targets[path[:-1] + ("kernel",)].shape[:-1])
            bound = 1.0 / math.sqrt(fan_in)
            rng, sub = jax.random.split(rng)
            out[path] = jax.random.uniform(sub, shape, jnp.float32, -bound, bound)
        else:
            raise ValueError(f"no stage-2 initialisation rule for {'/'.join(path)}")
    unused = ["/".join(p) for p in sd if p not in used]
    if missing or mismatched or unused:
        raise ConversionError("SD UNet params (to initialise the AiA UNet from)",
                              missing=missing, unexpected=unused, mismatched=mismatched)
    return traverse_util.unflatten_dict(out)


def controlnet_params_from_sd(sd_unet_params,
                              config: CoSeRControlNetConfig = COSER_CONTROLNET):
    """SD UNet Flax params -> CoSeR ControlNet params for stage 2 (encoder copied by
    name, CoSeR's own convs zero). Raises ConversionError for encoder params the SD
    UNet lacks or shapes differently."""
    sd = traverse_util.flatten_dict(sd_unet_params)
    targets = traverse_util.flatten_dict(coser_controlnet.param_shapes(config))
    out, missing, mismatched = {}, [], []
    for path, target in targets.items():
        shape = tuple(target.shape)
        if path[0] in ("hint_zero_conv", "controlnet_mid_block") or path[0].startswith(
                "controlnet_down_blocks_"):
            out[path] = jnp.zeros(shape, jnp.float32)
        else:
            _copy(out, path, path, sd, missing, mismatched, shape)
    if missing or mismatched:
        raise ConversionError("SD UNet params (to initialise the CoSeR ControlNet from)",
                              missing=missing, mismatched=mismatched)
    return traverse_util.unflatten_dict(out)
