"""The original Stable Diffusion 2.x single-file layout -> diffusers/transformers names.

A single file (`v2-1_512-ema-pruned.ckpt` and friends) holds

    model.diffusion_model.*    the UNet (LDM `UNetModel`)
    first_stage_model.*        the VAE (LDM `AutoencoderKL`)
    cond_stage_model.model.*   the whole OpenCLIP ViT-H text tower (24 blocks)
    betas, alphas_cumprod, ... the DDPM training schedule

The rules below rename those tensors into the diffusers UNet/VAE and the
transformers CLIPTextModel layouts (then `jaxsr.convert.tree` takes over). Every
tensor is renamed, on the documented ignore list, or reported; nothing is dropped
silently. The rules are written from the structure of the two UNet
implementations, and tests check them against maps traced through diffusers'
own converter.
"""

from __future__ import annotations

import re

import numpy as np

from jaxsr.convert.tree import ConversionError
from jaxsr.models.clip_text import CLIPTextConfig
from jaxsr.models.unet import UNetConfig
from jaxsr.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

# Tensors of a single-file checkpoint that no jaxsr network uses (full-match regexes).
IGNORED_LDM_KEYS = (
    # The DDPM schedule LDM trained with; jaxsr computes it from the scheduler config.
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
    r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
    r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
    r"posterior_mean_coef1|posterior_mean_coef2|model_ema\.decay|model_ema\.num_updates)",
    # CLIP's contrastive head: SD conditions on token features, not the pooled projection.
    r"cond_stage_model\.model\.(text_projection|logit_scale)",
)


class NotSingleFileError(ValueError):
    def __init__(self):
        super().__init__(f"not an SD 2.x single-file checkpoint: no {UNET_PREFIX}* tensors "
                         "(a diffusers model is loaded from its pipeline folder)")


def last_text_block_pattern(text_layers: int) -> str:
    """SD2 conditions on the *penultimate* OpenCLIP block's output, so the last block
    (index = the number of layers the text encoder runs) is never used."""
    return rf"cond_stage_model\.model\.transformer\.resblocks\.{text_layers}\..+"


# --- UNet ------------------------------------------------------------------------------
# LDM numbers its blocks flat: input_blocks.0 is conv_in, then each level has
# `layers_per_block` (resnet [, attention]) blocks and, except the last level, one
# downsampler block; output_blocks has `layers_per_block + 1` blocks per level, the
# last of which also carries the upsampler. diffusers nests the same modules per level.

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2",
                "skip_connection": "conv_shortcut"}


def rename_prefix(tail: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if tail.startswith(old + "."):
            return new + tail[len(old):]
    raise KeyError(tail)


def unet_key(key: str, layers_per_block: int = 2) -> str:
    """An LDM UNet key (without `model.diffusion_model.`) -> its diffusers name.
    Raises KeyError for keys outside the layout."""
    down_slots = layers_per_block + 1       # resnets + the downsampler slot per level
    up_slots = layers_per_block + 1         # one more resnet per level on the way up
    if m := re.fullmatch(r"time_embed\.([02])\.(.+)", key):
        return f"time_embedding.linear_{1 if m[1] == '0' else 2}.{m[2]}"
    if m := re.fullmatch(r"input_blocks\.0\.0\.(.+)", key):
        return f"conv_in.{m[1]}"
    if m := re.fullmatch(r"out\.([02])\.(.+)", key):
        return f"{'conv_norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", key):
        level, slot = divmod(int(m[1]) - 1, down_slots)
        if slot == layers_per_block:        # the level's downsampler block: `op` conv only
            if m[2] == "0" and m[3].startswith("op."):
                return f"down_blocks.{level}.downsamplers.0.conv.{m[3][3:]}"
            raise KeyError(key)
        if m[2] == "0":
            return f"down_blocks.{level}.resnets.{slot}.{rename_prefix(m[3], UNET_RESNET)}"
        return f"down_blocks.{level}.attentions.{slot}.{m[3]}"
    if m := re.fullmatch(r"middle_block\.([012])\.(.+)", key):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{rename_prefix(m[2], UNET_RESNET)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", key):
        level, slot = divmod(int(m[1]), up_slots)
        if m[2] == "0":
            return f"up_blocks.{level}.resnets.{slot}.{rename_prefix(m[3], UNET_RESNET)}"
        if m[3].startswith("conv."):
            # The upsampler follows the resnet (and attention) of a level's last block.
            if slot != layers_per_block:
                raise KeyError(key)
            return f"up_blocks.{level}.upsamplers.0.{m[3]}"
        if m[2] != "1":
            raise KeyError(key)
        return f"up_blocks.{level}.attentions.{slot}.{m[3]}"
    raise KeyError(key)


# --- VAE -------------------------------------------------------------------------------

_VAE_MID_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                      "proj_out": "to_out.0"}


