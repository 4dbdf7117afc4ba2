"""A converted-weights folder: Flax params + a manifest, read without torch or renames.

    DIR/manifest.json        format version, jaxsr version, storage dtype, per-module
                             config and parameter count, and every source file with
                             its size and sha256 (so a changed source is detected)
    DIR/<module>.safetensors Flax params, keys "down_blocks_0/resnets_0/conv1/kernel"
    DIR/tokenizer/           copied from the source, when it has one

`jaxsr convert` writes it; pipelines read it with `load_converted`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import traverse_util

import jaxsr
from jaxsr.convert.readers import read_safetensors
from jaxsr.convert.safetensors_io import write_safetensors

FORMAT = "jaxsr-weights"
VERSION = 1
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class StaleWeightsError(ValueError):
    """The source checkpoint changed since the folder was converted."""


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_sources(paths) -> list[dict]:
    return [{"path": str(Path(p).resolve()), "size": Path(p).stat().st_size,
             "sha256": sha256(Path(p))} for p in paths]


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
        arrays = {k: np.asarray(v).astype(_DTYPES[dtype]) for k, v in flat.items()}
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
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported weights format {manifest.get('format')!r} "
                         f"version {manifest.get('version')!r}")
    return manifest


def load_converted(folder, modules=None, *, check_sources: bool = False) -> dict:
    """{name: (config dict, Flax params as numpy)} for the requested modules (default all).

    `check_sources` re-hashes the source files still present and raises
    StaleWeightsError if one changed since conversion.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if check_sources:
        stale_sources(manifest, raise_error=True)
    names = list(manifest["modules"]) if modules is None else list(modules)
    out = {}
    for name in names:
        if name not in manifest["modules"]:
            raise KeyError(f"{folder} has no module {name!r} (it has "
                           f"{', '.join(manifest['modules'])})")
        entry = manifest["modules"][name]
        flat = read_safetensors(folder / entry["file"])
        out[name] = (entry["config"], traverse_util.unflatten_dict(
            {k: np.asarray(v) for k, v in flat.items()}, sep="/"))
    return out


def stale_sources(manifest: dict, *, raise_error: bool = False) -> list[str]:
    """Source files whose size or hash differ from the manifest (missing ones are skipped)."""
    stale = []
    for src in manifest["sources"]:
        p = Path(src["path"])
        if p.exists() and (p.stat().st_size != src["size"] or sha256(p) != src["sha256"]):
            stale.append(str(p))
    if stale and raise_error:
        raise StaleWeightsError("source checkpoints changed since conversion: "
                                + ", ".join(stale) + "; run `jaxsr convert` again")
    return stale
