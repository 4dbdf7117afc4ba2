"""Stable Diffusion 2 weights from a diffusers folder or an original single file.

    load_sd2("stable-diffusion-2-base/")          diffusers layout
    load_sd2("v2-1_512-ema-pruned.safetensors")   original LDM single file

Both give the same `SD2Weights`: (config, Flax params) for the UNet, VAE and text
encoder, the scheduler config and the tokenizer folder. Strict: every tensor used,
every parameter filled, every shape checked.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from jaxsr.convert.ldm import split_single_file
from jaxsr.convert.readers import read_state_dict
from jaxsr.models.clip_text import CLIPTextConfig, load_clip_text
from jaxsr.models.unet import UNetConfig, load_unet
from jaxsr.models.vae import VAEConfig, load_vae

# What the single file does not carry: SD2-base's scheduler (PNDM-format config;
# jaxsr reads the schedule fields from it).
SD2_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "prediction_type": "epsilon",
}

_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}

# diffusers' deprecated names of the VAE mid-block attention (older checkpoints).
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass
class SD2Weights:
    unet: tuple[UNetConfig, dict]
    vae: tuple[VAEConfig, dict]
    text_encoder: tuple[CLIPTextConfig, dict]
    scheduler_config: dict
    tokenizer_dir: Path | None
    sources: list[Path]


def load_sd2(path, *, unet_config: UNetConfig | None = None,
             vae_config: VAEConfig | None = None,
             text_config: CLIPTextConfig | None = None) -> SD2Weights:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return _load_diffusers_folder(path)
    state = read_state_dict(path)
    parts = split_single_file(state, unet_layers_per_block=_ldm_layers_per_block(state))
    unet_cfg = unet_config or infer_unet_config(parts["unet"])
    vae_cfg = vae_config or infer_vae_config(parts["vae"])
    text_cfg = text_config or infer_text_config(parts["text_encoder"])
    what = f"{path} ({{}})"
    return SD2Weights(
        unet=(unet_cfg, load_unet(parts["unet"], unet_cfg, what=what.format("UNet"))),
        vae=(vae_cfg, load_vae(parts["vae"], vae_cfg, what=what.format("VAE"))),
        text_encoder=(text_cfg, load_clip_text(parts["text_encoder"], text_cfg,
                                               what=what.format("text encoder"))),
        scheduler_config=dict(SD2_SCHEDULER_CONFIG), tokenizer_dir=None, sources=[path])


def find_weights(folder: Path, names: tuple[str, ...]) -> Path:
    """The weights file of a diffusers/transformers module folder (safetensors first)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing")
    stems = [n.rsplit(".", 1) for n in names]
    candidates = [folder / n for n in names]
    candidates += [folder / f"{s}.fp16.{ext}" for s, ext in stems]
    candidates += [folder / f"{n}.index.json" for n in names]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{folder} holds none of {', '.join(names)} (nor fp16/sharded "
                            "variants)")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _load_diffusers_folder(root: Path) -> SD2Weights:
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers pipeline folder: no model_index.json")
    sources = []

    def module(name):
        folder = root / name
        weights = find_weights(folder, _WEIGHT_FILES[name])
        sources.append(weights)
        return read_json(folder / "config.json"), read_state_dict(weights), weights

    d, state, f = module("unet")
    unet_cfg = UNetConfig.from_diffusers_config(d)
    unet = load_unet(state, unet_cfg, what=str(f))
    d, state, f = module("vae")
    vae_cfg = VAEConfig.from_diffusers_config(d)
    vae = load_vae(rename_legacy_vae(state), vae_cfg, what=str(f))
    d, state, f = module("text_encoder")
    text_cfg = CLIPTextConfig.from_hf_config(d)
    text = load_clip_text(state, text_cfg, what=str(f))
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    tokenizer = root / "tokenizer"
    return SD2Weights((unet_cfg, unet), (vae_cfg, vae), (text_cfg, text), scheduler,
                      tokenizer if tokenizer.is_dir() else None, sources)


