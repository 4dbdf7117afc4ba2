"""Flax params -> a diffusers-layout folder that PyTorch tools load (`from_pretrained`).

    OUT/model_index.json                                  (with a UNet, VAE and text encoder)
    OUT/unet/{config.json, diffusion_pytorch_model.safetensors}
    OUT/vae/{config.json, diffusion_pytorch_model.safetensors}
    OUT/text_encoder/{config.json, model.safetensors}
    OUT/controlnet/..., OUT/tokenizer/..., OUT/scheduler/scheduler_config.json

Weights are written exactly as held (float32 params stay float32), so
load_sd2(export_diffusers(...)) gives back the same params bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxsr.convert.safetensors_io import write_safetensors
from jaxsr.convert.tree import flax_to_torch

_DIFFUSERS_VERSION = "0.42.1"    # the release the written configs were checked against


def _write_module(folder: Path, weights_name: str, params, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is what transformers' safetensors loader expects in the metadata.
    write_safetensors(folder / weights_name, flax_to_torch(params), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def export_diffusers(out_dir, *, unet=None, vae=None, text_encoder=None, controlnet=None,
                     tokenizer_dir=None, scheduler_config: dict | None = None) -> Path:
    """Write each given (config, params) pair in the diffusers/transformers layout.

    Args:
      unet / controlnet: (UNetConfig / ControlNet config, params) -> diffusers
        UNet2DConditionModel / ControlNetModel folders (configs' `to_diffusers_config`).
      vae: (VAEConfig, params) -> AutoencoderKL.
      text_encoder: (CLIPTextConfig, params) -> transformers CLIPTextModel
        (`to_hf_config`; keys with the `text_model.` prefix, as the released SD2 files).
      tokenizer_dir: a tokenizer folder to copy in.
      scheduler_config: written to scheduler/scheduler_config.json.
    With a UNet, VAE and text encoder, a `model_index.json` makes OUT a pipeline
    folder (`load_sd2` reads it back).
    Returns: the output folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _DIFFUSERS_VERSION}
    if unet is not None:
        _write_module(out / "unet", "diffusion_pytorch_model.safetensors", unet[1],
                      unet[0].to_diffusers_config())
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if controlnet is not None:
        _write_module(out / "controlnet", "diffusion_pytorch_model.safetensors", controlnet[1],
                      controlnet[0].to_diffusers_config())
    if vae is not None:
        _write_module(out / "vae", "diffusion_pytorch_model.safetensors", vae[1],
                      vae[0].to_diffusers_config())
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if text_encoder is not None:
        _write_module(out / "text_encoder", "model.safetensors", text_encoder[1],
                      text_encoder[0].to_hf_config())
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    if scheduler_config is not None:
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler_config, indent=2))
        index["scheduler"] = ["diffusers", scheduler_config.get("_class_name", "DDPMScheduler")]
    if {"unet", "vae", "text_encoder"} <= set(index):
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
