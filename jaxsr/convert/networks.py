"""One network's state dict in diffusers / transformers names -> its Flax params.

    load_unet, load_controlnet       diffusers UNet2DConditionModel / ControlNetModel
                                     (SeeSR's RCA tensors included)
    load_vae                         diffusers AutoencoderKL
    load_clip_text                   transformers CLIPTextModel (SD2's text encoder)
    load_coser_unet                  CoSeR's AiA UNet, jaxsr names
    load_coser_controlnet            CoSeR's ControlNet, jaxsr names

The jaxsr models mirror these names, so each loader is the generic rule of
`jaxsr.convert.tree` onto the model's `param_shapes`. Strict: every tensor used or on
a documented ignore list, every parameter filled, every shape checked, and one
`ConversionError` listing all offenders otherwise. Checkpoints in other layouts
(LDM single files, CoSeR's Lightning files) are renamed first by jaxsr.convert.ldm /
jaxsr.convert.coser_unet.
"""

from __future__ import annotations

import numpy as np

from jaxsr.convert.tree import torch_to_flax
from jaxsr.models import clip_text, controlnet, coser_controlnet, coser_unet, unet, vae
from jaxsr.models.clip_text import CLIPTextConfig
from jaxsr.models.controlnet import ControlNetConfig
from jaxsr.models.coser_controlnet import COSER_CONTROLNET, CoSeRControlNetConfig
from jaxsr.models.coser_unet import COSER_UNET, CoSeRUNetConfig
from jaxsr.models.unet import UNetConfig
from jaxsr.models.vae import VAEConfig


def load_unet(state, config: UNetConfig, *, what: str = "unet checkpoint"):
    """A diffusers-named UNet state dict (numpy) → Flax params. Strict."""
    return torch_to_flax(state, unet.param_shapes(config), what=what)


def load_controlnet(state, config: ControlNetConfig, *, what: str = "controlnet checkpoint"):
    """A diffusers-named ControlNet state dict (numpy) → Flax params. Strict."""
    return torch_to_flax(state, controlnet.param_shapes(config), what=what)


def load_vae(state, config: VAEConfig, *, what: str = "vae checkpoint"):
    """A diffusers-named AutoencoderKL state dict (numpy arrays) -> Flax params.

    Strict: raises `jaxsr.convert.tree.ConversionError` listing every missing,
    unexpected or misshaped key.
    """
    return torch_to_flax(state, vae.param_shapes(config), what=what)


TEXT_PREFIX = "text_model."

# Checkpoint tensors the SD text encoder never uses (regexes, full match):
IGNORED_TEXT_KEYS = (
    # arange(77) buffer; persistent in transformers < 4.31, so the released SD2
    # files carry it. The model recomputes it.
    r"(text_model\.)?embeddings\.position_ids",
    # CLIPTextModelWithProjection's / CLIPModel's projection to the joint space.
    r"text_projection\.weight",
    # CLIPModel's contrastive temperature.
    r"logit_scale",
)


def load_clip_text(state: dict[str, np.ndarray], config: CLIPTextConfig, *,
                   what: str = "text encoder checkpoint"):
    """transformers CLIPTextModel state dict -> Flax params {"text_model": ...}. Strict.

    Accepts both layouts found in the wild: keys with the `text_model.` prefix
    (the released SD2 files, transformers 4, CLIPTextModelWithProjection) and
    without it (what transformers 5 saves for CLIPTextModel). Errors name the
    keys as they appear in `state`.
    Raises: jaxsr.convert.tree.ConversionError on any missing, unknown or misshaped key.
    """
    shapes = clip_text.param_shapes(config)
    if any(k.startswith(TEXT_PREFIX) for k in state):
        return torch_to_flax(state, shapes, what=what, ignore=IGNORED_TEXT_KEYS)
    inner = torch_to_flax(state, shapes["text_model"], what=what, ignore=IGNORED_TEXT_KEYS)
    return {"text_model": inner}


def load_coser_unet(state, config: CoSeRUNetConfig = COSER_UNET, *,
                    what: str = "CoSeR AiA UNet"):
    """A diffusers-named AiA UNet state dict (numpy) → Flax params. Strict. (LDM-named
    CoSeR checkpoints: jaxsr.convert.coser_unet.)"""
    return torch_to_flax(state, coser_unet.param_shapes(config), what=what)


def load_coser_controlnet(state, config: CoSeRControlNetConfig = COSER_CONTROLNET, *,
                          what: str = "CoSeR ControlNet"):
    """A state dict in jaxsr's names (diffusers names for the SD part, see the
    jaxsr.models.coser_controlnet docstring for the rest) → Flax params. Strict.
    LDM-named checkpoints: jaxsr.convert.coser_unet."""
    return torch_to_flax(state, coser_controlnet.param_shapes(config), what=what)
