"""StableSR's CFW autoencoder checkpoint (vqgan_cfw_00011.ckpt) -> `CFWAutoencoderKL` params.

The checkpoint is a Lightning file of StableSR's `AutoencoderKLResi`; its
`state_dict` holds

    encoder.*, decoder.*, quant_conv.*, post_quant_conv.*   the SD VAE, LDM names
    decoder.fusion_layer_{1,2}.encode_enc_{1,3}.{norm1,conv1,norm2,conv2,conv_out}.*
    decoder.fusion_layer_{1,2}.encode_enc_2.{0,1}.rdb{1,2,3}.conv{1..5}.*
    loss.*                                                  training loss (ignored)

The VAE part goes through the SD single-file rules of `jaxsr.convert.ldm` (LDM ->
diffusers names); the fusion layers move to the top level of the Flax tree
(`decoder.fusion_layer_1.encode_enc_1.conv_out` -> `fusion_layer_1/encode_enc_1/
conv_shortcut`, see `jaxsr.models.cfw_vae`). Keys may carry StableSR's
`first_stage_model.` prefix, which its own loader strips too.

Strict: every tensor renamed or on `IGNORED_CFW_KEYS`, every parameter filled,
every shape checked; one `ConversionError` names every offender in the
checkpoint's own (LDM) naming. Shapes of the mid-block attention projections are
shown as [C, C] (their 1×1 conv kernels squeezed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxsr.convert import ldm
from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import ConversionError, torch_key_to_path, torch_to_flax
from jaxsr.models.cfw_vae import CFWConfig, cfw_param_shapes
from jaxsr.models.vae import VAEConfig

# Full-match regexes (after the optional prefix) of tensors no jaxsr network uses.
IGNORED_CFW_KEYS = (
    # StableSR's LPIPSWithDiscriminator, saved with the model by Lightning: the learned
    # log-variance, the LPIPS VGG and its linear heads/scaling buffers, and the
    # PatchGAN discriminator. Training-only.
    r"loss\..+",
)
OPTIONAL_PREFIX = "first_stage_model."

_FUSION_RESBLOCK = re.compile(
    r"decoder\.(fusion_layer_\d+)\.(encode_enc_[13])\.(norm1|conv1|norm2|conv2|conv_out)\."
    r"(weight|bias)")
_FUSION_RRDB = re.compile(
    r"decoder\.(fusion_layer_\d+)\.encode_enc_2\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)")


class CFWWeights(NamedTuple):
    """What `load_cfw` returns: the VAE config, the fusion config, and the Flax params
    (nested dicts of numpy arrays) for `CFWAutoencoderKL(config, cfw=cfw)`."""

    config: VAEConfig
    cfw: CFWConfig
    params: dict


def cfw_key(key: str, levels: int) -> tuple[str, bool]:
    """A checkpoint key (without prefix) -> (name for `torch_to_flax`, squeeze).

    `squeeze` as in `ldm.vae_key` (mid-block attention 1×1 convs -> Linear). Raises
    KeyError for keys outside the layout."""
    if m := _FUSION_RESBLOCK.fullmatch(key):
        # StableSR's ResBlock calls its 1×1 shortcut conv_out; ResnetBlock2D conv_shortcut.
        part = "conv_shortcut" if m[3] == "conv_out" else m[3]
        return f"{m[1]}.{m[2]}.{part}.{m[4]}", False
    if m := _FUSION_RRDB.fullmatch(key):
        return f"{m[1]}.encode_enc_2.{m[2]}.rdb{m[3]}.conv{m[4]}.{m[5]}", False
    return ldm.vae_key(key, levels)


_ATTENTION_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def checkpoint_name(name: str, levels: int) -> str:
    """The inverse of `cfw_key`: a name as `torch_to_flax` reports it -> the LDM key.
    Used to report missing parameters in the checkpoint's naming."""
    path = torch_key_to_path(name)
    if path[0].startswith("fusion_layer_"):
        key = re.sub(r"encode_enc_2_(\d+)", r"encode_enc_2.\1", ".".join(path))
        return "decoder." + key.replace(".conv_shortcut.", ".conv_out.")

    def resnet(tail):
        return tail.replace("conv_shortcut", "nin_shortcut", 1)

    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", name):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    if m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_[qkv]|to_out\.0)\.(.+)",
            name):
        return f"{m[1]}.mid.attn_1.{_ATTENTION_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", name):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # diffusers runs the decoder levels in order, LDM indexes them by resolution.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    return name  # conv_in, conv_out, quant_conv, post_quant_conv: one name in both layouts


