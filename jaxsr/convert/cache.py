"""A converted-weights folder: Flax params + a manifest, read without torch or renames.

    DIR/manifest.json        format version, jaxsr version, storage dtype, per-module
                             config and parameter count, and every source file with
                             its size, mtime and sha256 (so a changed source is detected)
    DIR/<module>.safetensors Flax params, keys "down_blocks_0/resnets_0/conv1/kernel"
    DIR/tokenizer/           copied from the source, when it has one

`jaxsr convert` writes it; pipelines read it with `load_converted`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import traverse_util

import jaxsr
from jaxsr.convert.readers import SafetensorsFile
from jaxsr.convert.safetensors_io import write_safetensors

FORMAT = "jaxsr-weights"
VERSION = 1
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class StaleWeightsError(ValueError):
    """The source checkpoint changed since the folder was converted."""


class StaleWeightsWarning(UserWarning):
    """The source checkpoint changed since the folder was converted."""


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_sources(paths) -> list[dict]:
    """Path, size, modification time and sha256 of each source file."""
    out = []
    for p in paths:
        p = Path(p).resolve()
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": sha256(p)})
    return out


def save_converted(out_dir, modules: dict[str, tuple[dict, dict]], *, sources,
                   dtype: str = "float32", tokenizer_dir=None, extra: dict | None = None) -> Path:
    """Write `modules` = {name: (config dict, Flax params)} and the manifest.

    The manifest is written last, so a folder without one is an interrupted
    conversion and `load_converted` refuses it.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    entries = {}
    for name, (config, params) in modules.items():
        flat = traverse_util.flatten_dict(params, sep="/")
        arrays = {k: np.asarray(v).astype(_DTYPES[dtype], copy=False) for k, v in flat.items()}
        write_safetensors(out / f"{name}.safetensors", arrays)
        entries[name] = {"file": f"{name}.safetensors", "config": config,
                         "parameters": int(sum(a.size for a in arrays.values()))}
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "jaxsr_version": jaxsr.__version__,
                "dtype": dtype, "modules": entries, "sources": describe_sources(sources),
                "tokenizer": "tokenizer" if tokenizer_dir is not None else None,
                **(extra or {})}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return out


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a jaxsr weights folder (no manifest.json; "
                                "create one with `jaxsr convert`, or it was interrupted)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); run `jaxsr convert` again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported weights format {manifest.get('format')!r} "
                         f"version {manifest.get('version')!r}")
    return manifest


def load_converted(folder, modules=None, *, check_sources: str = "warn", leaf=None) -> dict:
    """{name: (config dict, Flax params)} for the requested modules (default all).

    Only reads the stored arrays (in the dtype they were saved in): no torch, no renames.
    Tensors are read one at a time; `leaf(module, key, array)`, when given, turns each
    into what the tree holds (e.g. a device array in the compute dtype) before the
    next is read, so the host never holds more than one tensor of a module beyond
    what `leaf` keeps. Without it the tree holds the numpy arrays.
    check_sources: what to do if a source file still present changed since conversion
      (size or mtime differ and then the sha256 too; an unchanged stat costs no hashing):
      "warn" (StaleWeightsWarning), "raise" (StaleWeightsError) or "ignore".
    """
    if check_sources not in ("warn", "raise", "ignore"):
        raise ValueError(f"check_sources must be 'warn', 'raise' or 'ignore', not "
                         f"{check_sources!r}")
    folder = Path(folder)
    manifest = read_manifest(folder)
    if check_sources != "ignore":
        stale = stale_sources(manifest)
        if stale:
            msg = (f"{folder} was converted from files that changed since: {', '.join(stale)}; "
                   "run `jaxsr convert` again")
            if check_sources == "raise":
                raise StaleWeightsError(msg)
            warnings.warn(msg, StaleWeightsWarning, stacklevel=2)
    out = {}
    for name in _module_names(folder, manifest, modules):
        entry = manifest["modules"][name]
        flat = {}
        with SafetensorsFile(folder / entry["file"]) as f:
            for key in f.keys():
                array = f.read(key)
                flat[key] = array if leaf is None else leaf(name, key, array)
                del array
        out[name] = (entry["config"], traverse_util.unflatten_dict(flat, sep="/"))
    return out


def tensor_info(folder, modules=None) -> dict[str, dict[str, tuple[np.dtype, tuple]]]:
    """{module: {key: (stored dtype, shape)}} from the files' headers alone (no data
    read): what a memory estimate needs before loading."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    out = {}
    for name in _module_names(folder, manifest, modules):
        with SafetensorsFile(folder / manifest["modules"][name]["file"]) as f:
            out[name] = {key: f.info(key) for key in f.keys()}
    return out


def _module_names(folder: Path, manifest: dict, modules) -> list[str]:
    names = list(manifest["modules"]) if modules is None else list(modules)
    for name in names:
        if name not in manifest["modules"]:
            raise KeyError(f"{folder} has no module {name!r} (it has "
                           f"{', '.join(manifest['modules'])})")
    return names


def stale_sources(manifest: dict, *, full: bool = False) -> list[str]:
    """Source files that changed since conversion. Files that are gone are not
    reported (converted folders are meant to outlive their sources).

    full=False trusts an unchanged (size, mtime) and hashes only files whose stat
    changed (a touched but identical file is not stale); full=True hashes them all.
    """
    stale = []
    for src in manifest["sources"]:
        p = Path(src["path"])
        if not p.is_file():
            continue
        st = p.stat()
        if st.st_size != src["size"]:
            stale.append(str(p))
        elif (full or st.st_mtime_ns != src.get("mtime_ns")) and sha256(p) != src["sha256"]:
            stale.append(str(p))
    return stale
