"""RAM (`ram_swin_large_14m.pth`) + DAPE LoRA (`DAPE.pth`) -> DAPE Flax params. Strict.

    config, params = load_ram(ram_state, dape_lora)            # LoRA merged (inference)
    config, params = load_ram(ram_state, dape_lora, merge=False)  # LoRA kept (training)

`ram_state` is the checkpoint's `model` dict (a dict holding `model` is unwrapped);
`dape_lora` is DAPE.pth, a flat dict of `*.lora_A` / `*.lora_B` tensors, or None
for plain RAM. Values are numpy arrays (see `jaxsr.convert.readers.read_state_dict`).

What happens, following RAM's own loader and loralib:
- `vision_multi` is renamed to `tagging_head` in every key (older RAM naming).
- The Swin architecture is read from the shapes (see `infer_dape_config`).
- Entries SeeSR never uses are skipped by the documented patterns `RAM_IGNORED`; every
  other entry must fill a parameter of the right shape and every parameter must be
  filled, otherwise one `ConversionError` names all offending keys.
- LoRA (loralib, scale alpha/r = 1/8): Swin `attn.qkv` is a MergedLinear adapting
  the q and v rows; the tagging head's cross-attention `query`/`key` are lora.Linear.
  RAM ties `tagging_head.encoder.layer.{0,1}.*` to `tag_encoder.encoder.layer.{0,1}.*`
  (one tensor, two names), so loralib's eval-time merge adds BOTH modules' updates to
  the shared query/key weights: W + (B_head·A_head + B_tagenc·A_tagenc)/8. This
  loader reproduces that. Every LoRA key must belong to a weight of the RAM dict
  with matching shapes; LoRA of modules SeeSR never runs is checked and skipped
  (`LORA_IGNORED`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from jaxsr.convert.tree import ConversionError, torch_key_to_path, torch_to_flax
from jaxsr.models.dape import (
    DAPE_LORA_ALPHA,
    DAPE_LORA_RANK,
    SWIN_QKV_LORA_GROUPS,
    DAPEConfig,
    param_shapes,
)
from jaxsr.models.ram_head import TagHeadConfig
from jaxsr.models.swin import SwinConfig
from jaxsr.nn.lora import lora_delta, lora_scale

# RAM checkpoint entries that SeeSR's DAPE never uses:
RAM_IGNORED = (
    # Tag2Text image-tag interaction encoder: never run by SeeSR (its layers 0-1 are
    # tied copies of tagging_head's, read under the tagging_head names).
    r"tag_encoder\..*",
    # Tag2Text caption decoder: never run.
    r"text_decoder\..*",
    # Swin buffers, recomputed by jaxsr.models.swin (RAM's loader deletes them too).
    r"visual_encoder\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index",
    r"visual_encoder\.layers\.\d+\.blocks\.\d+\.attn_mask",
    # SeeSR's ram.py adds zero-initialised condition layers used only when a
    # condition is passed, which SeeSR never does (not in the released checkpoint).
    r"visual_encoder\.layers\.\d+\.blocks\.\d+\.condition_(attention|ffn)\..*",
)

# DAPE.pth LoRA of modules SeeSR never runs (checked against their weights, skipped):
LORA_IGNORED = (
    r"tag_encoder\.encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key)",
    r"text_decoder\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key)",
)

_SWIN_QKV = re.compile(r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv")
_HEAD_QK = re.compile(r"tagging_head\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)")
_TIED_QK = re.compile(r"tag_encoder\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)")
_BLOCK_KEY = re.compile(r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
_HEAD_LAYER_KEY = re.compile(r"tagging_head\.encoder\.layer\.(\d+)\.")


def _unwrap(state: Mapping, what: str) -> dict:
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ConversionError(what, unexpected=[repr(key)])
        out[key.replace("vision_multi", "tagging_head")] = value
    return out


def _shape(state: Mapping, key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(what, missing=[key])
    return tuple(np.shape(state[key]))


def _most_common(values, key_hint: str, what: str):
    if not values:
        raise ConversionError(what, missing=[key_hint])
    return collections.Counter(values).most_common(1)[0][0]


def infer_dape_config(state: Mapping, *, img_size: int | None = None,
                      num_attention_heads: int = 4, what: str = "RAM checkpoint") -> DAPEConfig:
    """DAPE architecture from the shapes of a RAM state dict (tagging_head naming).

    Swin: embed_dim, in_chans and patch_size from `patch_embed.proj.weight`; depths from
    the block indices of each stage; heads per stage from the second dim of its
    `relative_position_bias_table`s (most common value); window from stage 0's table
    rows (2w-1)²; mlp_ratio from `mlp.fc1`; qkv_bias from the presence of `qkv.bias`.
    img_size: argument, else read from stage 0's `attn_mask` buffer when present
    ([nW, w², w²] -> √nW·w·patch), else 384 (RAM's Swin-L). Head: hidden size from
    `wordvec_proj`, encoder width from the key projection, intermediate size and layer
    count from the layers; num_classes from `label_embed`; the head count is not in
    the weights (`num_attention_heads`, RAM: 4).
    """
    proj = _shape(state, "visual_encoder.patch_embed.proj.weight", what)
    embed_dim, in_chans, patch = proj[0], proj[1], proj[2]
    blocks: dict[int, set[int]] = collections.defaultdict(set)
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    if not blocks:
        raise ConversionError(what, missing=["visual_encoder.layers.0.blocks.0.*"])
    stages = max(blocks) + 1
    depths = tuple(max(blocks.get(i, {-1})) + 1 for i in range(stages))
    heads, tables = [], []
    for i, depth in enumerate(depths):
        keys = [f"visual_encoder.layers.{i}.blocks.{b}.attn.relative_position_bias_table"
                for b in range(depth)]
        shapes = [tuple(np.shape(state[k])) for k in keys if k in state]
        heads.append(_most_common([s[1] for s in shapes if len(s) == 2], keys[0], what))
        tables.append(shapes)
    rows = _most_common([s[0] for s in tables[0] if len(s) == 2],
                        "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table",
                        what)
    window = (round(np.sqrt(rows)) + 1) // 2
    fc1 = _shape(state, "visual_encoder.layers.0.blocks.0.mlp.fc1.weight", what)
    qkv_bias = "visual_encoder.layers.0.blocks.0.attn.qkv.bias" in state
    if img_size is None:
        mask_key = "visual_encoder.layers.0.blocks.1.attn_mask"
        if mask_key in state and len(np.shape(state[mask_key])) == 3:
            n_windows = np.shape(state[mask_key])[0]
            img_size = round(np.sqrt(n_windows)) * window * patch
        else:
            img_size = SwinConfig.img_size
    swin = SwinConfig(img_size=img_size, patch_size=patch, in_chans=in_chans,
                      embed_dim=embed_dim, depths=depths, num_heads=tuple(heads),
                      window_size=window, mlp_ratio=fc1[0] / embed_dim, qkv_bias=qkv_bias)

    head_layers = {int(m.group(1)) for k in state if (m := _HEAD_LAYER_KEY.match(k))}
    wordvec = _shape(state, "wordvec_proj.weight", what)
    key_w = _shape(state, "tagging_head.encoder.layer.0.crossattention.self.key.weight", what)
    inter = _shape(state, "tagging_head.encoder.layer.0.intermediate.dense.weight", what)
    label = _shape(state, "label_embed", what)
    head = TagHeadConfig(hidden_size=wordvec[0], num_hidden_layers=max(head_layers) + 1,
                         num_attention_heads=num_attention_heads, intermediate_size=inter[0],
                         encoder_width=key_w[1])
    return DAPEConfig(swin=swin, head=head, num_classes=label[0], embed_width=key_w[1])


def _lora_modules(config: DAPEConfig) -> dict[str, tuple[str, tuple[bool, ...]]]:
    """LoRA modules that matter for DAPE: torch module name -> (target module, groups).

    The target is where the update lands (the tied tag_encoder layers land on the
    tagging head)."""
    out = {}
    for layer, depth in enumerate(config.swin.depths):
        for b in range(depth):
            name = f"visual_encoder.layers.{layer}.blocks.{b}.attn.qkv"
            out[name] = (name, SWIN_QKV_LORA_GROUPS)
    for i in range(config.head.num_hidden_layers):
        for proj in ("query", "key"):
            name = f"tagging_head.encoder.layer.{i}.crossattention.self.{proj}"
            out[name] = (name, (True,))
            out[f"tag_encoder.encoder.layer.{i}.crossattention.self.{proj}"] = (name, (True,))
    return out


def _expected_lora_shapes(weight_shape, groups, rank):
    out_rows, in_features = weight_shape
    n, k = len(groups), sum(groups)
    return (rank * k, in_features), (out_rows // n * k, rank)


def _check_lora(lora: dict, ram: dict, config: DAPEConfig, rank: int | None, what: str):
    """Validate a DAPE LoRA dict against the (already validated) RAM weights.

    Returns ({module: (A, B)} for the modules DAPE uses, rank)."""
    used = _lora_modules(config)
    ignore = [re.compile(p) for p in LORA_IGNORED]
    pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    unexpected, mismatched, missing = [], [], []
    for key, value in lora.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])", key)
        module = m.group(1) if m else None
        # The weight a LoRA pair belongs to (tied tag_encoder layers: the head's).
        weight = f"{used[module][0] if module in used else module}.weight"
        if (module is None or weight not in ram
                or not (module in used or any(r.fullmatch(module) for r in ignore))):
            unexpected.append(key)
            continue
        pairs[module][m.group(2)] = np.asarray(value)
    if rank is None:
        ranks = [np.shape(p["B"])[-1] for p in pairs.values() if "B" in p]
        rank = collections.Counter(ranks).most_common(1)[0][0] if ranks else DAPE_LORA_RANK
    for module in list(used) + sorted(set(pairs) - set(used)):
        got = pairs.get(module, {})
        if module in used:
            missing += [f"{module}.lora_{ab}" for ab in "AB" if ab not in got]
        target, groups = used.get(module, (module, (True,)))
        want = _expected_lora_shapes(np.shape(ram[f"{target}.weight"]), groups, rank)
        for ab, shape in zip("AB", want):
            if ab in got and tuple(got[ab].shape) != shape:
                mismatched.append(f"{module}.lora_{ab}: {list(got[ab].shape)} vs {list(shape)}")
    if missing or unexpected or mismatched:
        raise ConversionError(what, missing, unexpected, mismatched)
    return {m: (pairs[m]["A"], pairs[m]["B"]) for m in used}, rank


def _fresh_lora(ram: dict, config: DAPEConfig, rank: int, seed: int) -> dict:
    """loralib's initialisation (A ~ U(±1/√in), B = 0) for the trainable modules."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (target, groups) in _lora_modules(config).items():
        if module != target:
            continue  # tied tag_encoder LoRA: never trained, zero update
        a_shape, b_shape = _expected_lora_shapes(np.shape(ram[f"{module}.weight"]), groups, rank)
        bound = 1.0 / np.sqrt(a_shape[1])
        out[module] = (rng.uniform(-bound, bound, a_shape).astype(np.float32),
                       np.zeros(b_shape, np.float32))
    return out


def load_ram(ram_state: Mapping, dape_lora: Mapping | None = None, *,
             config: DAPEConfig | None = None, img_size: int | None = None,
             merge: bool = True, lora_rank: int | None = None,
             lora_alpha: float = DAPE_LORA_ALPHA, seed: int = 0,
             what: str = "RAM checkpoint", lora_what: str = "DAPE LoRA",
             ) -> tuple[DAPEConfig, dict]:
    """RAM state dict (+ DAPE LoRA) -> (DAPEConfig, Flax params of `DAPE(config)`).

    Args:
      ram_state: the RAM checkpoint's `model` dict (or a dict holding it as `model`).
      dape_lora: DAPE.pth (flat `*.lora_A`/`*.lora_B`), or None.
      config: the architecture; default `infer_dape_config(ram_state, img_size=...)`.
        Its `lora_rank` and `lora_alpha` are replaced (by `merge` and `lora_alpha`).
      merge: True -> LoRA folded into the weights, config.lora_rank 0 (inference).
        False -> LoRA kept as `lora_A`/`lora_B` params, config.lora_rank r (training);
        without `dape_lora` they are initialised like loralib from `seed`. The tied
        tag_encoder update is never trained, so it is folded into the head weights.
      lora_rank: rank expected in `dape_lora` (default: read from it; else 8).
    Raises:
      ConversionError naming every missing, unexpected or misshaped key (the RAM
      dict is checked first, then the LoRA dict).
    """
    ram = _unwrap(ram_state, what)
    base = dataclasses.replace(config or infer_dape_config(ram, img_size=img_size, what=what),
                               lora_rank=0, lora_alpha=lora_alpha)
    # 1. The RAM weights alone, strictly, into the LoRA-free tree.
    params = traverse_util.flatten_dict(
        torch_to_flax(ram, param_shapes(base), what=what, ignore=RAM_IGNORED))
    # 2. The LoRA pairs, checked against those (now known-good) weights.
    lora_pairs, rank = {}, lora_rank or DAPE_LORA_RANK
    if dape_lora is not None:
        lora_pairs, rank = _check_lora(_unwrap(dape_lora, lora_what), ram, base, lora_rank,
                                       lora_what)
    elif not merge:
        lora_pairs = _fresh_lora(ram, base, rank, seed)
    cfg = base if merge else dataclasses.replace(base, lora_rank=rank)
    scale = lora_scale(lora_alpha, rank)
    # 3. Merge (or attach). loralib merges module by module in registration order
    # (tag_encoder before tagging_head), each adding its float32 update to W.
    modules = _lora_modules(base)
    for module in sorted(lora_pairs, key=lambda m: not m.startswith("tag_encoder.")):
        a, b = (np.asarray(t, np.float32) for t in lora_pairs[module])
        target, groups = modules[module]
        path = torch_key_to_path(target + ".weight")[:-1]
        if not merge and module == target:
            params[path + ("lora_A",)], params[path + ("lora_B",)] = a, b
            continue
        kernel = params[path + ("kernel",)]
        params[path + ("kernel",)] = kernel + lora_delta(a, b, scale, groups).T
    params = traverse_util.unflatten_dict(params)
    _assert_same_tree(params, param_shapes(cfg))
    return cfg, params


def _assert_same_tree(params, shapes):
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
    if got != want:  # an internal error, not a checkpoint problem
        raise AssertionError(f"converted DAPE tree differs from the model: "
                             f"{sorted(set(got) ^ set(want))[:5]}")
