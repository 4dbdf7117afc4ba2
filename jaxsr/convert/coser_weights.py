"""The CoSeR weights folder: the AiA UNet, CoSeR's ControlNet, the cognitive encoder, SD's
VAE and text encoder and (optionally) StableSR's CFW decoder, under one manifest.

    convert_coser(coser=CKPT, qformer=CKPT, sd=SD21, cfw=None, open_clip=None, output=DIR)
    load_coser_folder(DIR) -> CoSeRWeights                               (pipelines)

Which file each network comes from follows the reference's load order (CoSeR's
scripts/inference.py, docs/coser_reference.md §1): open_clip's own weights (the
vision tower), then SD 2.1-base (single file: UNet, VAE, text tower), then the stage-1
Q-Former checkpoint (`cond_stage_model.model.*`, `pre_sr_model.*`, `global_adapter.*`),
then the CoSeR checkpoint (everything). A later file replaces an earlier one:

    part            checkpoint prefix                  jaxsr module
    unet            model.diffusion_model.             unet         (AiA UNet)
    controlnet      structcond_stage_model.            controlnet
    vae             first_stage_model.                 vae
    text_encoder    cond_stage_model.model. (text)     text_encoder
    visual          cond_stage_model.model.visual.     cognitive/visual
    pre_sr_model    pre_sr_model.                      cognitive/pre_sr_model
    global_adapter  global_adapter.                    cognitive/global_adapter

Strict, per part: the last file holding any key of a part must hold all of it (the
reference's `strict=False` would quietly keep an earlier file's tensor; a half-saved
part is refused here instead), every key is used or on the documented ignore list,
every shape is checked. One `ConversionError` names every offending key and its file.
Keys of a part that a later file replaces are read but not converted (and reported
in the conversion summary).

A diffusers-layout SD folder is accepted for --sd too: its VAE and text encoder take
the places of the single file's (then also its tokenizer/ is copied).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxsr.convert import coser_cognitive, coser_unet, ldm
from jaxsr.convert.cache import load_converted, read_manifest, save_converted
from jaxsr.convert.cfw import checkpoint_name as vae_checkpoint_name
from jaxsr.convert.cfw import load_cfw
from jaxsr.convert.networks import load_clip_text, load_vae
from jaxsr.convert.readers import KeyView, read_state_dict
from jaxsr.convert.tree import ConversionError
from jaxsr.models.cfw_vae import CFWConfig
from jaxsr.models.clip_text import SD2_TEXT_ENCODER, CLIPTextConfig
from jaxsr.models.clip_vision import CLIPVisionConfig
from jaxsr.models.cognitive import COSER_COGNITIVE, CognitiveConfig
from jaxsr.models.coser_controlnet import COSER_CONTROLNET, CoSeRControlNetConfig
from jaxsr.models.coser_unet import COSER_UNET, CoSeRUNetConfig
from jaxsr.models.qformer import QFormerConfig
from jaxsr.models.srresnet import SRResNetConfig
from jaxsr.models.unet import UNetConfig
from jaxsr.models.vae import SD2_VAE, VAEConfig

MODEL = "coser"

# (part, prefix), longest prefix first: the visual tower sits inside the OpenCLIP prefix.
PARTS = (
    ("visual", coser_cognitive.VISUAL_PREFIX),
    ("text_encoder", ldm.TEXT_PREFIX),
    ("unet", coser_unet.UNET_PREFIX),
    ("controlnet", coser_unet.CONTROLNET_PREFIX),
    ("vae", ldm.VAE_PREFIX),
    ("pre_sr_model", coser_cognitive.PRE_SR_PREFIX),
    ("global_adapter", coser_cognitive.QFORMER_PREFIX),
)
PART_NAMES = tuple(p for p, _ in PARTS)

# Full-match regexes of keys no jaxsr network uses, beyond the SD single-file ones
# (`ldm.IGNORED_LDM_KEYS`: the DDPM schedule buffers, CLIP's text_projection and
# logit_scale) and the OpenCLIP text tower's last block (SD conditions on the
# penultimate one: `ldm.last_text_block_pattern`):
IGNORED_COSER_KEYS = (
    # BERT's position_ids buffer of the Q-Former (query-only forward: never read).
    re.escape(coser_cognitive.QFORMER_PREFIX) + r"Qformer\.embeddings\.position_ids",
)


# --- architecture ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CoSeRArchitecture:
    """The module configs of one CoSeR model (what tensor shapes cannot tell, too)."""

    unet: CoSeRUNetConfig = COSER_UNET
    controlnet: CoSeRControlNetConfig = COSER_CONTROLNET
    vae: VAEConfig = SD2_VAE
    text_encoder: CLIPTextConfig = SD2_TEXT_ENCODER
    cognitive: CognitiveConfig = COSER_COGNITIVE

    def __post_init__(self):
        width = self.unet.base.cross_attention_dim
        problems = []
        if self.controlnet.base != self.unet.base:
            problems.append("the ControlNet's base UNet config differs from the AiA UNet's")
        if self.text_encoder.hidden_size != width:
            problems.append(f"the text encoder is {self.text_encoder.hidden_size} wide, the "
                            f"UNet attends to {width}-wide context")
        if self.cognitive.qformer.hidden_size != width:
            problems.append(f"the Q-Former's E is {self.cognitive.qformer.hidden_size} wide, "
                            f"the UNet attends to {width}-wide context")
        if problems:
            raise ValueError("inconsistent CoSeR architecture: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config) -> CoSeRArchitecture:
        """configs/coser.py's ConfigDict -> the module configs."""
        base = UNetConfig.from_diffusers_config(dict(config.unet))
        cog = config.cognitive
        return cls(
            unet=CoSeRUNetConfig(base=base, reference_attention=config.reference_attention),
            controlnet=CoSeRControlNetConfig(
                base=base, attention_levels=tuple(config.controlnet.attention_levels)),
            vae=VAEConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                             for k, v in dict(config.vae).items()}),
            text_encoder=CLIPTextConfig(**dict(config.text_encoder)),
            cognitive=CognitiveConfig(srresnet=SRResNetConfig(**dict(cog.srresnet)),
                                      vision=CLIPVisionConfig(**dict(cog.vision)),
                                      qformer=QFormerConfig(**dict(cog.qformer))))

    def module_configs(self) -> dict[str, dict]:
        """JSON-able config of every module, as the manifest stores them."""
        return {
            "unet": {"base": self.unet.base.to_diffusers_config(),
                     "reference_attention": self.unet.reference_attention},
            "controlnet": {"base": self.controlnet.base.to_diffusers_config(),
                           "attention_levels": list(self.controlnet.attention_levels)},
            "vae": self.vae.to_diffusers_config(),
            "text_encoder": self.text_encoder.to_hf_config(),
            "cognitive": dataclasses.asdict(self.cognitive),
        }

    @classmethod
    def from_module_configs(cls, d: Mapping[str, Any]) -> CoSeRArchitecture:
        """Inverse of `module_configs`."""
        tup = lambda x: {k: (tuple(v) if isinstance(v, list) else v) for k, v in x.items()}
        cog = d["cognitive"]
        return cls(
            unet=CoSeRUNetConfig(base=UNetConfig.from_diffusers_config(d["unet"]["base"]),
                                 reference_attention=d["unet"]["reference_attention"]),
            controlnet=CoSeRControlNetConfig(
                base=UNetConfig.from_diffusers_config(d["controlnet"]["base"]),
                attention_levels=tuple(d["controlnet"]["attention_levels"])),
            vae=VAEConfig.from_diffusers_config(d["vae"]),
            text_encoder=CLIPTextConfig.from_hf_config(d["text_encoder"]),
            cognitive=CognitiveConfig(srresnet=SRResNetConfig(**tup(cog["srresnet"])),
                                      vision=CLIPVisionConfig(**tup(cog["vision"])),
                                      qformer=QFormerConfig(**tup(cog["qformer"]))))


