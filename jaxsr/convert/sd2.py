"""Stable Diffusion 2 weights from a diffusers folder or an original single file.

    load_sd2("stable-diffusion-2-base/")          diffusers layout
    load_sd2("v2-1_512-ema-pruned.safetensors")   original LDM single file (.ckpt too)

Both give the same `SD2Weights`: (config, Flax params) for the UNet, VAE and text
encoder, the scheduler config and the tokenizer folder. Strict: every tensor used
or on a documented ignore list, every parameter filled, every shape checked.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

from jaxsr.convert import ldm
from jaxsr.convert.networks import load_clip_text, load_unet, load_vae
from jaxsr.convert.readers import read_state_dict, stored_info
from jaxsr.models.clip_text import CLIPTextConfig
from jaxsr.models.unet import UNetConfig
from jaxsr.models.vae import VAEConfig

MODULES = ("unet", "vae", "text_encoder")

# What a single file does not carry: SD2-base's scheduler config. The 768-pixel
# v-models (SD 2.0-v / 2.1) have the same weights layout but need
# prediction_type "v_prediction": pass `scheduler_config` for those.
SD2_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "prediction_type": "epsilon",
}

# Weight file names per module folder, in order of preference.
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}

# diffusers' deprecated names of the VAE mid-block attention (older checkpoints).
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass
class SD2Weights:
    """Converted SD2 weights. Params are nested dicts of numpy arrays: float32 when
    converted from a checkpoint, the stored dtype when read from a converted folder.

    summary: {module: {"parameters": int, "source": file, "source_dtypes":
    {dtype name: tensor count}}}, what the checkpoint held before conversion.
    sources: every file the weights were read from (for the converted-weights manifest).
    """
    unet: tuple[UNetConfig, dict]
    vae: tuple[VAEConfig, dict]
    text_encoder: tuple[CLIPTextConfig, dict]
    scheduler_config: dict
    tokenizer_dir: Path | None
    summary: dict[str, dict]
    sources: list[Path]

    def describe(self) -> str:
        """One line per module: parameter count and the dtypes it was stored in."""
        lines = []
        for name in MODULES:
            s = self.summary[name]
            dtypes = ", ".join(f"{d} ×{n}" for d, n in sorted(s["source_dtypes"].items()))
            lines.append(f"{name:<13} {s['parameters']:>13,d} parameters  stored as {dtypes}")
        return "\n".join(lines)


def load_sd2(path, *, unet_config: UNetConfig | None = None,
             vae_config: VAEConfig | None = None, text_config: CLIPTextConfig | None = None,
             scheduler_config: dict | None = None) -> SD2Weights:
    """Load SD2 from a diffusers pipeline folder or an original single file.

    The configs default to the folder's config.json files, or for a single file to
    what its tensor shapes say (SD2 conventions for the rest: 64-channel heads,
    32 norm groups); pass them to override (e.g. tiny test models).
    Raises FileNotFoundError naming a missing file/folder, CheckpointReadError for
    unreadable files, and ConversionError listing every missing, unexpected (incl.
    single-file keys outside the SD2 layout) or misshaped tensor.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    overrides = {"unet": unet_config, "vae": vae_config, "text_encoder": text_config}
    if path.is_dir():
        return _load_diffusers_folder(path, overrides, scheduler_config)
    return _load_single_file(path, overrides, scheduler_config)


def _convert(states: dict, configs: dict, what: dict) -> dict:
    loaders = {"unet": load_unet, "vae": load_vae, "text_encoder": load_clip_text}
    return {name: (configs[name], loaders[name](states[name], configs[name], what=what[name]))
            for name in MODULES}


def _summary(states: dict, params: dict, what: dict) -> dict:
    out = {}
    for name in MODULES:
        leaves = _leaves(params[name][1])
        out[name] = {"parameters": int(sum(a.size for a in leaves)), "source": what[name],
                     "source_dtypes": dict(Counter(str(stored_info(states[name], k)[0])
                                                   for k in states[name]))}
    return out


def _leaves(tree) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    return [tree]


def _load_single_file(path: Path, overrides: dict, scheduler_config) -> SD2Weights:
    state = read_state_dict(path)
    text_layers = overrides["text_encoder"].num_hidden_layers if overrides["text_encoder"] \
        else None
    try:
        lpb = (overrides["unet"].layers_per_block if overrides["unet"]
               else ldm.unet_layers_per_block(state))
        states = ldm.split_single_file(state, unet_layers_per_block=lpb,
                                       text_layers=text_layers, what=str(path))
    except ldm.NotSingleFileError as e:
        raise ValueError(f"{path}: {e}") from None
    infer = {"unet": ldm.infer_unet_config, "vae": ldm.infer_vae_config,
             "text_encoder": ldm.infer_text_config}
    configs = {n: overrides[n] or infer[n](states[n]) for n in MODULES}
    what = {"unet": f"{path} (UNet, model.diffusion_model.*)",
            "vae": f"{path} (VAE, first_stage_model.*)",
            "text_encoder": f"{path} (text encoder, cond_stage_model.model.*)"}
    params = _convert(states, configs, what)
    return SD2Weights(*(params[n] for n in MODULES),
                      scheduler_config=dict(scheduler_config or SD2_SCHEDULER_CONFIG),
                      tokenizer_dir=None, summary=_summary(states, params, what), sources=[path])


