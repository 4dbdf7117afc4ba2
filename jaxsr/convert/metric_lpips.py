"""LPIPS v0.1 weights (AlexNet or VGG16 trunk) -> Flax params for `jaxsr.metrics.lpips`.

Files, in either of two layouts:
  - the `lpips` package's: torchvision's ImageNet trunk, `alexnet-owt-7be5be79.pth` or
    `vgg16-397923af.pth` (https://download.pytorch.org/models/, where torchvision
    fetches them; keys `features.N.weight/bias`), plus the linear heads
    `lpips/weights/v0.1/alex.pth` or `vgg.pth` (shipped in the `lpips` wheel on PyPI,
    and at github.com/richzhang/PerceptualSimilarity; keys `linK.model.1.weight`);
  - pyiqa's single file, `LPIPS_v0.1_alex-df73285e.pth` or `LPIPS_v0.1_vgg-a78928a0.pth`
    (from the IQA-PyTorch GitHub release `v0.1-weights` or the chaofengc/IQA-PyTorch-Weights
    repository on Hugging Face), which pyiqa loads non-strictly into its LPIPS module:
    that module's keys are `net.sliceK.N.*`, `linK.model.1.weight` and the
    `scaling_layer.shift/scale` constants. (The layout is read from pyiqa's source; a
    file that holds only some of them, e.g. just the heads, converts together with
    torchvision's trunk file.)

Key handling (anything else is reported as unexpected):
  features.N.*         -> net.features.N.*   (torchvision trunk)
  net.sliceK.N.*       -> net.features.N.*   (pyiqa: slices keep torchvision's indices)
  linK.model.1.weight  -> linK.model.1.weight
  classifier.*         ignored: the ImageNet classifier that follows the trunk in
                       torchvision's file; LPIPS taps the trunk only
  scaling_layer.*      checked equal to LPIPS's fixed shift/scale, then dropped
  module.<key>         read as <key> (DataParallel saves)
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import ConversionError, torch_to_flax
from jaxsr.metrics.lpips import LPIPS, NETS, SCALE, SHIFT

_SLICE = re.compile(r"^net\.slice\d+\.(\d+\..+)$")
_CONSTANTS = {"scaling_layer.shift": SHIFT, "scaling_layer.scale": SCALE}


def merge_files(files, what: str, rename) -> dict:
    """Every tensor of `files` in one dict under `rename(key)` (None drops the key). Two
    tensors that land on one name are an error naming both: which should win is not
    obvious (e.g. a torchvision trunk passed beside pyiqa's file that holds one too)."""
    state, origin, twice = {}, {}, []
    for path in map(pathlib.Path, files):
        for key, value in read_state_dict(path).items():
            key = key.removeprefix("module.")      # DataParallel saves
            name = rename(key)
            if name is None:
                continue
            source = f"{key} in {path.name}"
            if name in state:
                twice.append(f"{name} (given twice: {origin[name]}, {source})")
                continue
            state[name], origin[name] = np.asarray(value), source
    if twice:
        raise ConversionError(what, unexpected=twice)
    return state


def check_constants(state: dict, constants: dict) -> list[str]:
    """Fixed buffers a checkpoint may carry: they must hold the values the model
    hard-codes. Returns the offending keys (as mismatch lines); the keys are removed."""
    bad = []
    for key, want in constants.items():
        if key in state:
            got = state.pop(key)
            want = np.asarray(want, np.float32)
            if got.size != want.size or not np.allclose(got.reshape(-1), want.reshape(-1),
                                                        rtol=1e-6, atol=0):
                bad.append(f"{key}: values {got.reshape(-1)[:8].tolist()} differ from the "
                           f"fixed {want.reshape(-1)[:8].tolist()}")
    return bad


def infer_net(state: dict) -> str:
    """'alex' or 'vgg' from the first conv's kernel size or the heads' widths."""
    first = state.get("net.features.0.weight")
    if first is not None and first.ndim == 4:
        return {11: "alex", 3: "vgg"}.get(first.shape[-1], "unknown")
    head = state.get("lin1.model.1.weight")
    if head is not None and head.ndim == 4:
        return {192: "alex", 128: "vgg"}.get(head.shape[1], "unknown")
    return "unknown"


def fill(state: dict, target, what: str, bad: list[str]):
    """`torch_to_flax` with the constant mismatches `bad` reported in the same error."""
    try:
        params = torch_to_flax(state, target, what=what)
    except ConversionError as e:
        # Top-level leaves (DISTS's alpha/beta) come back as ".alpha": drop the dot.
        missing = [k.removeprefix(".") for k in e.missing]
        raise ConversionError(what, missing, e.unexpected, e.mismatched + bad) from None
    if bad:
        raise ConversionError(what, mismatched=bad)
    return params


def _rename(key: str) -> str | None:
    if key.startswith("classifier."):
        return None
    if key.startswith("features."):
        return "net." + key
    if m := _SLICE.match(key):
        return "net.features." + m.group(1)
    return key


def convert(files: list[pathlib.Path], net: str | None = None) -> tuple[dict, dict]:
    """LPIPS weight files -> ({"net": "alex"|"vgg"}, Flax params).

    Args:
      files: the trunk and head files, or pyiqa's single file (see the module docstring).
      net: "alex" or "vgg"; None reads it from the files.
    Raises:
      ConversionError listing every missing, unexpected and misshaped key.
    """
    names = ", ".join(pathlib.Path(f).name for f in files)
    what = (f"LPIPS weights ({names}; torchvision's features.N and pyiqa's net.sliceK.N "
            "keys are named net.features.N here)")
    state = merge_files(files, what, _rename)
    bad = check_constants(state, _CONSTANTS)
    if net is None:
        net = infer_net(state)
        if net not in NETS:
            raise ConversionError(f"{what}: cannot tell the trunk (AlexNet or VGG16) from "
                                  "net.features.0.weight or lin1; pass net=",
                                  missing=[k for k in ("net.features.0.weight",
                                                       "lin1.model.1.weight") if k not in state])
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, not {net!r}")
    probe = jnp.zeros((1, 64, 64, 3), jnp.float32)
    target = jax.eval_shape(LPIPS(net=net).init, jax.random.key(0), probe, probe)["params"]
    return {"net": net}, fill(state, target, f"{what}, trunk {net}", bad)
