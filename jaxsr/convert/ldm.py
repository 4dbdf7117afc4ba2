"""The original Stable Diffusion 2.x single-file layout -> diffusers/transformers names.

A single file holds `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.model.*` (the whole OpenCLIP text tower) and the training
schedule buffers. The rules below rename those tensors into the diffusers UNet
and VAE and the transformers CLIPTextModel layouts; everything else is either on
the documented ignore list or reported as unrecognised.
"""

from __future__ import annotations

import re

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

# Tensors of a single-file checkpoint that no jaxsr network uses.
IGNORED_LDM_KEYS = (
    # the DDPM schedule LDM trained with; jaxsr recomputes it from the scheduler config
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
    r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
    r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
    r"posterior_mean_coef1|posterior_mean_coef2|model_ema\.decay|model_ema\.num_updates)",
    # CLIP's contrastive head: SD uses token features, not the pooled projection
    r"cond_stage_model\.model\.(text_projection|logit_scale)",
)

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resnet_tail(tail: str) -> str:
    for old, new in _RESNET.items():
        if tail.startswith(old + "."):
            return new + tail[len(old):]
    raise KeyError(tail)


def unet_key(key: str, layers_per_block: int = 2) -> str:
    """An LDM UNet key (without `model.diffusion_model.`) -> its diffusers name."""
    n = layers_per_block + 1
    if m := re.fullmatch(r"time_embed\.([02])\.(.+)", key):
        return f"time_embedding.linear_{1 if m[1] == '0' else 2}.{m[2]}"
    if m := re.fullmatch(r"input_blocks\.0\.0\.(.+)", key):
        return f"conv_in.{m[1]}"
    if m := re.fullmatch(r"out\.([02])\.(.+)", key):
        return f"{'conv_norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", key):
        level, j = divmod(int(m[1]) - 1, n)
        if j == layers_per_block:
            if m[2] == "0" and m[3].startswith("op."):
                return f"down_blocks.{level}.downsamplers.0.conv.{m[3][3:]}"
            raise KeyError(key)
        if m[2] == "0":
            return f"down_blocks.{level}.resnets.{j}.{_resnet_tail(m[3])}"
        return f"down_blocks.{level}.attentions.{j}.{m[3]}"
    if m := re.fullmatch(r"middle_block\.([012])\.(.+)", key):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{_resnet_tail(m[2])}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", key):
        level, j = divmod(int(m[1]), n)
        if m[2] == "0":
            return f"up_blocks.{level}.resnets.{j}.{_resnet_tail(m[3])}"
        if m[3].startswith("conv."):            # the upsampler: slot 1 or 2 of the last layer
            return f"up_blocks.{level}.upsamplers.0.{m[3]}"
        return f"up_blocks.{level}.attentions.{j}.{m[3]}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> tuple[str, bool]:
    """An LDM VAE key (without `first_stage_model.`) -> (diffusers name, squeeze 1×1 conv)."""
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", key):
        return f"{m[1]}.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}", False
    if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(.+)", key):
        return key, False
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)", key):
        new = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
               "proj_out": "to_out.0"}[m[2]]
        return f"{m[1]}.mid_block.attentions.0.{new}.{m[3]}", m[2] != "norm"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}", False
    # LDM numbers decoder levels from the highest resolution; diffusers from the lowest.
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        level = levels - 1 - int(m[1])
        return f"decoder.up_blocks.{level}.resnets.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}", False
    raise KeyError(key)


def _vae_resnet(tail: str) -> str:
    return tail.replace("nin_shortcut", "conv_shortcut", 1)


def text_keys(key: str, value: np.ndarray, used_layers: int) -> list[tuple[str, np.ndarray]]:
    """An OpenCLIP text key (without `cond_stage_model.model.`) -> transformers names and
    tensors; [] for resblocks beyond `used_layers` (SD2 uses the penultimate layer)."""
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
    layer, tail = int(m[1]), m[2]
    if layer >= used_layers:
        return []
    base = f"{t}encoder.layers.{layer}."
    if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
        q, k, v = np.split(value, 3, axis=0)
        leaf = "weight" if tail.endswith("weight") else "bias"
        return [(f"{base}self_attn.{p}.{leaf}", x) for p, x in
                (("q_proj", q), ("k_proj", k), ("v_proj", v))]
    renames = {"attn.out_proj.": "self_attn.out_proj.", "ln_1.": "layer_norm1.",
               "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
    for old, new in renames.items():
        if tail.startswith(old):
            return [(base + new + tail[len(old):], value)]
    raise KeyError(key)


def split_single_file(state: dict, *, unet_layers_per_block: int = 2,
                      text_layers: int | None = None) -> dict[str, dict]:
    """Rename a single-file checkpoint into {'unet', 'vae', 'text_encoder'} state dicts.

    Raises KeyError listing every key that is neither renamed nor on the ignore list.
    `text_layers` = the number of OpenCLIP blocks the text encoder runs (SD2: all
    but the last); by default one less than the checkpoint holds.
    """
    ignore = [re.compile(p) for p in IGNORED_LDM_KEYS]
    vae_levels = 1 + max((int(m[1]) for k in state
                          if (m := re.match(r"first_stage_model\.encoder\.down\.(\d+)\.", k))),
                         default=-1)
    blocks = {int(m[1]) for k in state
              if (m := re.match(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.", k))}
    used = (len(blocks) - 1) if text_layers is None else text_layers
    out: dict[str, dict] = {"unet": {}, "vae": {}, "text_encoder": {}}
    unknown = []
    for key, value in state.items():
        if any(r.fullmatch(key) for r in ignore):
            continue
        try:
            if key.startswith(UNET_PREFIX):
                out["unet"][unet_key(key[len(UNET_PREFIX):], unet_layers_per_block)] = value
            elif key.startswith(VAE_PREFIX):
                name, squeeze = vae_key(key[len(VAE_PREFIX):], vae_levels)
                value = np.asarray(value)
                out["vae"][name] = value[:, :, 0, 0] if squeeze and value.ndim == 4 else value
            elif key.startswith(TEXT_PREFIX):
                out["text_encoder"].update(text_keys(key[len(TEXT_PREFIX):], np.asarray(value),
                                                     used))
            else:
                unknown.append(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        shown = "\n  ".join(unknown[:50])
        raise KeyError(f"{len(unknown)} tensors of the single-file checkpoint match no rule "
                       f"of the SD 2.x layout:\n  {shown}")
    return out
