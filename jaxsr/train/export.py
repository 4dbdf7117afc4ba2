"""Trained SeeSR params → a weights folder that `jaxsr sr` and SeeSRPipeline load.

    export_seesr(init_folder, trainable, out_folder)

The new folder is the starting folder (VAE, text encoder, DAPE, tags, tokenizer,
scheduler) with the ControlNet replaced and the UNet's RCA blocks replaced by the
trained ones; the manifest records the training step. Params are gathered to the
host (fully replicated copies), so call it from every process of a multi-host run;
process 0 writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np

from jaxsr.convert.cache import load_converted, read_manifest, save_converted
from jaxsr.train.seesr_objective import join_unet, split_unet


def gather_to_host(tree):
    """Global (possibly sharded, multi-process) arrays -> float32 numpy on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def export_seesr(init_folder, trainable, out_folder, *, step: int | None = None) -> Path:
    init_folder, out_folder = Path(init_folder), Path(out_folder)
    trainable = gather_to_host(trainable)
    if jax.process_index() != 0:
        return out_folder
    manifest = read_manifest(init_folder)
    modules = load_converted(init_folder, check_sources="ignore")
    frozen_unet, _ = split_unet(modules["unet"][1])
    modules["unet"] = (modules["unet"][0], join_unet(frozen_unet, trainable["unet_rca"]))
    modules["controlnet"] = (modules["controlnet"][0], trainable["controlnet"])
    reserved = {"format", "version", "jaxsr_version", "dtype", "modules", "sources",
                "tokenizer"}
    extra = {k: v for k, v in manifest.items() if k not in reserved}
    extra["trained_from"] = str(init_folder)
    if step is not None:
        extra["train_step"] = int(step)
    tok = init_folder / "tokenizer"
    out = save_converted(out_folder, modules, sources=[], dtype=manifest.get("dtype", "float32"),
                         tokenizer_dir=tok if tok.is_dir() else None, extra=extra)
    if (init_folder / "ram").is_dir():
        shutil.copytree(init_folder / "ram", out / "ram", dirs_exist_ok=True)
    return out


def export_coser(arch, params: dict, tokenizer, out_folder, *, step: int | None = None,
                 scheduler_config: dict | None = None) -> Path:
    """Trained CoSeR networks → a weights folder of `jaxsr convert --coser`'s format.

    arch: a `jaxsr.convert.coser_weights.CoSeRArchitecture`; params: {"unet",
    "controlnet", "vae", "text_encoder", "cognitive"} (host or global arrays: gathered
    here, so call it from every process; process 0 writes); tokenizer: the
    transformers CLIP tokenizer the run used (saved into the folder)."""
    import tempfile

    from jaxsr.convert.coser_weights import MODEL
    from jaxsr.convert.sd2 import SD2_SCHEDULER_CONFIG

    params = gather_to_host(params)
    out_folder = Path(out_folder)
    if jax.process_index() != 0:
        return out_folder
    configs = arch.module_configs()
    modules = {name: (configs[name], params[name]) for name in configs}
    extra = {"model": MODEL, "scheduler_config": dict(scheduler_config or SD2_SCHEDULER_CONFIG),
             "part_sources": {name: "jaxsr training" for name in configs}}
    if step is not None:
        extra["train_step"] = int(step)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return save_converted(out_folder, modules, sources=[], tokenizer_dir=tmp, extra=extra)