RELEASED = CoSeRArchitecture()


# --- sorting a checkpoint's keys into parts ----------------------------------------------------

def part_of(key: str) -> str | None:
    """The part a (prefixed) checkpoint key belongs to, or None."""
    for part, prefix in PARTS:
        if key.startswith(prefix):
            return part
    return None


def ignore_patterns(text_layers: int) -> list[re.Pattern]:
    return [re.compile(p) for p in (*ldm.IGNORED_LDM_KEYS, *IGNORED_COSER_KEYS,
                                    ldm.last_text_block_pattern(text_layers))]


@dataclasses.dataclass
class Source:
    """One input file: its parts' keys (checkpoint names) and keys it holds outside
    every part. `converted`: parts given already converted (diffusers-layout SD)."""

    label: str                                   # "--coser FILE" etc., for messages
    parts: dict[str, Mapping[str, np.ndarray]]    # part -> lazy {LDM name: tensor}
    unexpected: list[str]
    converted: dict[str, tuple[Any, dict]] = dataclasses.field(default_factory=dict)

    def holds(self, part: str) -> bool:
        return part in self.converted or bool(self.parts.get(part))


def split_source(state: Mapping[str, np.ndarray], label: str, text_layers: int, *,
                 rename: Callable[[str], str] = lambda k: k) -> Source:
    """Sort a flat state dict into parts; `rename` maps the file's keys to the
    LDM-prefixed names first (open_clip's own file names its towers without prefix)."""
    ignore = ignore_patterns(text_layers)
    names: dict[str, dict[str, str]] = {}
    unexpected = []
    for key in state:
        name = rename(key)
        if any(r.fullmatch(name) for r in ignore):
            continue
        part = part_of(name)
        if part is None:
            unexpected.append(key)
        else:
            names.setdefault(part, {})[name] = key
    # Views, not copies: a part's tensors are read only when that part is converted
    # (and only from the file that owns it), one part at a time.
    return Source(label, {part: KeyView(state, keys) for part, keys in names.items()},
                  unexpected)


