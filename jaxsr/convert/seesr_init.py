"""SeeSR's initial ControlNet params for training, made from its UNet's params.

SeeSR starts its ControlNet as diffusers' `ControlNetModel.from_unet` does: the
encoder (RCA included) copied from the UNet by name, the output convs zero, the
condition embedding's other convs random. Strict: a ControlNet parameter the UNet
cannot supply, or supplies in another shape, raises ConversionError naming it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsr.convert.tree import ConversionError
from jaxsr.models import controlnet
from jaxsr.models.controlnet import ControlNetConfig

# Parts that diffusers' from_unet leaves at their (zero) initialisation.
_ZERO_PREFIXES = ("controlnet_down_blocks_", "controlnet_mid_block")


def controlnet_params_from_unet(unet_params, controlnet_shapes, rng=None):
    """Initial ControlNet params for training, as `ControlNetModel.from_unet` makes them.

    Copied from the UNet (same paths): conv_in, time_embedding, down_blocks_*,
    mid_block, RCA included (SeeSR starts its ControlNet RCA as a copy of the UNet's).
    Zero: controlnet_cond_embedding/conv_out, controlnet_down_blocks_*,
    controlnet_mid_block. Random, with PyTorch's default Conv2d init (weight and bias
    ~ U(±1/sqrt(fan_in))): the other controlnet_cond_embedding convs.

    Args:
      unet_params: the UNet's Flax params (numpy or jax arrays).
      controlnet_shapes: the ControlNet's param tree or its shapes
        (`jaxsr.models.controlnet.param_shapes`), or its ControlNetConfig.
      rng: jax PRNG key for the random part (default key 0).
    Returns:
      the ControlNet param tree of jax arrays (copied leaves are the UNet's arrays,
      not copies; JAX arrays are immutable so sharing is safe).
    Raises:
      ConversionError naming each ControlNet param the UNet lacks or shapes differently
      (stricter than from_unet's strict=False, which would leave RCA random silently).
    """
    rng = jax.random.key(0) if rng is None else rng
    if isinstance(controlnet_shapes, ControlNetConfig):
        controlnet_shapes = controlnet.param_shapes(controlnet_shapes)
    unet = traverse_util.flatten_dict(unet_params)
    targets = traverse_util.flatten_dict(controlnet_shapes)
    out, missing, mismatched = {}, [], []
    for path, target in targets.items():
        shape = tuple(target.shape)
        name = "/".join(path)
        if path[0].startswith(_ZERO_PREFIXES) or path[:2] == (
                "controlnet_cond_embedding", "conv_out"):
            out[path] = jnp.zeros(shape, jnp.float32)
        elif path[0] == "controlnet_cond_embedding":
            fan_in = math.prod(targets[path[:-1] + ("kernel",)].shape[:-1])
            bound = 1.0 / math.sqrt(fan_in)
            rng, sub = jax.random.split(rng)
            out[path] = jax.random.uniform(sub, shape, jnp.float32, -bound, bound)
        elif path not in unet:
            missing.append(name)
        elif tuple(unet[path].shape) != shape:
            mismatched.append(f"{name}: {list(unet[path].shape)} vs {list(shape)}")
        else:
            out[path] = jnp.asarray(unet[path], jnp.float32)
    if missing or mismatched:
        raise ConversionError("UNet params (to initialise the ControlNet from)",
                              missing=missing, mismatched=mismatched)
    return traverse_util.unflatten_dict(out)
