"""DISTS weights -> Flax params for `jaxsr.metrics.dists`.

Files, in either of two layouts:
  - DISTS_pytorch's: torchvision's ImageNet VGG16, `vgg16-397923af.pth`
    (https://download.pytorch.org/models/, where torchvision fetches it; keys
    `features.N.weight/bias`), plus `weights.pt` with `alpha` and `beta` (1, 1475, 1, 1)
    (shipped in the `DISTS_pytorch` wheel on PyPI, and at github.com/dingkeyan93/DISTS;
    saved from CUDA tensors, which `read_state_dict` maps to the CPU);
  - pyiqa's single file `DISTS_weights-f5e65c96.pth` (IQA-PyTorch GitHub release
    `v0.1-weights`, or the chaofengc/IQA-PyTorch-Weights repository on Hugging Face),
    which pyiqa loads into its DISTS module: that module's keys are
    `stageK.N.weight/bias`, `alpha`, `beta` and the fixed buffers `stageK.N.filter`,
    `mean`, `std` (read from pyiqa's source; a file with only some of them converts
    together with torchvision's VGG16 file).

Key handling (anything else is reported as unexpected):
  features.N.*          -> net.features.N.* (torchvision trunk)
  stageK.N.weight/bias  -> net.features.N.* (pyiqa: stages keep torchvision's indices)
  alpha, beta           -> alpha, beta
  classifier.*          ignored: the ImageNet classifier that follows the trunk in
                        torchvision's file; DISTS uses the trunk only
  stageK.N.filter, mean, std
                        checked equal to DISTS's fixed Hanning window and ImageNet
                        mean/std, then dropped
  module.<key>          read as <key> (DataParallel saves)
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.convert.metric_lpips import check_constants, fill, merge_files
from jaxsr.metrics.backbones import hanning_filter
from jaxsr.metrics.dists import DISTS, MEAN, STD

_STAGE = re.compile(r"^stage\d+\.(\d+)\.(weight|bias)$")
_FILTER = re.compile(r"^stage\d+\.\d+\.filter$")


def _rename(key: str) -> str | None:
    if key.startswith("classifier."):
        return None
    if key.startswith("features."):
        return "net." + key
    if m := _STAGE.match(key):
        return f"net.features.{m.group(1)}.{m.group(2)}"
    return key


def convert(files: list[pathlib.Path]) -> tuple[dict, dict]:
    """DISTS weight files -> ({"net": "vgg16"}, Flax params).

    Raises:
      ConversionError listing every missing, unexpected and misshaped key.
    """
    names = ", ".join(pathlib.Path(f).name for f in files)
    what = (f"DISTS weights ({names}; torchvision's features.N and pyiqa's stageK.N keys "
            "are named net.features.N here)")
    state = merge_files(files, what, _rename)
    constants = {"mean": MEAN, "std": STD}
    for key, value in state.items():
        if _FILTER.match(key):
            # One window per channel, (C, 1, 3, 3); a wrong shape fails the size check.
            count = value.shape[0] if value.ndim == 4 else 1
            constants[key] = np.broadcast_to(hanning_filter(), (count, 1, 3, 3))
    bad = check_constants(state, constants)
    probe = jnp.zeros((1, 64, 64, 3), jnp.float32)
    target = jax.eval_shape(DISTS().init, jax.random.key(0), probe, probe)["params"]
    return {"net": "vgg16"}, fill(state, target, what, bad)