def open_clip_source(path, text_layers: int) -> Source:
    """open_clip's `open_clip_pytorch_model.bin`: `visual.*` and the text tower, no prefix."""
    state = read_state_dict(path)
    return split_source(state, f"--open-clip {path}", text_layers,
                        rename=lambda k: ldm.TEXT_PREFIX + k)


# --- converting one part ------------------------------------------------------------------------

def _convert_vae(state: dict, config: VAEConfig, what: str):
    """`first_stage_model.*` (LDM names) -> AutoencoderKL params; errors in LDM names."""
    levels = len(config.block_out_channels)
    renamed, origin, unknown = {}, {}, []
    for key, value in state.items():
        try:
            name, squeeze = ldm.vae_key(key[len(ldm.VAE_PREFIX):], levels)
        except KeyError:
            unknown.append(key)
            continue
        if squeeze and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        renamed[name], origin[name] = value, key
    try:
        params = load_vae(renamed, config, what=what)
    except ConversionError as e:
        mismatched = [f"{origin[n]}: {rest}" for n, rest in
                      (line.split(": ", 1) for line in e.mismatched)]
        bent = {origin[line.split(": ", 1)[0]] for line in e.mismatched}
        missing = [m for m in (ldm.VAE_PREFIX + vae_checkpoint_name(n, levels)
                               for n in e.missing) if m not in bent]
        raise ConversionError(what, missing, unknown + [origin[n] for n in e.unexpected],
                              mismatched) from None
    if unknown:
        raise ConversionError(what, unexpected=unknown)
    return params


def _convert_text(state: dict, config: CLIPTextConfig, what: str):
    """OpenCLIP text tower (`cond_stage_model.model.*`) -> CLIPTextModel params. Keys
    outside the layout are named as in the file; missing ones by transformers name."""
    renamed, unknown = {}, []
    for key, value in state.items():
        try:
            for name, part in ldm.text_keys(key[len(ldm.TEXT_PREFIX):], np.asarray(value)):
                renamed[name] = part
        except KeyError:
            unknown.append(key)
    try:
        params = load_clip_text(renamed, config, what=what + " (transformers names)")
    except ConversionError as e:
        raise ConversionError(e.what, e.missing, unknown + list(e.unexpected),
                              e.mismatched) from None
    if unknown:
        raise ConversionError(what, unexpected=unknown)
    return params


