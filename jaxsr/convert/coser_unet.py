"""A CoSeR Lightning state dict (LDM names) -> the AiA UNet and ControlNet Flax params.

    model.diffusion_model.*    AiA UNet (jaxsr.models.coser_unet), 954 tensors at full size
    structcond_stage_model.*   ControlNet (jaxsr.models.coser_controlnet), 274 tensors

Both use SD's LDM layout, so jaxsr.convert.ldm's UNet rules rename them to the
diffusers names jaxsr's modules mirror. The new tensors need no extra rule for the
UNet: the `*_lna` ones live inside the transformers (`middle_block.1.*`,
`output_blocks.N.1.*`), whose tails the SD rules keep as they are
(`output_blocks.5.1.dubconv_lna.weight` -> `up_blocks.1.attentions.2.dubconv_lna.weight`).
The ControlNet's own tensors are renamed to the names jaxsr's ControlNets use:

    zero_convs.k.0.*      -> controlnet_down_blocks.k.*
    middle_block_out.0.*  -> controlnet_mid_block.*
    hint_zero_conv.*      -> hint_zero_conv.*

Strict: every tensor under the prefix used, every parameter filled, every shape
checked. Errors name the checkpoint's own (LDM) keys: the renaming is inverted for
parameters the checkpoint lacks. Other prefixes (VAE, CLIP, Q-Former, ...) belong to
other converters and are ignored here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from jaxsr.convert import ldm
from jaxsr.convert.tree import ConversionError, torch_to_flax
from jaxsr.models import coser_controlnet, coser_unet
from jaxsr.models.coser_controlnet import COSER_CONTROLNET, CoSeRControlNetConfig
from jaxsr.models.coser_unet import COSER_UNET, CoSeRUNetConfig

UNET_PREFIX = "model.diffusion_model."
CONTROLNET_PREFIX = "structcond_stage_model."

_RESNET_TO_LDM = {new: old for old, new in ldm.UNET_RESNET.items()}


# --- LDM -> jaxsr names -----------------------------------------------------------------

def aia_unet_key(key: str, layers_per_block: int = 2) -> str:
    """An AiA UNet key without `model.diffusion_model.` -> its diffusers-style name.
    Raises KeyError for keys outside the layout."""
    return ldm.unet_key(key, layers_per_block)


def controlnet_key(key: str, layers_per_block: int = 2) -> str:
    """A ControlNet key without `structcond_stage_model.` -> its jaxsr name.
    Raises KeyError for keys outside the layout (the decoder's included)."""
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(weight|bias)", key):
        return f"controlnet_down_blocks.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"middle_block_out\.0\.(weight|bias)", key):
        return f"controlnet_mid_block.{m[1]}"
    if re.fullmatch(r"hint_zero_conv\.(weight|bias)", key):
        return key
    if not key.startswith(("time_embed.", "input_blocks.", "middle_block.")):
        raise KeyError(key)
    return ldm.unet_key(key, layers_per_block)


# --- jaxsr -> LDM names (for error messages) -----------------------------------------------

def ldm_key(name: str, layers_per_block: int = 2,
            up_attention: tuple[bool, ...] = (False, True, True, True)) -> str:
    """Inverse of `aia_unet_key` / `controlnet_key`: a jaxsr (diffusers-style) name -> the
    LDM key without prefix. `up_attention[l]`: whether up block l has transformers (it
    decides the upsampler's slot in LDM's output block). Raises KeyError otherwise."""
    slots = layers_per_block + 1
    resnet = lambda tail: ldm.rename_prefix(tail, _RESNET_TO_LDM)
    if m := re.fullmatch(r"time_embedding\.linear_([12])\.(.+)", name):
        return f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
    if m := re.fullmatch(r"(conv_in|conv_norm_out|conv_out)\.(.+)", name):
        return {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0",
                "conv_out": "out.2"}[m[1]] + "." + m[2]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block = 1 + int(m[1]) * slots + int(m[3])
        return (f"input_blocks.{block}.0.{resnet(m[4])}" if m[2] == "resnets"
                else f"input_blocks.{block}.1.{m[4]}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m[1]) + 1) * slots}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block = int(m[1]) * slots + int(m[3])
        return (f"output_blocks.{block}.0.{resnet(m[4])}" if m[2] == "resnets"
                else f"output_blocks.{block}.1.{m[4]}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        level = int(m[1])
        slot = 2 if up_attention[level] else 1
        return f"output_blocks.{level * slots + layers_per_block}.{slot}.{m[2]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", name):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_mid_block\.(.+)", name):
        return f"middle_block_out.0.{m[1]}"
    if name.startswith("hint_zero_conv."):
        return name
    raise KeyError(name)


# --- conversion ---------------------------------------------------------------------------

def _convert(state: Mapping, prefix: str, rename: Callable[[str], str],
             inverse: Callable[[str], str], target, what: str):
    """Rename the tensors under `prefix`, fill `target` strictly, report in LDM names."""
    renamed, origin, unknown = {}, {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        try:
            name = rename(key[len(prefix):])
        except KeyError:
            unknown.append(key)
            continue
        renamed[name], origin[name] = value, key
    if not renamed and not unknown:
        raise ValueError(f"{what}: no {prefix}* tensors; is this a CoSeR checkpoint "
                         "(its 'state_dict')?")
    try:
        params, err = torch_to_flax(renamed, target, what=what), None
    except ConversionError as e:
        params, err = None, e
    if err is None and not unknown:
        return params

    def ldm_name(name):
        try:
            return prefix + inverse(name)
        except KeyError:
            return name

    mismatched, misshaped = [], set()
    for line in err.mismatched if err else []:
        name, rest = line.split(": ", 1)
        mismatched.append(f"{origin[name]}: {rest}")
        misshaped.add(origin[name])
    # torch_to_flax also lists a misshaped tensor's parameter as unfilled: report it once.
    missing = [m for m in (ldm_name(n) for n in (err.missing if err else []))
               if m not in misshaped]
    unexpected = unknown + [origin[n] for n in (err.unexpected if err else [])]
    raise ConversionError(what, missing=missing, unexpected=unexpected, mismatched=mismatched)


def _up_attention(base) -> tuple[bool, ...]:
    return tuple(t == "CrossAttnUpBlock2D" for t in base.up_block_types)


def convert_aia_unet(state: Mapping, config: CoSeRUNetConfig = COSER_UNET, *,
                     what: str = "CoSeR checkpoint (model.diffusion_model.*)"):
    """CoSeR state dict (numpy arrays; other prefixes ignored) -> AiA UNet Flax params.

    Raises ConversionError naming every missing, unexpected or misshaped
    `model.diffusion_model.*` key; ValueError when there is none."""
    lpb = config.base.layers_per_block
    return _convert(state, UNET_PREFIX, lambda k: aia_unet_key(k, lpb),
                    lambda n: ldm_key(n, lpb, _up_attention(config.base)),
                    coser_unet.param_shapes(config), what)


def convert_controlnet(state: Mapping, config: CoSeRControlNetConfig = COSER_CONTROLNET, *,
                       what: str = "CoSeR checkpoint (structcond_stage_model.*)"):
    """CoSeR state dict (numpy arrays; other prefixes ignored) -> ControlNet Flax params.

    Raises ConversionError naming every missing, unexpected or misshaped
    `structcond_stage_model.*` key; ValueError when there is none."""
    lpb = config.base.layers_per_block
    return _convert(state, CONTROLNET_PREFIX, lambda k: controlnet_key(k, lpb),
                    lambda n: ldm_key(n, lpb), coser_controlnet.param_shapes(config), what)
