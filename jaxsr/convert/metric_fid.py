"""pytorch-fid's FID Inception weights -> Flax params of `jaxsr.metrics.inception`.

Takes one file: `pt_inception-2015-12-05-6726825d.pth`, the release asset pytorch-fid
downloads on first use
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth),
a state dict of its `fid_inception_v3()` module (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight`).

Strict: every tensor of the trunk up to Mixed_7c is used and shape-checked. Only
these are accepted and left unused, because FID reads the pool3 features before
them: the 1008-class classifier `fc.*`, an auxiliary classifier `AuxLogits.*` (not
in the release file, present in torchvision-style saves), and BatchNorm's
`num_batches_tracked` counters (written by torch >= 0.4.1 saves; eval mode never
reads them).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import ConversionError, path_to_torch_key, torch_to_flax
from jaxsr.metrics.inception import FIDInceptionV3

UNUSED_KEYS = (r"fc\.(weight|bias)", r"AuxLogits\..*", r".*\.num_batches_tracked")


def param_shapes() -> dict:
    """The FID Inception's Flax param tree as ShapeDtypeStructs (float32)."""
    x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)["params"]


def _torch_leaf(flax_leaf: str) -> str:
    return "weight" if flax_leaf in ("kernel", "scale") else flax_leaf


def _torch_name(path: tuple[str, ...]) -> str:
    return ".".join(path[:-1] + (_torch_leaf(path[-1]),))


def _generic_name(path: tuple[str, ...]) -> str:
    return path_to_torch_key(path[:-1]) + "." + _torch_leaf(path[-1])


def convert(files: list[Path]) -> tuple[dict, dict]:
    """(config, params) from `[pt_inception-2015-12-05-6726825d.pth]`.

    config is {"net": "fid_inception_v3", "features": 2048}; params a nested dict of
    float32 numpy arrays for `jaxsr.metrics.fid.inception_features`.
    Raises ConversionError naming every missing, unexpected and misshaped key.
    """
    files = [Path(f) for f in files]
    if len(files) != 1:
        raise ConversionError(f"FID Inception weights {[str(f) for f in files]}",
                              missing=["expected exactly one file: "
                                       "pt_inception-2015-12-05-6726825d.pth"])
    state = read_state_dict(files[0])
    target = param_shapes()
    try:
        params = torch_to_flax(state, target, what=f"FID Inception weights {files[0]}",
                               ignore=UNUSED_KEYS, dtype=np.float32)
    except ConversionError as e:
        # The generic rule reads "_<digit>" as a list index when it names a missing key
        # ("branch7x7_2" -> "branch7x7.2"); Inception's names have no list indices.
        names = {_generic_name(p): _torch_name(p) for p in flatten_dict(target)}
        raise ConversionError(e.what, [names.get(k, k) for k in e.missing], e.unexpected,
                              e.mismatched) from None
    return {"net": "fid_inception_v3", "features": 2048}, params