def find_weights(folder: Path, names: tuple[str, ...]) -> Path:
    """The weights file of a diffusers/transformers module folder: full precision
    first, then the `.fp16.` variants, then sharded indexes of either."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing")
    stems = [n.rsplit(".", 1) for n in names]
    candidates = [folder / n for n in names]
    candidates += [folder / f"{s}.fp16.{ext}" for s, ext in stems]
    candidates += [folder / f"{n}.index.json" for n in names]
    candidates += [folder / f"{s}.fp16.{ext}.index.json" for s, ext in stems]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{folder} holds none of {', '.join(names)} (nor their .fp16. or "
                            "sharded variants)")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _load_diffusers_folder(root: Path, overrides: dict, scheduler_config) -> SD2Weights:
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers pipeline folder: no model_index.json "
                                "(for a single-file checkpoint pass the file itself)")
    from_config = {"unet": UNetConfig.from_diffusers_config,
                   "vae": VAEConfig.from_diffusers_config,
                   "text_encoder": CLIPTextConfig.from_hf_config}
    states, configs, what, sources = {}, {}, {}, []
    for name in MODULES:
        weights = find_weights(root / name, _WEIGHT_FILES[name])
        config_file = root / name / "config.json"
        config = read_json(config_file)
        configs[name] = overrides[name] or from_config[name](config)
        state = read_state_dict(weights)
        states[name] = rename_legacy_vae(state) if name == "vae" else state
        what[name] = str(weights)
        sources += [weights, config_file]
        if weights.name.endswith(".index.json"):
            sources += sorted({weights.parent / s for s in
                               json.loads(weights.read_text())["weight_map"].values()})
    if scheduler_config is None:
        scheduler_file = root / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(scheduler_file)
        sources.append(scheduler_file)
    params = _convert(states, configs, what)
    tokenizer = root / "tokenizer"
    return SD2Weights(*(params[n] for n in MODULES), scheduler_config=scheduler_config,
                      tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
                      summary=_summary(states, params, what), sources=sources)


def rename_legacy_vae(state: dict) -> dict:
    """Accept diffusers' deprecated query/key/value/proj_attn names of the VAE mid-block
    attention (older diffusers folders); some of those files even kept LDM's 1×1 conv
    shape [C, C, 1, 1], which is squeezed to the Linear [C, C]."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)"
                         r"\.(weight|bias)", key)
        if m:
            key = f"{m[1]}.{_LEGACY_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        if key in out:
            raise ValueError(f"VAE checkpoint holds both the legacy and the current name of {key}")
        out[key] = value
    return out


def sd2_modules(weights: SD2Weights) -> dict[str, tuple[dict, dict]]:
    """The {name: (config dict, params)} form the converted-weights folder stores."""
    return {"unet": (weights.unet[0].to_diffusers_config(), weights.unet[1]),
            "vae": (weights.vae[0].to_diffusers_config(), weights.vae[1]),
            "text_encoder": (weights.text_encoder[0].to_hf_config(), weights.text_encoder[1])}


def load_sd2_converted(folder, *, check_sources: str = "warn") -> SD2Weights:
    """An SD2 weights folder written by `save_converted` / `jaxsr convert`: only file
    reads (no torch, no renames). `check_sources` as in `load_converted`."""
    from jaxsr.convert.cache import load_converted, read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    mods = load_converted(folder, MODULES, check_sources=check_sources)
    tokenizer = folder / "tokenizer"
    summary = {n: {"parameters": manifest["modules"][n]["parameters"], "source": str(folder),
                   "source_dtypes": {manifest["dtype"]: len(_leaves(mods[n][1]))}}
               for n in MODULES}
    return SD2Weights(
        unet=(UNetConfig.from_diffusers_config(mods["unet"][0]), mods["unet"][1]),
        vae=(VAEConfig.from_diffusers_config(mods["vae"][0]), mods["vae"][1]),
        text_encoder=(CLIPTextConfig.from_hf_config(mods["text_encoder"][0]),
                      mods["text_encoder"][1]),
        scheduler_config=manifest.get("scheduler_config", dict(SD2_SCHEDULER_CONFIG)),
        tokenizer_dir=tokenizer if tokenizer.is_dir() else None, summary=summary,
        sources=[Path(s["path"]) for s in manifest["sources"]])