def convert_part(part: str, state: dict, arch: CoSeRArchitecture, what: str):
    """One part's keys (checkpoint names, prefixed) -> its Flax params. Strict."""
    cog = arch.cognitive
    if part == "unet":
        return coser_unet.convert_aia_unet(state, arch.unet, what=what)
    if part == "controlnet":
        return coser_unet.convert_controlnet(state, arch.controlnet, what=what)
    if part == "vae":
        return _convert_vae(state, arch.vae, what)
    if part == "text_encoder":
        return _convert_text(state, arch.text_encoder, what)
    if part == "visual":
        return coser_cognitive.load_clip_vision(state, cog.vision, what=what)
    if part == "pre_sr_model":
        return coser_cognitive.load_srresnet(state, cog.srresnet, what=what)
    if part == "global_adapter":
        return coser_cognitive.load_qformer(state, cog.qformer, what=what)
    raise KeyError(part)


# --- the whole model ----------------------------------------------------------------------------

@dataclasses.dataclass
class MergedCoSeR:
    """Converted params of every network and where each part came from."""

    architecture: CoSeRArchitecture
    params: dict[str, dict]            # unet, controlnet, vae, text_encoder, cognitive
    owners: dict[str, str]             # part -> source label
    replaced: dict[str, list[str]]     # part -> labels of earlier files it overrode


def merge_sources(sources: list[Source], arch: CoSeRArchitecture = RELEASED) -> MergedCoSeR:
    """Convert every part from the last of `sources` (load order) that holds it.

    Raises one ConversionError listing, by file, every key outside all parts and
    every missing, unexpected or misshaped key of the parts taken; a part no file
    holds is reported as missing (with the files that were searched)."""
    errors: list[ConversionError] = []
    for src in sources:
        if src.unexpected:
            errors.append(ConversionError(f"{src.label} (keys of no CoSeR part: not one of "
                                          + ", ".join(p for _, p in PARTS) + ")",
                                          unexpected=src.unexpected))
    params, owners, replaced = {}, {}, {}
    for part, prefix in PARTS:
        holders = [s for s in sources if s.holds(part)]
        if not holders:
            errors.append(ConversionError(
                f"no {prefix}* tensors ({part}) in any of: "
                + ", ".join(s.label for s in sources), missing=[prefix + "*"]))
            continue
        owner = holders[-1]
        owners[part], replaced[part] = owner.label, [s.label for s in holders[:-1]]
        if part in owner.converted:
            params[part] = owner.converted[part][1]
            continue
        try:
            params[part] = convert_part(part, owner.parts[part], arch,
                                        f"{owner.label} ({part}, {prefix}*)")
        except ConversionError as e:
            errors.append(e)
        except ValueError as e:                    # e.g. a text tensor that cannot split
            errors.append(ConversionError(f"{owner.label} ({part}): {e}"))
    if errors:
        raise ConversionError(
            "CoSeR checkpoints", [k for e in errors for k in _labelled(e, "missing")],
            [k for e in errors for k in _labelled(e, "unexpected")],
            [k for e in errors for k in _labelled(e, "mismatched")]) if len(errors) > 1 \
            else errors[0]
    cognitive = {"pre_sr_model": params.pop("pre_sr_model"), "visual": params.pop("visual"),
                 "global_adapter": params.pop("global_adapter")}
    return MergedCoSeR(arch, {**params, "cognitive": cognitive}, owners, replaced)


def _labelled(error: ConversionError, field: str) -> list[str]:
    """A sub-error's keys, each followed by the file/part it concerns."""
    where = error.what
    return [f"{k}  [{where}]" for k in getattr(error, field)]


def coser_sources(*, coser, qformer, sd, open_clip=None,
                  arch: CoSeRArchitecture = RELEASED) -> tuple[list[Source], list[Path],
                                                                Path | None, dict | None]:
    """Read the files in the reference's load order -> (sources, files read, tokenizer
    folder or None, SD scheduler config or None)."""
    from jaxsr.convert.sd2 import load_sd2

    layers = arch.text_encoder.num_hidden_layers
    sources, files, tokenizer, scheduler = [], [], None, None
    if open_clip is not None:
        sources.append(open_clip_source(open_clip, layers))
        files.append(Path(open_clip))
    sd = Path(sd)
    if not sd.exists():
        raise FileNotFoundError(f"--sd {sd} does not exist")
    if sd.is_dir():
        weights = load_sd2(sd, vae_config=arch.vae, text_config=arch.text_encoder)
        src = Source(f"--sd {sd}", {}, [])
        src.converted = {"vae": weights.vae, "text_encoder": weights.text_encoder}
        sources.append(src)
        files += weights.sources
        tokenizer, scheduler = weights.tokenizer_dir, weights.scheduler_config
    else:
        sources.append(split_source(read_state_dict(sd), f"--sd {sd}", layers))
        files.append(sd)
    for flag, path in (("--qformer", qformer), ("--coser", coser)):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist")
        sources.append(split_source(read_state_dict(path), f"{flag} {path}", layers))
        files.append(path)
    return sources, files, tokenizer, scheduler


