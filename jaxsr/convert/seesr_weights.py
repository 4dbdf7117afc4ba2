"""The SeeSR weights folder: SeeSR's UNet and ControlNet, SD2's VAE and text
encoder, DAPE (RAM + merged LoRA) and its tag files, under one manifest.

    convert_seesr(sd=..., seesr=..., ram=..., dape=..., output=...)   (`jaxsr convert`)
    load_seesr_folder(DIR) -> SeeSRWeights                            (pipelines)
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from jaxsr.convert.cache import load_converted, read_manifest, save_converted
from jaxsr.convert.ram import load_ram
from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.sd2 import load_sd2, sd2_modules
from jaxsr.convert.seesr import load_seesr
from jaxsr.models.clip_text import CLIPTextConfig
from jaxsr.models.controlnet import ControlNetConfig
from jaxsr.models.dape import DAPEConfig
from jaxsr.models.ram_head import TagHeadConfig
from jaxsr.models.swin import SwinConfig
from jaxsr.models.tags import TAG_LIST_FILE, THRESHOLD_FILE, load_tag_list, load_thresholds
from jaxsr.models.unet import UNetConfig
from jaxsr.models.vae import VAEConfig


def dape_config_to_dict(cfg: DAPEConfig) -> dict:
    return dataclasses.asdict(cfg)


def dape_config_from_dict(d: dict) -> DAPEConfig:
    tup = lambda x: {k: (tuple(v) if isinstance(v, list) else v) for k, v in x.items()}
    return DAPEConfig(swin=SwinConfig(**tup(d["swin"])), head=TagHeadConfig(**tup(d["head"])),
                      **{k: v for k, v in d.items() if k not in ("swin", "head")})


@dataclasses.dataclass
class SeeSRWeights:
    unet: tuple[UNetConfig, dict]
    controlnet: tuple[ControlNetConfig, dict]
    vae: tuple[VAEConfig, dict]
    text_encoder: tuple[CLIPTextConfig, dict]
    dape: tuple[DAPEConfig, dict]
    tags: list[str]
    thresholds: object            # np.ndarray [num_classes] float32
    scheduler_config: dict
    tokenizer_dir: Path | None

    def configs_only(self) -> SeeSRWeights:
        """The same description with the parameter trees dropped (None): what a
        pipeline keeps once the arrays live on its devices."""
        drop = lambda pair: (pair[0], None)
        return dataclasses.replace(
            self, unet=drop(self.unet), controlnet=drop(self.controlnet), vae=drop(self.vae),
            text_encoder=drop(self.text_encoder), dape=drop(self.dape))


def _tag_files(ram: Path, tags, thresholds) -> tuple[Path | None, Path | None]:
    """Explicit files, else the ones beside the RAM checkpoint, else None (packaged)."""
    found = []
    for given, name in ((tags, TAG_LIST_FILE), (thresholds, THRESHOLD_FILE)):
        if given is not None:
            if not Path(given).is_file():
                raise FileNotFoundError(f"{given} does not exist")
            found.append(Path(given))
        else:
            beside = ram.parent / name
            found.append(beside if beside.is_file() else None)
    return found[0], found[1]


def unet_with_sd_base(seesr_unet, sd_unet, seesr_cfg, sd_cfg):
    """SeeSR's sd-turbo mode (`from_pretrained_orig`): every UNet weight from the SD
    checkpoint except the RCA blocks (`image_attentions`), which come from SeeSR's.

    Both trees must agree on every shared parameter's shape; raises ValueError naming
    the first mismatches otherwise.
    """
    from flax import traverse_util

    if tuple(seesr_cfg.block_out_channels) != tuple(sd_cfg.block_out_channels):
        raise ValueError(f"--unet-from-sd: the SD UNet has widths {sd_cfg.block_out_channels}, "
                         f"SeeSR's {seesr_cfg.block_out_channels}")
    ours, base = traverse_util.flatten_dict(seesr_unet), traverse_util.flatten_dict(sd_unet)
    merged, bad = {}, []
    for key, value in ours.items():
        if any(part.startswith("image_attentions") for part in key):
            merged[key] = value
        elif key not in base or np.shape(base[key]) != np.shape(value):
            bad.append("/".join(key))
        else:
            merged[key] = base[key]
    extra = sorted("/".join(k) for k in base.keys() - ours.keys())
    if bad or extra:
        raise ValueError("--unet-from-sd: the SD UNet does not fit SeeSR's: "
                         + ", ".join((bad + extra)[:8]) + (" ..." if len(bad + extra) > 8
                                                           else ""))
    return traverse_util.unflatten_dict(merged)


def convert_seesr(*, sd, seesr, ram, dape, output, tags=None, thresholds=None,
                  dtype: str = "float32", unet_from_sd: bool = False, log=print) -> Path:
    """Convert every part SeeSR inference needs and write one weights folder.

    unet_from_sd: sd-turbo mode, see `unet_with_sd_base`.
    """
    sd2 = load_sd2(sd)
    unet_cfg, unet, cn_cfg, cn = load_seesr(seesr)
    if unet_from_sd:
        unet = unet_with_sd_base(unet, sd2.unet[1], unet_cfg, sd2.unet[0])
    ram, dape = Path(ram), (Path(dape) if dape is not None else None)
    dape_cfg, dape_params = load_ram(read_state_dict(ram), read_state_dict(dape)
                                     if dape is not None else None,
                                     what=str(ram), lora_what=str(dape))
    tag_file, threshold_file = _tag_files(ram, tags, thresholds)
    tag_list, threshold_values = load_tag_list(tag_file), load_thresholds(threshold_file)
    if not len(tag_list) == len(threshold_values) == dape_cfg.num_classes:
        raise ValueError(f"{dape_cfg.num_classes} RAM classes, but {len(tag_list)} tags and "
                         f"{len(threshold_values)} thresholds in the tag files")
    _check_compatible(unet_cfg, cn_cfg, sd2.text_encoder[0], dape_cfg)
    modules = sd2_modules(sd2)
    modules["unet"] = (unet_cfg.to_diffusers_config(), unet)
    modules["controlnet"] = (cn_cfg.to_diffusers_config(), cn)
    modules["dape"] = (dape_config_to_dict(dape_cfg), dape_params)
    seesr_files = sorted(f for m in ("unet", "controlnet")
                         for f in (Path(seesr) / m).iterdir() if f.is_file())
    sources = [*sd2.sources, *seesr_files, ram, *([dape] if dape is not None else [])]
    out = save_converted(output, modules, sources=sources, dtype=dtype,
                         tokenizer_dir=sd2.tokenizer_dir,
                         extra={"model": "seesr", "scheduler_config": sd2.scheduler_config,
                                "unet_from_sd": bool(unet_from_sd)})
    (out / "ram").mkdir(exist_ok=True)
    for src, name in ((tag_file, TAG_LIST_FILE), (threshold_file, THRESHOLD_FILE)):
        if src is not None:
            shutil.copyfile(src, out / "ram" / name)
        else:
            (out / "ram" / name).write_text(
                "\n".join(load_tag_list() if name == TAG_LIST_FILE
                          else (f"{t:g}" for t in load_thresholds())))
            log(f"  note: no {name} given or beside {ram}; using the copy shipped with jaxsr")
    if dape is None:
        log("  note: no --dape LoRA given: the tagger is plain RAM, not DAPE")
    return out


def _check_compatible(unet_cfg, cn_cfg, text_cfg, dape_cfg) -> None:
    """The parts come from four files: refuse combinations that cannot run together."""
    problems = []
    for name, cfg in (("UNet", unet_cfg), ("ControlNet", cn_cfg)):
        if cfg.cross_attention_dim != text_cfg.hidden_size:
            problems.append(f"the SeeSR {name} attends to {cfg.cross_attention_dim}-wide text "
                            f"features, the SD2 text encoder gives {text_cfg.hidden_size}")
        if cfg.image_cross_attention_dim != dape_cfg.embed_width:
            problems.append(f"the SeeSR {name}'s RCA reads {cfg.image_cross_attention_dim}-wide "
                            f"DAPE tokens, the RAM checkpoint gives {dape_cfg.embed_width}")
    if problems:
        raise ValueError("the checkpoints do not belong together: " + "; ".join(problems))


def load_seesr_folder(folder, *, leaf=None) -> SeeSRWeights:
    """A folder written by `jaxsr convert --seesr ...` (no torch, no renames).

    leaf: see `load_converted` (e.g. places each tensor on the devices as it is read).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("model") != "seesr":
        raise ValueError(f"{folder} holds {manifest.get('model', 'SD2')!r} weights, not SeeSR's; "
                         "convert with --seesr, --ram and --dape")
    m = load_converted(folder, leaf=leaf)
    tok = folder / "tokenizer"
    return SeeSRWeights(
        unet=(UNetConfig.from_diffusers_config(m["unet"][0]), m["unet"][1]),
        controlnet=(ControlNetConfig.from_diffusers_config(m["controlnet"][0]),
                    m["controlnet"][1]),
        vae=(VAEConfig.from_diffusers_config(m["vae"][0]), m["vae"][1]),
        text_encoder=(CLIPTextConfig.from_hf_config(m["text_encoder"][0]),
                      m["text_encoder"][1]),
        dape=(dape_config_from_dict(m["dape"][0]), m["dape"][1]),
        tags=load_tag_list(folder / "ram" / TAG_LIST_FILE),
        thresholds=load_thresholds(folder / "ram" / THRESHOLD_FILE),
        scheduler_config=manifest["scheduler_config"],
        tokenizer_dir=tok if tok.is_dir() else None)