def vae_key(key: str, levels: int) -> tuple[str, bool]:
    """An LDM VAE key (without `first_stage_model.`) -> (diffusers name, squeeze).

    `squeeze` marks the mid-block attention projections: 1×1 convs [C, C, 1, 1] in
    LDM, Linear [C, C] in diffusers. Raises KeyError for keys outside the layout."""
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key, False
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", key):
        return f"{m[1]}.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)", key):
        name = f"{m[1]}.mid_block.attentions.0.{_VAE_MID_ATTENTION[m[2]]}.{m[3]}"
        return name, m[2] != "norm" and m[3] == "weight"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}", False
    # LDM indexes decoder levels by resolution like the encoder (up.0 = full size, run
    # last); diffusers lists them in execution order: up.i is up_blocks[levels-1-i].
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        level = levels - 1 - int(m[1])
        return f"decoder.up_blocks.{level}.resnets.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}", False
    raise KeyError(key)


def _vae_resnet(tail: str) -> str:
    if not re.fullmatch(r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", tail):
        raise KeyError(tail)
    return tail.replace("nin_shortcut", "conv_shortcut", 1)


# --- text encoder (OpenCLIP -> transformers CLIPTextModel) ------------------------------

_TEXT_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1",
               "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def text_keys(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """An OpenCLIP text key (without `cond_stage_model.model.`) -> transformers names
    and tensors (the fused attention input projection splits into three).
    Raises KeyError for keys outside the layout."""
    t = "text_model."
    if key == "token_embedding.weight":
        return [(t + "embeddings.token_embedding.weight", value)]
    if key == "positional_embedding":
        return [(t + "embeddings.position_embedding.weight", value)]
    if m := re.fullmatch(r"ln_final\.(weight|bias)", key):
        return [(t + f"final_layer_norm.{m[1]}", value)]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if not m:
        raise KeyError(key)
    base = f"{t}encoder.layers.{m[1]}."
    if m2 := re.fullmatch(r"attn\.in_proj_(weight|bias)", m[2]):
        # nn.MultiheadAttention stacks the q, k, v projections by rows: [3C, C] / [3C].
        if value.shape[0] % 3:
            raise ValueError(f"{TEXT_PREFIX}{key}: {value.shape[0]} rows do not split into "
                             "q, k, v")
        q, k, v = np.split(value, 3, axis=0)
        return [(f"{base}self_attn.{p}_proj.{m2[1]}", x) for p, x in (("q", q), ("k", k),
                                                                      ("v", v))]
    return [(base + rename_prefix(m[2], _TEXT_BLOCK), value)]


# --- the whole file ---------------------------------------------------------------------

def count_levels(state: dict, pattern: str) -> int:
    """1 + the largest index captured by `pattern` (a regex with one group) over the keys."""
    found = [int(m[1]) for k in state if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def unet_layers_per_block(state: dict) -> int:
    """Read off a single file's UNet: input_blocks = conv_in + `layers_per_block` blocks
    per level + a downsampler on every level but the last = levels * (layers_per_block + 1).
    """
    blocks = count_levels(state, re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.")
    levels = 1 + len({m[1] for k in state if (m := re.match(
        re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.0\.op\.", k))})
    if blocks == 0:
        raise NotSingleFileError()
    if blocks % levels:
        raise ValueError(f"single-file UNet with {blocks} input blocks over {levels} levels "
                         "is not an SD 2.x layout")
    return blocks // levels - 1


def split_single_file(state: dict, *, unet_layers_per_block: int = 2,
                      text_layers: int | None = None,
                      what: str = "single-file checkpoint") -> dict[str, dict]:
    """Rename a single-file checkpoint into {'unet', 'vae', 'text_encoder'} state dicts
    with diffusers/transformers names.

    `text_layers`: how many OpenCLIP blocks the text encoder runs (SD2: all but the
    last); by default one less than the checkpoint holds. Block `text_layers` is
    ignored as documented; any other surplus is an error.
    Raises ConversionError listing (as unexpected) every key that no rule renames
    and no ignore pattern covers; ValueError without any UNet key or if two keys
    would land on one name.
    """
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise NotSingleFileError()
    vae_levels = count_levels(state, re.escape(VAE_PREFIX) + r"encoder\.down\.(\d+)\.")
    if text_layers is None:
        text_layers = count_levels(
            state, re.escape(TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.") - 1
    ignore = [re.compile(p) for p in (*IGNORED_LDM_KEYS, last_text_block_pattern(text_layers))]
    out: dict[str, dict] = {"unet": {}, "vae": {}, "text_encoder": {}}
    origin: dict[tuple[str, str], str] = {}
    unknown, clashes = [], []

    def put(module, name, value, source):
        if (module, name) in origin:
            clashes.append(f"{origin[module, name]} and {source} -> {module} {name}")
        origin[module, name] = source
        out[module][name] = value

    for key, value in state.items():
        if any(r.fullmatch(key) for r in ignore):
            continue
        try:
            if key.startswith(UNET_PREFIX):
                put("unet", unet_key(key[len(UNET_PREFIX):], unet_layers_per_block), value, key)
            elif key.startswith(VAE_PREFIX):
                name, squeeze = vae_key(key[len(VAE_PREFIX):], vae_levels)
                value = np.asarray(value)
                if squeeze and value.ndim == 4 and value.shape[2:] == (1, 1):
                    value = value[:, :, 0, 0]
                put("vae", name, value, key)
            elif key.startswith(TEXT_PREFIX):
                for name, part in text_keys(key[len(TEXT_PREFIX):], np.asarray(value)):
                    put("text_encoder", name, part, key)
            else:
                unknown.append(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{what} (SD 2.x single-file layout)", unexpected=unknown)
    if clashes:
        raise ValueError("single-file keys that rename to the same tensor:\n  "
                         + "\n  ".join(clashes[:50]))
    return out


# --- configs from tensor shapes ---------------------------------------------------------
# A single file carries no config. These read the architecture off the (renamed)
# tensors; what shapes cannot tell is SD2's: 64-channel attention heads, 32 norm groups.

SD2_HEAD_CHANNELS = 64


def infer_unet_config(state: dict, head_channels: int = SD2_HEAD_CHANNELS) -> UNetConfig:
    """UNet architecture from a diffusers-named state dict."""
    levels = count_levels(state, r"down_blocks\.(\d+)\.")
    chans = tuple(int(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                  for i in range(levels))
    lpb = count_levels(state, r"down_blocks\.0\.resnets\.(\d+)\.")
    attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in state)
            for i in range(levels)]
    if not any(attn):
        raise ValueError("UNet without cross-attention blocks: not an SD 2.x UNet")
    first = attn.index(True)
    to_k = state[f"down_blocks.{first}.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    proj_in = state[f"down_blocks.{first}.attentions.0.proj_in.weight"]
    return UNetConfig(
        in_channels=int(state["conv_in.weight"].shape[1]),
        out_channels=int(state["conv_out.weight"].shape[0]),
        block_out_channels=chans, layers_per_block=lpb,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
        attention_head_dim=tuple(max(c // head_channels, 1) for c in chans),
        cross_attention_dim=int(to_k.shape[1]), use_linear_projection=proj_in.ndim == 2,
    )


def infer_vae_config(state: dict) -> VAEConfig:
    """VAE architecture from a diffusers-named state dict."""
    levels = count_levels(state, r"encoder\.down_blocks\.(\d+)\.")
    chans = tuple(int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                  for i in range(levels))
    return VAEConfig(in_channels=int(state["encoder.conv_in.weight"].shape[1]),
                     out_channels=int(state["decoder.conv_out.weight"].shape[0]),
                     latent_channels=int(state["post_quant_conv.weight"].shape[0]),
                     block_out_channels=chans,
                     layers_per_block=count_levels(
                         state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))


def infer_text_config(state: dict, head_channels: int = SD2_HEAD_CHANNELS) -> CLIPTextConfig:
    """Text-encoder architecture from a transformers-named state dict."""
    tok = state["text_model.embeddings.token_embedding.weight"]
    hidden = int(tok.shape[1])
    return CLIPTextConfig(
        vocab_size=int(tok.shape[0]), hidden_size=hidden,
        intermediate_size=int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=count_levels(state, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=max(hidden // head_channels, 1),
        max_position_embeddings=int(
            state["text_model.embeddings.position_embedding.weight"].shape[0]))
