"""The one naming rule between PyTorch state dicts and jaxsr Flax param trees.

A torch key maps to a Flax path by splitting on "." and gluing every numeric
segment onto the segment before it with "_":

    down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight
 -> down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj/kernel

Leaf names and layouts:
    torch `weight` of Linear [out, in]        -> `kernel` [in, out]      (transpose)
    torch `weight` of Conv2d [O, I, kh, kw]   -> `kernel` [kh, kw, I, O]
    torch `weight` of a norm [C]              -> `scale`
    torch `weight` of an Embedding [N, C]     -> `embedding`
    `bias`                                    -> `bias`
    any other tensor (nn.Parameter)           -> same name, same layout

Which torch `weight` becomes which Flax leaf is read from the Flax tree itself
(the target tree from `jax.eval_shape(model.init, ...)`), so no per-model table
of layer types is needed; models only have to mirror the torch module names.

`torch_to_flax` is strict: every source key consumed, every target leaf filled,
every shape checked, and one `ConversionError` listing all offenders otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
from flax import traverse_util

_NUMERIC = re.compile(r"^\d+$")
# Torch module names that end in "_<digit>" themselves (not list indices); the
# inverse mapping must leave them whole.
NAMES_WITH_DIGIT_SUFFIX = frozenset({"linear_1", "linear_2", "ln_1", "ln_2"})
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class ConversionError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and
    misshaped key, so a user sees the whole problem at once."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=(), limit: int = 50):
        self.what = what
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(
            mismatched)
        lines = [f"{what} does not match the model:"]

        def section(title, items):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {i}" for i in items[:limit])
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")

        section("missing keys (in the model, not in the checkpoint)", self.missing)
        section("unexpected keys (in the checkpoint, not used by the model)", self.unexpected)
        section("shape mismatches (key: checkpoint shape vs expected)", self.mismatched)
        super().__init__("\n".join(lines))


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """`a.0.b.weight` -> ('a_0', 'b', 'weight'): the module path, leaf name kept as in torch."""
    out: list[str] = []
    for seg in key.split("."):
        if _NUMERIC.match(seg) and out:
            out[-1] = f"{out[-1]}_{seg}"
        else:
            out.append(seg)
    return tuple(out)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of `torch_key_to_path` for module paths (leaf name is the torch one)."""
    segs = []
    for p in path:
        m = re.match(r"^(.*?)_(\d+)$", p)
        if m and m.group(1) and p not in NAMES_WITH_DIGIT_SUFFIX:
            segs.extend([m.group(1), m.group(2)])
        else:
            segs.append(p)
    return ".".join(segs)


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
    return array


def _resolve_leaf(module_path: tuple[str, ...], torch_leaf: str, targets: Mapping) -> tuple | None:
    """Which target leaf a torch tensor named `module_path + (torch_leaf,)` fills."""
    if torch_leaf == "weight":
        for name in _WEIGHT_LEAVES:
            if module_path + (name,) in targets:
                return module_path + (name,)
        return None
    path = module_path + (torch_leaf,)
    return path if path in targets else None


def torch_to_flax(state: Mapping[str, np.ndarray], target, *, what: str = "checkpoint",
                  ignore: Iterable[str] = (), dtype=None):
    """Fill the Flax param tree `target` (arrays or ShapeDtypeStructs) from `state`.

    Args:
      state: torch-named tensors (numpy arrays).
      target: nested dict of the Flax params' shapes, e.g. `jax.eval_shape(init)['params']`.
      what: names the source in error messages.
      ignore: regexes of source keys known to be unused (documented at the call site).
      dtype: cast every array to this numpy dtype (default: keep the target's dtype).
    Returns:
      nested dict of numpy arrays with the target's structure.
    Raises:
      ConversionError listing all missing, unexpected and misshaped keys.
    """
    targets = traverse_util.flatten_dict(target)
    ignore_res = [re.compile(p) for p in ignore]
    filled: dict[tuple, np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, array in state.items():
        if any(r.fullmatch(key) for r in ignore_res):
            continue
        path = torch_key_to_path(key)
        dest = _resolve_leaf(path[:-1], path[-1], targets)
        if dest is None:
            unexpected.append(key)
            continue
        value = _to_flax_layout(dest[-1], np.asarray(array))
        want = tuple(targets[dest].shape)
        if value.shape != want:
            torch_shape = tuple(np.asarray(array).shape)
            expect = tuple(_to_torch_layout(dest[-1], np.empty(want, dtype=np.uint8)).shape)
            mismatched.append(f"{key}: {list(torch_shape)} vs {list(expect)}")
            continue
        out_dtype = dtype or targets[dest].dtype
        filled[dest] = value.astype(out_dtype, copy=False)
    missing = [path_to_torch_key(p[:-1]) + "." + _torch_leaf_name(p[-1])
               for p in targets if p not in filled]
    if missing or unexpected or mismatched:
        raise ConversionError(what, missing, unexpected, mismatched)
    return traverse_util.unflatten_dict(filled)


def _torch_leaf_name(flax_leaf: str) -> str:
    return "weight" if flax_leaf in _WEIGHT_LEAVES else flax_leaf


def flax_to_torch(params) -> dict[str, np.ndarray]:
    """Flax param tree -> torch-named numpy state dict (the inverse of `torch_to_flax`)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        key = path_to_torch_key(path[:-1]) + "." + _torch_leaf_name(path[-1])
        out[key] = np.asarray(_to_torch_layout(path[-1], np.asarray(value)), order="C")
    return out


def stored_shape(state, key: str, ndim: int, what: str) -> tuple[int, ...]:
    """The shape of `state[key]`, a tensor the converters read a network's sizes from;
    ConversionError (naming the key) when it is missing or has another rank."""
    if key not in state:
        raise ConversionError(what, missing=[key])
    shape = tuple(np.shape(state[key]))
    if len(shape) != ndim:
        raise ConversionError(what, mismatched=[f"{key}: {list(shape)} vs a {ndim}-d tensor"])
    return shape
