"""SeeSR's released UNet and ControlNet folders -> Flax params.

    seesr/unet/        config.json + diffusion_pytorch_model.{safetensors,bin}
    seesr/controlnet/  config.json + diffusion_pytorch_model.{safetensors,bin}

Both are diffusers-format saves of SeeSR's edited modules: stock diffusers names
plus `*.image_attentions.N.*` (RCA) tensors, announced in config.json by
`"use_image_cross_attention": true`. Strict: every tensor used, every parameter
filled, every shape checked.
"""

from __future__ import annotations

from pathlib import Path

from jaxsr.convert.networks import load_controlnet, load_unet
from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.sd2 import find_weights, read_json
from jaxsr.models.controlnet import ControlNetConfig
from jaxsr.models.unet import UNetConfig

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_RCA_MARK = ".image_attentions."
# Encoder fields the ControlNet residuals depend on: they must agree with the UNet's.
_SHARED_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types")


def load_seesr(seesr_dir) -> tuple[UNetConfig, dict, ControlNetConfig, dict]:
    """Read `seesr_dir/unet/` and `seesr_dir/controlnet/`.

    Returns:
      (unet config, unet params, controlnet config, controlnet params); params are
      nested dicts of float32 numpy arrays.
    Raises:
      FileNotFoundError naming a missing folder, config or weights file;
      CheckpointReadError for unreadable weights; ValueError when a config and its
      weights disagree about RCA, or the two configs' encoders differ;
      ConversionError listing every missing, unexpected or misshaped tensor.
    """
    root = Path(seesr_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (expected SeeSR's release folder "
                                "holding unet/ and controlnet/)")
    unet_cfg, unet_state, unet_file = _read_module(root / "unet",
                                                   UNetConfig.from_diffusers_config)
    cn_cfg, cn_state, cn_file = _read_module(root / "controlnet",
                                             ControlNetConfig.from_diffusers_config)
    # Checked before converting: a mismatch would otherwise surface as a long list of
    # misshaped tensors, or only later as residuals that cannot be added.
    differ = [f for f in _SHARED_FIELDS if getattr(unet_cfg, f) != getattr(cn_cfg, f)]
    if differ:
        raise ValueError(f"{root}: unet/config.json and controlnet/config.json disagree on "
                         f"{', '.join(differ)}; the ControlNet residuals would not fit the UNet")
    unet_params = load_unet(unet_state, unet_cfg, what=unet_file)
    cn_params = load_controlnet(cn_state, cn_cfg, what=cn_file)
    return unet_cfg, unet_params, cn_cfg, cn_params


def _read_module(folder: Path, from_config):
    """(config, state dict, weights file name) of one diffusers module folder."""
    weights = find_weights(folder, _WEIGHT_FILES)
    config_file = folder / "config.json"
    config = read_json(config_file)
    state = read_state_dict(weights)
    check_rca_flag(config, state, config_file, weights)
    return from_config(config), state, str(weights)


def check_rca_flag(config: dict, state, config_file, weights_file) -> None:
    """The config's `use_image_cross_attention` must match whether the weights carry
    RCA tensors; otherwise the strict converter would report hundreds of keys where
    the cause is one missing config line."""
    n_rca = sum(_RCA_MARK in k for k in state)
    flag = bool(config.get("use_image_cross_attention", False))
    if n_rca and not flag:
        raise ValueError(
            f"{config_file} does not set \"use_image_cross_attention\": true, but "
            f"{weights_file} holds {n_rca} SeeSR RCA tensors (*.image_attentions.*). "
            "Add that line to the config.")
    if flag and not n_rca:
        raise ValueError(
            f"{config_file} sets use_image_cross_attention, but {weights_file} holds no "
            "*.image_attentions.* tensors: these are not SeeSR weights (plain SD2 "
            "UNet/ControlNet?)")
