"""`jaxsr convert`: released PyTorch checkpoints -> a jaxsr weights folder.

    jaxsr convert --sd SD2 --output DIR
    jaxsr convert --sd SD2 --seesr SEESR_DIR --ram RAM.pth --dape DAPE.pth --output DIR

The output folder holds the converted Flax parameters and a manifest (sources,
hashes, dtypes, configs); `jaxsr sr --weights DIR` and the Python API read it
without torch and without conversion.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert released PyTorch weights to a jaxsr folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", required=True, type=Path,
                   help="Stable Diffusion 2 base: a diffusers folder or a single-file "
                        ".ckpt/.safetensors")
    p.add_argument("--output", required=True, type=Path, help="folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the converted weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(run=run)


def _count(params) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def run(args) -> int:
    from jaxsr.convert.cache import save_converted
    from jaxsr.convert.sd2 import load_sd2, sd2_modules

    out: Path = args.output
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    weights = load_sd2(args.sd)
    modules = sd2_modules(weights)
    save_converted(out, modules, sources=weights.sources, dtype=args.dtype,
                   tokenizer_dir=weights.tokenizer_dir,
                   extra={"scheduler_config": weights.scheduler_config})
    print(f"converted {args.sd} -> {out}")
    for name, (_, params) in modules.items():
        print(f"  {name:<14} {_count(params):>13,d} parameters  ({args.dtype})")
    if weights.tokenizer_dir is None:
        print("  note: the source has no tokenizer/ folder; pass one to the pipelines")
    sys.stdout.flush()
    return 0