def convert_coser(*, coser, qformer, sd, output, cfw=None, open_clip=None, tokenizer=None,
                  arch: CoSeRArchitecture = RELEASED, dtype: str = "float32",
                  log=print) -> Path:
    """Convert every network CoSeR inference needs and write one weights folder.

    tokenizer: a CLIP tokenizer folder (vocab.json, merges.txt), e.g. SD 2.1-base's
    tokenizer/; taken from --sd when that is a diffusers folder. Without one the
    folder converts, but `jaxsr sr` needs it.
    """
    from jaxsr.convert.sd2 import SD2_SCHEDULER_CONFIG

    sources, files, sd_tokenizer, scheduler = coser_sources(
        coser=coser, qformer=qformer, sd=sd, open_clip=open_clip, arch=arch)
    merged = merge_sources(sources, arch)
    configs = arch.module_configs()
    modules = {name: (configs[name], merged.params[name])
               for name in ("unet", "controlnet", "vae", "text_encoder", "cognitive")}
    if cfw is not None:
        weights = load_cfw(cfw, arch.vae, what=f"--cfw {cfw}")
        modules["cfw"] = ({"vae": weights.config.to_diffusers_config(),
                           "cfw": dataclasses.asdict(weights.cfw)}, weights.params)
        files.append(Path(cfw))
    tokenizer = Path(tokenizer) if tokenizer is not None else sd_tokenizer
    if tokenizer is not None and not tokenizer.is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer} is not a folder")
    out = save_converted(output, modules, sources=files, dtype=dtype, tokenizer_dir=tokenizer,
                         extra={"model": MODEL,
                                "scheduler_config": dict(scheduler or SD2_SCHEDULER_CONFIG),
                                "part_sources": merged.owners})
    for part in PART_NAMES:
        if merged.replaced.get(part):
            log(f"  {part:<14} from {merged.owners[part]} (replaces "
                f"{', '.join(merged.replaced[part])})")
    if tokenizer is None:
        log("  note: no tokenizer folder (pass --tokenizer, e.g. SD 2.1-base's tokenizer/); "
            "`jaxsr sr` needs one")
    return out


# --- reading a converted folder -----------------------------------------------------------------

@dataclasses.dataclass
class CoSeRWeights:
    architecture: CoSeRArchitecture
    params: dict[str, dict]           # unet, controlnet, vae, text_encoder, cognitive[, cfw]
    cfw: CFWConfig | None
    scheduler_config: dict
    tokenizer_dir: Path | None


def load_coser_folder(folder, *, check_sources: str = "warn", leaf=None) -> CoSeRWeights:
    """A folder written by `jaxsr convert --coser ...` (no torch, no renames).

    leaf: see `load_converted` (e.g. places each tensor on the devices as it is read).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("model") != MODEL:
        raise ValueError(f"{folder} holds {manifest.get('model', 'SD2')!r} weights, not "
                         "CoSeR's; convert with --coser, --qformer and --sd")
    modules = load_converted(folder, check_sources=check_sources, leaf=leaf)
    configs = {name: cfg for name, (cfg, _) in modules.items()}
    arch = CoSeRArchitecture.from_module_configs(configs)
    cfw = None
    if "cfw" in modules:
        c = configs["cfw"]
        if VAEConfig.from_diffusers_config(c["vae"]) != arch.vae:
            raise ValueError(f"{folder}: the CFW autoencoder's VAE config differs from the VAE's")
        cfw = CFWConfig(**c["cfw"])
    tok = folder / "tokenizer"
    return CoSeRWeights(arch, {name: p for name, (_, p) in modules.items()}, cfw,
                        manifest["scheduler_config"], tok if tok.is_dir() else None)