def rename_legacy_vae(state: dict) -> dict:
    """Accept the deprecated query/key/value/proj_attn names of the VAE mid attention."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)"
                         r"\.(weight|bias)", key)
        if m:
            key = f"{m[1]}.{_LEGACY_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 4:
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def _ldm_layers_per_block(state: dict) -> int:
    blocks = {int(m[1]) for k in state
              if (m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", k))}
    downsamplers = {int(m[1]) for k in state
                    if (m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.", k))}
    if not blocks:
        raise ValueError("not an SD 2.x single-file checkpoint: no model.diffusion_model.* UNet")
    levels = len(downsamplers) + 1
    return len(blocks) // levels - 1


def infer_unet_config(state: dict) -> UNetConfig:
    """Architecture from a diffusers-named UNet state dict (SD2: 64-channel heads)."""
    levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k)))
    chans = tuple(int(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                  for i in range(levels))
    lpb = len({m[1] for k in state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in state)
            for i in range(levels)]
    first = next(i for i, a in enumerate(attn) if a)
    to_k = state[f"down_blocks.{first}.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    proj_in = state[f"down_blocks.{first}.attentions.0.proj_in.weight"]
    return UNetConfig(
        in_channels=int(state["conv_in.weight"].shape[1]),
        out_channels=int(state["conv_out.weight"].shape[0]),
        block_out_channels=chans, layers_per_block=lpb,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
        attention_head_dim=tuple(c // 64 for c in chans),
        cross_attention_dim=int(to_k.shape[1]), use_linear_projection=proj_in.ndim == 2,
    )


def infer_vae_config(state: dict) -> VAEConfig:
    levels = 1 + max(int(m[1]) for k in state
                     if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    chans = tuple(int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                  for i in range(levels))
    lpb = len({m[1] for k in state
               if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    return VAEConfig(in_channels=int(state["encoder.conv_in.weight"].shape[1]),
                     out_channels=int(state["decoder.conv_out.weight"].shape[0]),
                     latent_channels=int(state["post_quant_conv.weight"].shape[0]),
                     block_out_channels=chans, layers_per_block=lpb)


def infer_text_config(state: dict) -> CLIPTextConfig:
    tok = state["text_model.embeddings.token_embedding.weight"]
    layers = len({m[1] for k in state
                  if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    hidden = int(tok.shape[1])
    return CLIPTextConfig(
        vocab_size=int(tok.shape[0]), hidden_size=hidden,
        intermediate_size=int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        max_position_embeddings=int(
            state["text_model.embeddings.position_embedding.weight"].shape[0]))


def sd2_modules(weights: SD2Weights) -> dict[str, tuple[dict, dict]]:
    """The {name: (config dict, params)} form the converted-weights folder stores."""
    return {"unet": (weights.unet[0].to_diffusers_config(), weights.unet[1]),
            "vae": (weights.vae[0].to_diffusers_config(), weights.vae[1]),
            "text_encoder": (weights.text_encoder[0].to_hf_config(), weights.text_encoder[1])}


def load_sd2_converted(folder) -> SD2Weights:
    """An SD2 weights folder written by `jaxsr convert` (no torch, no renames)."""
    from jaxsr.convert.cache import load_converted, read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    mods = load_converted(folder, ("unet", "vae", "text_encoder"))
    tokenizer = folder / "tokenizer"
    return SD2Weights(
        unet=(UNetConfig.from_diffusers_config(mods["unet"][0]), mods["unet"][1]),
        vae=(VAEConfig.from_diffusers_config(mods["vae"][0]), mods["vae"][1]),
        text_encoder=(CLIPTextConfig.from_hf_config(mods["text_encoder"][0]),
                      mods["text_encoder"][1]),
        scheduler_config=manifest.get("scheduler_config", dict(SD2_SCHEDULER_CONFIG)),
        tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
        sources=[Path(s["path"]) for s in manifest["sources"]])
