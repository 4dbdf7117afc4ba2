"""MANIQA weights -> (config, Flax params) for `jaxsr.metrics.maniqa`.

File: pyiqa's `ckpt_koniq10k.pt` (the `maniqa` metric; on Hugging Face in the
chaofengc/IQA-PyTorch-Weights repository, where pyiqa downloads it from), the state
dict of pyiqa's `MANIQA` module trained on KonIQ-10k. Its siblings `ckpt_kadid10k.pt`
(`maniqa-kadid`) and `MANIQA_PIPAL-ae6d356b.pth` (`maniqa-pipal`, which pyiqa runs with
Swin residual scale 0.13: pass `scale=0.13`) have the same layout. A file saved by
pyiqa's training code (the state dict under `params`) and DataParallel's `module.`
prefix are accepted, as pyiqa's loader does.

Keys: the timm ViT trunk under `vit.` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.<i>.*`, `norm`, `head`), `tablock1.<i>` / `tablock2.<i>` (`c_q`, `c_k`, `c_v`),
`conv1`, `conv2`, `swintransformer1` / `swintransformer2` (`downsample`,
`layers.<l>.{conv, blocks.<b>.{norm1, attn.{qkv, proj, relative_position_bias_table,
relative_position_index}, attn_mask, norm2, mlp.{fc1, fc2}}}`), `fc_score.{0,3}`,
`fc_weight.{0,3}`. Every key is used: the buffers `relative_position_index` and
`attn_mask` are checked against the values the model recomputes, and the params scoring
never reads (ViT blocks after the last tap, its `norm` and `head`, the Swin
`downsample` convs) are converted and shape-checked like the rest. Sizes are read from
the tensor shapes; the ViT head count, the tapped blocks, the Swin residual scale and
the crop count cannot be, and default to pyiqa's `maniqa` (12, 6-9, 0.8, 20).
"""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np

from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import ConversionError, stored_shape, torch_to_flax
from jaxsr.metrics.maniqa import ManiqaConfig, eval_shape_params
from jaxsr.models.swin import relative_position_index, shifted_window_mask

_SWIN = ("swintransformer1", "swintransformer2")


def _count(state, pattern: str) -> int:
    """1 + the largest index captured by `pattern` in any key (0 if none matches)."""
    found = re.compile(pattern)
    return 1 + max((int(m.group(1)) for k in state if (m := found.match(k))), default=-1)


def infer_config(state, what: str, *, scale: float = 0.8, vit_heads: int = 12,
                 taps=(6, 7, 8, 9), test_sample: int = 20) -> ManiqaConfig:
    """The `ManiqaConfig` a state dict was saved from (sizes read from shapes)."""
    dim = stored_shape(state, "vit.cls_token", 3, what)[2]
    patch = stored_shape(state, "vit.patch_embed.proj.weight", 4, what)[2]
    grid = math.isqrt(stored_shape(state, "vit.pos_embed", 3, what)[1] - 1)
    classes = stored_shape(state, "vit.head.weight", 2, what)[0]
    layers = _count(state, r"^swintransformer1\.layers\.(\d+)\.")
    depths = tuple(_count(state, rf"^swintransformer1\.layers\.{i}\.blocks\.(\d+)\.")
                   for i in range(layers))
    tables = [stored_shape(state, f"swintransformer1.layers.{i}.blocks.0.attn."
                     "relative_position_bias_table", 2, what) for i in range(layers)]
    window = (math.isqrt(tables[0][0]) + 1) // 2 if tables else 1
    dim_mlp = stored_shape(state, "swintransformer1.layers.0.blocks.0.mlp.fc1.weight", 2, what)[0]
    return ManiqaConfig(
        embed_dim=dim, patch_size=patch, img_size=grid * patch,
        vit_depth=_count(state, r"^vit\.blocks\.(\d+)\."), vit_heads=vit_heads,
        vit_classes=classes, taps=tuple(int(t) for t in taps),
        num_tab=_count(state, r"^tablock1\.(\d+)\."), depths=depths,
        num_heads=tuple(t[1] for t in tables), window_size=window, dim_mlp=dim_mlp,
        scale=float(scale), test_sample=int(test_sample))


def _expected_buffers(cfg: ManiqaConfig) -> dict[str, np.ndarray]:
    """The Swin buffers pyiqa's state dict holds, with the values pyiqa computes."""
    r = cfg.grid
    window, shift = (cfg.window_size, cfg.window_size // 2) if r > cfg.window_size else (r, 0)
    out = {}
    for stage in _SWIN:
        for i, depth in enumerate(cfg.depths):
            for j in range(depth):
                block = f"{stage}.layers.{i}.blocks.{j}"
                out[f"{block}.attn.relative_position_index"] = relative_position_index(window)
                if j % 2 and shift:
                    out[f"{block}.attn_mask"] = shifted_window_mask(r, window, shift)
    return out


def _take_buffers(state: dict, cfg: ManiqaConfig):
    """Remove the expected buffers from `state`; (missing, mismatched) descriptions."""
    missing, mismatched = [], []
    for key, want in _expected_buffers(cfg).items():
        if key not in state:
            missing.append(key)
            continue
        got = np.asarray(state.pop(key))
        if got.shape != want.shape:
            mismatched.append(f"{key}: {list(got.shape)} vs {list(want.shape)}")
        elif not np.array_equal(got.astype(np.float64), want.astype(np.float64)):
            mismatched.append(f"{key}: values differ from the buffer pyiqa computes")
    return missing, mismatched


def convert(files: list[pathlib.Path], *, scale: float = 0.8, vit_heads: int = 12,
            taps=(6, 7, 8, 9), test_sample: int = 20) -> tuple[dict, dict]:
    """pyiqa's MANIQA file -> (`ManiqaConfig.to_dict()`, Flax params).

    Args:
      files: one file, pyiqa's MANIQA checkpoint.
      scale, vit_heads, taps, test_sample: what the file cannot tell; the defaults are
        pyiqa's `maniqa` metric (KonIQ).
    Raises:
      ConversionError listing every missing, unexpected and misshaped key.
    """
    if len(files) != 1:
        raise ValueError(f"MANIQA takes one weight file, got {len(files)}: {files}")
    path = pathlib.Path(files[0])
    what = f"MANIQA weights ({path.name})"
    raw = read_state_dict(path, unwrap=("params", "state_dict", "model"))
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    cfg = infer_config(state, what, scale=scale, vit_heads=vit_heads, taps=taps,
                       test_sample=test_sample)
    if cfg.embed_dim % cfg.vit_heads or cfg.embed_dim % 2:
        raise ValueError(f"{what}: width {cfg.embed_dim} does not split into {cfg.vit_heads} "
                         "heads and two halves")
    buffer_missing, buffer_mismatched = _take_buffers(state, cfg)
    try:
        params = torch_to_flax(state, eval_shape_params(cfg), what=what, dtype=np.float32)
    except ConversionError as e:
        raise ConversionError(what, e.missing + buffer_missing, e.unexpected,
                              e.mismatched + buffer_mismatched) from None
    if buffer_missing or buffer_mismatched:
        raise ConversionError(what, buffer_missing, (), buffer_mismatched)
    return cfg.to_dict(), params
