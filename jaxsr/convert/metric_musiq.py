"""MUSIQ weights -> (config, Flax params) for `jaxsr.metrics.musiq`.

File: pyiqa's `musiq_koniq_ckpt-e95806b9.pth` (the `musiq` metric; IQA-PyTorch GitHub
release `v0.1-weights`, or the chaofengc/IQA-PyTorch-Weights repository on Hugging
Face), the state dict of pyiqa's `MUSIQ` module, which pyiqa converted from the
original TF checkpoints. Its siblings `musiq_spaq_ckpt-358bb6af.pth`,
`musiq_paq2piq_ckpt-364c0c84.pth` (one output) and `musiq_ava_ckpt-e8d3f067.pth` (ten
outputs, `head.0.*`) have the same layout and convert too.

Keys follow pyiqa's module names (`conv_root`, `gn_root`, `block1.*`, `embedding`,
`transformer_encoder.{posembed_input.position_emb, scaleembed_input.scale_emb, cls,
encoder_norm, transformer.encoderblock_<i>.*}`, `head` or `head.0`); a `module.` prefix
(DataParallel saves) is dropped, as pyiqa's loader does. Sizes (width, depth, MLP width,
patch size, grid, scales, outputs) are read from the tensor shapes; the head count and
the resize sides cannot be, and default to the release's 6 and (224, 384).
"""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np

from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import ConversionError, stored_shape, torch_to_flax
from jaxsr.metrics.musiq import STEM_WIDTH, MusiqConfig, eval_shape_params

_BLOCK = re.compile(r"^transformer_encoder\.transformer\.encoderblock_(\d+)\.")
_ENCODER = "transformer_encoder."


def infer_config(state, what: str, *, num_heads: int = 6,
                 longer_side_lengths=(224, 384),
                 max_seq_len_from_original_res: int | None = -1) -> MusiqConfig:
    """The `MusiqConfig` a state dict was saved from (sizes read from shapes)."""
    hidden, flat = stored_shape(state, "embedding.weight", 2, what)
    patch = 4 * math.isqrt(flat // (4 * STEM_WIDTH))
    layers = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    block = _ENCODER + "transformer.encoderblock_0.mlp.fc1.weight"
    mlp = stored_shape(state, block, 2, what)[0] if layers else 1
    num_scales = stored_shape(state, _ENCODER + "scaleembed_input.scale_emb", 2, what)[0]
    grid = math.isqrt(stored_shape(state, _ENCODER + "posembed_input.position_emb", 3, what)[1])
    ten = "head.0.weight" in state
    num_class = stored_shape(state, "head.0.weight" if ten else "head.weight", 2, what)[0]
    pos_rows = stored_shape(state, _ENCODER + "posembed_input.position_emb", 3, what)[1]
    odd = []
    if patch < 4 or flat != 4 * STEM_WIDTH * (patch // 4) ** 2:
        odd.append(f"embedding.weight: {[hidden, flat]} vs [D, 256 (P/4)^2]")
    if grid * grid != pos_rows:
        odd.append(f"{_ENCODER}posembed_input.position_emb: {pos_rows} rows vs G^2")
    if odd:
        raise ConversionError(what, mismatched=odd)
    cfg = MusiqConfig(patch_size=patch, hidden_size=hidden, mlp_dim=mlp, num_heads=num_heads,
                      num_layers=layers, num_scales=num_scales, spatial_pos_grid_size=grid,
                      num_class=num_class,
                      longer_side_lengths=tuple(int(s) for s in longer_side_lengths),
                      max_seq_len_from_original_res=max_seq_len_from_original_res)
    used = len(cfg.longer_side_lengths) + (max_seq_len_from_original_res is not None)
    if hidden % num_heads or num_scales < used or (ten and num_class == 1):
        raise ValueError(f"{what}: {num_heads} heads, {used} scales and {num_class} outputs "
                         f"do not fit width {hidden}, {num_scales} scale embeddings")
    return cfg


def convert(files: list[pathlib.Path], *, num_heads: int = 6,
            longer_side_lengths=(224, 384),
            max_seq_len_from_original_res: int | None = -1) -> tuple[dict, dict]:
    """pyiqa's MUSIQ file -> (`MusiqConfig.to_dict()`, Flax params).

    Args:
      files: one file, pyiqa's MUSIQ checkpoint.
      num_heads, longer_side_lengths, max_seq_len_from_original_res: what the file
        cannot tell; the defaults are pyiqa's (and the release files').
    Raises:
      ConversionError listing every missing, unexpected and misshaped key.
    """
    if len(files) != 1:
        raise ValueError(f"MUSIQ takes one weight file, got {len(files)}: {files}")
    path = pathlib.Path(files[0])
    what = f"MUSIQ weights ({path.name})"
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    cfg = infer_config(state, what, num_heads=num_heads, longer_side_lengths=longer_side_lengths,
                       max_seq_len_from_original_res=max_seq_len_from_original_res)
    target = eval_shape_params(cfg)
    try:
        params = torch_to_flax(state, target, what=what, dtype=np.float32)
    except ConversionError as e:
        # The generic inverse naming reads `encoderblock_3` as list index 3; restore
        # pyiqa's ModuleDict names in the report.
        fix = lambda keys: [re.sub(r"encoderblock\.(\d+)", r"encoderblock_\1", k)  # noqa: E731
                            for k in keys]
        raise ConversionError(what, fix(e.missing), e.unexpected, e.mismatched) from None
    return cfg.to_dict(), params
