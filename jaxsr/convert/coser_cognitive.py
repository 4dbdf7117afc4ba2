"""CoSeR checkpoint -> cognitive-encoder Flax params (MSRResNet, CLIP vision, Q-Former). Strict.

    params = load_cognitive(state)                          # CoSeR or stage-1 checkpoint
    params = load_cognitive(state, visual_state=open_clip)  # vision tower from open_clip
    E = CognitiveEncoder(config).apply({"params": params}, lr)

`state` is a flat {torch key: numpy array} dict, e.g. `read_state_dict(ckpt)` (which
unwraps Lightning's "state_dict"). Which keys are read is decided by exact prefixes:

    pre_sr_model.                    -> params["pre_sr_model"]    (MSRResNet)
    cond_stage_model.model.visual.   -> params["visual"]          (OpenCLIP ViT-H/14)
    global_adapter.                  -> params["global_adapter"]  (Q-Former)

Every key under these prefixes must fill a param of the right shape and every param
must be filled, else one `ConversionError` names each offending key in full. Keys
outside the three prefixes are not looked at: the rest of `cond_stage_model.model.`
is the OpenCLIP text tower (`jaxsr.models.clip_text`'s business), and the UNet,
ControlNet, VAE and schedule buffers belong to their own converters. A converter
of the whole checkpoint can use `COGNITIVE_PREFIXES` to account for these keys.

The one checkpoint entry under these prefixes that is skipped (`IGNORED_QFORMER_KEYS`)
is BERT's `position_ids` buffer, an arange the query-only forward never uses. The
other unused tensors (ln_post, the Q-Former's word/position embeddings and text FFNs)
are real Flax params (see the model modules), so they are converted, not skipped.

open_clip's own checkpoint (open_clip_pytorch_model.bin for laion2b_s32b_b79k) names
the vision tower `visual.*`: pass it as `visual_state` (the reference loads it first
and lets the CoSeR checkpoint override it), or call `load_clip_vision(state,
prefix=OPEN_CLIP_VISUAL_PREFIX)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from jaxsr.convert.tree import ConversionError, torch_to_flax
from jaxsr.models import clip_vision, qformer, srresnet
from jaxsr.models.cognitive import COSER_COGNITIVE, CognitiveConfig

PRE_SR_PREFIX = "pre_sr_model."
VISUAL_PREFIX = "cond_stage_model.model.visual."
QFORMER_PREFIX = "global_adapter."
OPEN_CLIP_VISUAL_PREFIX = "visual."
COGNITIVE_PREFIXES = (PRE_SR_PREFIX, VISUAL_PREFIX, QFORMER_PREFIX)

# Key tails (after the Q-Former prefix) that are skipped, full match:
IGNORED_QFORMER_KEYS = (
    # LAVIS BertEmbeddings registers arange(max_position_embeddings) as a persistent
    # buffer; it only indexes position_embeddings for text input, which CoSeR never has.
    r"Qformer\.embeddings\.position_ids",
)


def _convert_part(state: Mapping[str, np.ndarray], prefix: str, shapes, what: str,
                  ignore_tails=()):
    """Strictly fill `shapes` from the keys of `state` that start with `prefix`.

    The target tree is nested under the prefix's segments, so that the generic rule
    sees (and error messages name) the checkpoint's full keys.
    """
    part = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        what = f"{what} (no '{prefix}*' keys at all: wrong checkpoint or prefix?)"
    segments = [s for s in prefix.split(".") if s]
    if any(s.isdigit() for s in segments):
        raise ValueError(f"prefix {prefix!r} has a numeric segment; give the module's path")
    target = shapes
    for seg in reversed(segments):
        target = {seg: target}
    ignore = [re.escape(prefix) + tail for tail in ignore_tails]
    out = torch_to_flax(part, target, what=what, ignore=ignore)
    for seg in segments:
        out = out[seg]
    return out


def load_srresnet(state, config: srresnet.SRResNetConfig = srresnet.COSER_SRRESNET, *,
                  prefix: str = PRE_SR_PREFIX, what: str = "CoSeR pre_sr_model (MSRResNet)"):
    """MSRResNet params from the `prefix`* keys of `state`. Raises ConversionError."""
    return _convert_part(state, prefix, srresnet.param_shapes(config), what)


def load_clip_vision(state, config: clip_vision.CLIPVisionConfig = clip_vision.VIT_H_14, *,
                     prefix: str = VISUAL_PREFIX,
                     what: str = "CoSeR CLIP vision tower (cond_stage_model.model.visual)"):
    """CLIP vision tower params from the `prefix`* keys of `state`. Raises ConversionError."""
    return _convert_part(state, prefix, clip_vision.param_shapes(config), what)


def load_qformer(state, config: qformer.QFormerConfig = qformer.COSER_QFORMER, *,
                 prefix: str = QFORMER_PREFIX, what: str = "CoSeR global_adapter (Q-Former)"):
    """Q-Former params from the `prefix`* keys of `state`. Raises ConversionError."""
    return _convert_part(state, prefix, qformer.param_shapes(config), what,
                         IGNORED_QFORMER_KEYS)


def load_cognitive(state, config: CognitiveConfig = COSER_COGNITIVE, *,
                   visual_state: Mapping[str, np.ndarray] | None = None,
                   what: str = "CoSeR checkpoint"):
    """{'pre_sr_model', 'visual', 'global_adapter'} params for `CognitiveEncoder`.

    The vision tower comes from `state` when it holds any `cond_stage_model.model.visual.`
    key (then all of them must be there), else from `visual_state` (open_clip's
    `visual.*` layout). Raises ConversionError (also when neither has the tower).
    """
    parts = {
        "pre_sr_model": lambda: load_srresnet(state, config.srresnet),
        "visual": lambda: load_clip_vision(state, config.vision),
        "global_adapter": lambda: load_qformer(state, config.qformer),
    }
    if visual_state is not None and not any(k.startswith(VISUAL_PREFIX) for k in state):
        parts["visual"] = lambda: load_clip_vision(visual_state, config.vision,
                                                   prefix=OPEN_CLIP_VISUAL_PREFIX)
    params, errors = {}, []
    for name, load in parts.items():
        try:
            params[name] = load()
        except ConversionError as e:  # gather all three parts' problems into one error
            errors.append(e)
    if errors:
        raise ConversionError(what, [k for e in errors for k in e.missing],
                              [k for e in errors for k in e.unexpected],
                              [k for e in errors for k in e.mismatched])
    return params


def cognitive_keys(state) -> list[str]:
    """The keys of `state` that this converter owns (for whole-checkpoint accounting)."""
    return [k for k in state if k.startswith(COGNITIVE_PREFIXES)]


__all__ = [
    "COGNITIVE_PREFIXES", "ConversionError", "IGNORED_QFORMER_KEYS", "OPEN_CLIP_VISUAL_PREFIX",
    "PRE_SR_PREFIX", "QFORMER_PREFIX", "VISUAL_PREFIX", "cognitive_keys", "load_clip_vision",
    "load_cognitive", "load_qformer", "load_srresnet",
]
