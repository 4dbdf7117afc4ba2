"""`jaxsr convert`: released PyTorch checkpoints -> a jaxsr weights folder.

    jaxsr convert --sd SD2 --output DIR
    jaxsr convert --sd SD2 --seesr SEESR_DIR --ram RAM.pth --dape DAPE.pth --output DIR
    jaxsr convert --coser CoSeR.ckpt --qformer QF.ckpt --sd v2-1_512-ema-pruned.ckpt \\
        [--cfw vqgan_cfw_00011.ckpt] [--open-clip open_clip_pytorch_model.bin] \\
        [--tokenizer SD21/tokenizer] --output DIR
    jaxsr convert --metric lpips --from alexnet-owt-7be5be79.pth alex.pth --output METRIC_DIR

The output folder holds the converted Flax parameters and a manifest (sources,
hashes, dtypes, configs); `jaxsr sr --weights DIR` and the Python API read it
without torch and without conversion.

Every path may also be a Hugging Face Hub id, `org/name[/path/in/repo]` (when no
such local path exists): e.g. `--sd stabilityai/stable-diffusion-2-base`. Only the
files the converter reads are fetched, through the user's HF cache and token;
HF_HUB_OFFLINE=1 uses the cache alone. --revision picks a branch, tag or commit; the
manifest records each repo id, revision and commit (jaxsr.hub).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert released PyTorch weights to a jaxsr folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", type=Path,
                   help="Stable Diffusion 2 base: a diffusers folder or a single-file "
                        ".ckpt/.safetensors")
    p.add_argument("--seesr", type=Path,
                   help="SeeSR release folder with unet/ and controlnet/ (needs --ram)")
    p.add_argument("--ram", type=Path, help="RAM checkpoint ram_swin_large_14m.pth")
    p.add_argument("--dape", type=Path, help="DAPE LoRA checkpoint DAPE.pth")
    p.add_argument("--tags", type=Path,
                   help="RAM tag list (default: ram_tag_list.txt beside --ram)")
    p.add_argument("--thresholds", type=Path,
                   help="RAM per-class thresholds (default: ram_tag_list_threshold.txt "
                        "beside --ram)")
    p.add_argument("--unet-from-sd", action="store_true",
                   help="SeeSR's sd-turbo mode: the UNet is --sd's (e.g. sd-turbo) with only "
                        "the RCA blocks taken from SeeSR's unet/")
    c = p.add_argument_group("CoSeR (instead of --seesr)")
    c.add_argument("--coser", type=Path, help="CoSeR checkpoint (Lightning .ckpt, stage 2)")
    c.add_argument("--qformer", type=Path,
                   help="CoSeR stage-1 checkpoint (cognitive encoder: Q-Former + SRResNet)")
    c.add_argument("--cfw", type=Path,
                   help="StableSR's CFW autoencoder vqgan_cfw_00011.ckpt (optional decoder)")
    c.add_argument("--open-clip", type=Path,
                   help="open_clip ViT-H-14 laion2b_s32b_b79k weights; only needed when no "
                        "CoSeR checkpoint holds the vision tower")
    c.add_argument("--tokenizer", type=Path,
                   help="CLIP tokenizer folder (vocab.json, merges.txt), e.g. SD 2.1-base's "
                        "tokenizer/ (default: --sd's when it is a diffusers folder)")
    c.add_argument("--config", metavar="FILE.py[:VARIANT]",
                   help="CoSeR architecture config (default: the released sizes, "
                        "configs/coser.py); e.g. configs/coser.py:tiny")
    p.add_argument("--output", required=True, type=Path, help="folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the converted weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--revision",
                   help="branch, tag or commit of every Hugging Face Hub id given (default main)")
    m = p.add_argument_group("image-quality metric weights (instead of the models above)")
    m.add_argument("--metric", metavar="NAME",
                   help="a `jaxsr eval` metric (lpips, lpips-vgg, dists, fid, niqe, musiq, "
                        "maniqa, clipiqa): writes OUTPUT/NAME/, so one OUTPUT folder holds every "
                        "metric's weights")
    m.add_argument("--from", dest="metric_from", nargs="+", type=Path, metavar="FILE",
                   help="the metric's released weight file(s), e.g. for lpips "
                        "alexnet-owt-7be5be79.pth alex.pth")
    p.set_defaults(run=run)


# option -> the kind of source jaxsr.hub fetches for a hub id given there.
_HUB_KINDS = {"sd": "sd", "seesr": "seesr", "ram": "file", "dape": "file", "tags": "file",
              "thresholds": "file", "coser": "file", "qformer": "file", "cfw": "file",
              "open_clip": "file", "tokenizer": "tokenizer"}


def _resolve_hub_ids(args) -> dict:
    """Replace each hub id among the path options by its local snapshot path;
    returns {option: HubSource} for the manifest."""
    from jaxsr.hub import resolve_weights
    from jaxsr.models.tags import TAG_LIST_FILE, THRESHOLD_FILE

    found = {}
    for dest, kind in _HUB_KINDS.items():
        siblings = (TAG_LIST_FILE, THRESHOLD_FILE) if dest == "ram" else ()
        local, source = resolve_weights(getattr(args, dest, None), kind,
                                        revision=args.revision, siblings=siblings)
        if source is not None:
            setattr(args, dest, local)
            found[dest] = source
    if args.revision is not None and not found:
        raise ValueError("--revision is for Hugging Face Hub ids; every path given is local")
    return found


def _count(params) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _run_metric(args) -> int:
    """`--metric NAME --from FILE ...`: OUTPUT/NAME/ holding the one module NAME."""
    from jaxsr.convert.cache import save_converted
    from jaxsr.metrics.registry import convert_metric

    given = [o for o, v in (("--sd", args.sd), ("--seesr", args.seesr), ("--coser", args.coser))
             if v is not None]
    if given:
        raise ValueError(f"--metric converts metric weights only; drop {', '.join(given)}")
    if not args.metric_from:
        raise ValueError(f"--metric {args.metric} needs --from FILE [FILE ...]")
    for f in args.metric_from:
        if not f.is_file():
            raise FileNotFoundError(f"--from {f}: no such file")
    out: Path = args.output / args.metric
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    config, params = convert_metric(args.metric, args.metric_from)
    save_converted(out, {args.metric: (config, params)}, sources=args.metric_from,
                   dtype=args.dtype)
    print(f"converted {args.metric} -> {out}  ({_count(params):,d} parameters, {config})")
    sys.stdout.flush()
    return 0


def run(args) -> int:
    if args.metric is not None:
        return _run_metric(args)
    if args.metric_from:
        raise ValueError("--from goes with --metric NAME")
    if args.sd is None:
        raise ValueError("--sd is required (or --metric NAME --from FILE ... for metric "
                         "weights)")
    from jaxsr.hub import record_in_manifest

    hub = _resolve_hub_ids(args)
    code = _convert(args)
    if code == 0:
        record_in_manifest(args.output, hub)
    return code


def _convert(args) -> int:
    from jaxsr.convert.cache import save_converted
    from jaxsr.convert.sd2 import load_sd2, sd2_modules

    out: Path = args.output
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    coser = (args.coser, args.qformer, args.cfw, args.open_clip, args.config, args.tokenizer)
    if any(x is not None for x in coser):
        if args.seesr is not None or args.ram is not None or args.dape is not None:
            raise ValueError("--coser and --seesr/--ram/--dape convert different models; "
                             "give one set")
        return _run_coser(args)
    if args.seesr is not None or args.ram is not None or args.dape is not None:
        return _run_seesr(args)
    if args.unet_from_sd:
        raise ValueError("--unet-from-sd needs --seesr (it takes the RCA blocks from there)")
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


def _run_seesr(args) -> int:
    from jaxsr.convert.cache import read_manifest
    from jaxsr.convert.seesr_weights import convert_seesr

    if args.seesr is None or args.ram is None:
        raise ValueError("SeeSR needs --seesr (unet/ and controlnet/) and --ram (the RAM "
                         "checkpoint DAPE's LoRA applies to); --dape adds the LoRA")
    out = convert_seesr(sd=args.sd, seesr=args.seesr, ram=args.ram, dape=args.dape,
                        output=args.output, tags=args.tags, thresholds=args.thresholds,
                        dtype=args.dtype, unet_from_sd=args.unet_from_sd)
    print(f"converted SeeSR -> {out}")
    for name, entry in read_manifest(out)["modules"].items():
        print(f"  {name:<14} {entry['parameters']:>13,d} parameters  ({args.dtype})")
    return 0


def _run_coser(args) -> int:
    from jaxsr.convert.cache import read_manifest
    from jaxsr.convert.coser_weights import RELEASED, CoSeRArchitecture, convert_coser

    if args.coser is None or args.qformer is None:
        raise ValueError("CoSeR needs --coser (the stage-2 checkpoint) and --qformer (the "
                         "stage-1 cognitive-encoder checkpoint), with --sd (SD 2.1-base)")
    if args.unet_from_sd:
        raise ValueError("--unet-from-sd is a SeeSR option")
    arch = RELEASED
    if args.config is not None:
        from jaxsr.train.config_file import load_config

        arch = CoSeRArchitecture.from_config(load_config(args.config))
    out = convert_coser(coser=args.coser, qformer=args.qformer, sd=args.sd, cfw=args.cfw,
                        open_clip=args.open_clip, tokenizer=args.tokenizer,
                        output=args.output, arch=arch, dtype=args.dtype)
    print(f"converted CoSeR -> {out}")
    for name, entry in read_manifest(out)["modules"].items():
        print(f"  {name:<14} {entry['parameters']:>13,d} parameters  ({args.dtype})")
    sys.stdout.flush()
    return 0