def cfw_state_dict(source) -> dict:
    """A checkpoint path, a Lightning checkpoint dict ({"state_dict": ...}) or a flat
    state dict -> {key: numpy array}."""
    if isinstance(source, str | Path):
        return read_state_dict(source)
    if isinstance(source.get("state_dict"), Mapping):
        source = source["state_dict"]
    return {k: np.asarray(v) for k, v in source.items()}


def _rename(state: dict, levels: int):
    """-> (renamed state, {renamed: checkpoint key}, unexpected keys, clashes)."""
    ignore = [re.compile(p) for p in IGNORED_CFW_KEYS]
    renamed, origin, unexpected, clashes = {}, {}, [], []
    for key, value in state.items():
        bare = key[len(OPTIONAL_PREFIX):] if key.startswith(OPTIONAL_PREFIX) else key
        if any(r.fullmatch(bare) for r in ignore):
            continue
        try:
            name, squeeze = cfw_key(bare, levels)
        except KeyError:
            unexpected.append(key)
            continue
        if squeeze and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if name in origin:
            clashes.append(f"{origin[name]} and {key}")
        renamed[name], origin[name] = value, key
    return renamed, origin, unexpected, clashes


def infer_cfw_config(state: dict) -> CFWConfig:
    """Fusion-layer shape from a renamed state dict (the fusion weight is not stored:
    StableSR's default 0.5)."""
    blocks = ldm.count_levels(state, r"fusion_layer_\d+\.encode_enc_2\.(\d+)\.")
    if blocks == 0:
        return CFWConfig(rrdb_blocks=0)
    level = min(int(m[1]) for k in state if (m := re.match(r"fusion_layer_(\d+)\.", k)))
    grow = state[f"fusion_layer_{level}.encode_enc_2.0.rdb1.conv1.weight"].shape[0]
    return CFWConfig(rrdb_blocks=blocks, grow_channels=int(grow))


def load_cfw(source, config: VAEConfig | None = None, cfw: CFWConfig | None = None, *,
             what: str | None = None, dtype=None) -> CFWWeights:
    """StableSR's CFW checkpoint -> `CFWWeights`.

    Args:
      source: path of vqgan_cfw_00011.ckpt (or a .safetensors of its tensors), the
        loaded Lightning dict, or its `state_dict`.
      config: the VAE architecture; by default read off the tensor shapes, which
        cannot tell the GroupNorm group count (SD's 32 is assumed).
      cfw: the fusion-layer shape and default weight; by default read off the
        tensors, with fusion weight 0.5.
      dtype: numpy dtype of the returned params (default float32).
    Raises:
      ConversionError listing every missing, unexpected or misshaped key in the
      checkpoint's naming; ValueError if two keys (with and without the prefix)
      name one tensor.
    """
    what = what or (f"CFW checkpoint {source}" if isinstance(source, str | Path)
                    else "CFW checkpoint")
    state = cfw_state_dict(source)
    levels = (len(config.block_out_channels) if config is not None else ldm.count_levels(
        state, rf"(?:{re.escape(OPTIONAL_PREFIX)})?encoder\.down\.(\d+)\."))
    renamed, origin, unexpected, clashes = _rename(state, levels)
    if clashes:
        raise ValueError(f"{what}: keys that name the same tensor:\n  " + "\n  ".join(clashes))
    try:
        config = config or ldm.infer_vae_config(renamed)
        cfw = cfw or infer_cfw_config(renamed)
    except KeyError as e:
        raise ConversionError(f"{what} (too incomplete to read the architecture off; pass "
                              "config= to see every problem)",
                              missing=[checkpoint_name(e.args[0], levels)]) from None
    missing, mismatched = [], []
    try:
        params = torch_to_flax(renamed, cfw_param_shapes(config, cfw), what=what, dtype=dtype)
    except ConversionError as e:
        misshaped = set()
        for line in e.mismatched:
            name, shapes = line.split(": ", 1)
            misshaped.add(torch_key_to_path(name))
            mismatched.append(f"{origin[name]}: {shapes}")
        # A misshaped tensor leaves its parameter unfilled: report it once, as misshaped.
        missing = [checkpoint_name(k, levels) for k in e.missing
                   if torch_key_to_path(k) not in misshaped]
        unexpected += [origin[k] for k in e.unexpected]
    if missing or unexpected or mismatched:
        raise ConversionError(what, missing, unexpected, mismatched)
    return CFWWeights(config, cfw, params)
