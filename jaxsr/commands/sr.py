"""`jaxsr sr`: super-resolve image files with SeeSR or CoSeR (4x, or --upscale N).

    jaxsr sr INPUT... --weights DIR --output DIR [options]
    jaxsr sr INPUT... --model coser --weights DIR --output DIR --save-reference

INPUT: image files, folders (their files; subfolders with --recursive) or glob
patterns. WEIGHTS: a folder written by `jaxsr convert --sd ... --seesr ... --ram ...
--dape ...` (SeeSR) or `jaxsr convert --coser ... --qformer ... --sd ...` (CoSeR);
--model defaults to the folder's. Every input is written as <output>/<stem>.png;
inputs sharing a stem keep their extension (a.jpg.png, a.png.png). With CoSeR,
--save-reference also writes the reference image CoSeR generated as
<output>/reference/<stem>.png (none in tiled mode, which generates none). With
--sample-times K every input gets K outputs, <stem>-s0.png ... <stem>-s{K-1}.png
(0-based, as test_seesr.py's sample00, sample01, ... folders), each its own output
with its own random stream. With SeeSR, --save-prompts writes the positive prompt
used beside each output (<stem>.txt, test_seesr.py's txt/<stem>.txt). An output that
already exists is skipped unless --overwrite, so an interrupted run resumes where it
stopped, output by output.

SeeSR results depend on the seed, the output name and the device count only: an
input draws its noise from fold_in(key(seed), crc32(output file name)), whatever the
batching and whatever other inputs the run has. CoSeR reseeds before every image as
its scripts do (default seed 2887): every input draws from key(seed); only with
--sample-times > 1 does each output draw from fold_in(key(seed), crc32(output name)),
as SeeSR's, so that the samples differ. Images are grouped by processed size, so each
size compiles once.

With several JAX processes (--coordinator/--num-processes/--process-id, or
--distributed on a detected cluster), process p of n takes inputs p, p+n, p+2n, ...
of the sorted list and uses its local devices; the outputs are the single-process
ones, since an input's noise does not depend on which process runs it.

Exit status: 0 when every input has its output (written now or before), 1 when
some input failed (each failure is one line on stderr naming the file), 2 for a
usage error or an unusable weights folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jaxsr.data.image_io import ImageError, load_image, save_image
from jaxsr.inference.inputs import discover, for_process, plan_jobs, read_size, split_done
from jaxsr.inference.progress import Progress, format_summary
from jaxsr.parallel import distributed

EXIT_FAILED = 1
SAMPLERS = ("ddpm", "ddim", "dpmpp")
COLOR_FIXES = ("adain", "wavelet", "none")
MODELS = ("seesr", "coser")
DEFAULT_SEED = {"seesr": 0, "coser": 2887}
REFERENCE_FOLDER = "reference"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def default_compile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxsr", "xla")


def register(sub) -> None:
    p = sub.add_parser("sr", help="super-resolve images with SeeSR or CoSeR",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders or glob patterns")
    p.add_argument("--weights", required=True, type=Path,
                   help="weights folder (from `jaxsr convert --seesr ...` or `--coser ...`)")
    p.add_argument("--model", choices=MODELS,
                   help="the model to run (default: the weights folder's)")
    p.add_argument("--output", required=True, type=Path, help="folder for the PNG results")
    p.add_argument("--recursive", action="store_true",
                   help="take the files of subfolders too (and let ** span folders in globs)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose output exists (default: skip them)")

    s = p.add_argument_group("sampling (defaults: the released test_seesr.py's, or "
                             "CoSeR's scripts/inference.py's)")
    s.add_argument("--turbo", action="store_true",
                   help="SeeSR's sd-turbo settings (2 steps, no guidance, trailing timesteps, "
                        "tile overlap 32) for weights converted with --unet-from-sd; the "
                        "options below still override them")
    s.add_argument("--steps", type=_positive_int, help="denoising steps (default 50)")
    s.add_argument("--sampler", choices=SAMPLERS, help="SeeSR: default ddpm")
    s.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale; 1 turns guidance off "
                        "(default SeeSR 5.5, CoSeR 3.0)")
    s.add_argument("--seed", type=int, help="random seed (default SeeSR 0, CoSeR 2887)")
    s.add_argument("--color-fix", choices=COLOR_FIXES,
                   help="default SeeSR adain, CoSeR none")
    s.add_argument("--prompt", help="user prompt (SeeSR: inserted after the DAPE tags; "
                   "default empty)")
    s.add_argument("--added-prompt", help="appended to the prompt "
                   "(default 'clean, high-resolution, 8k')")
    s.add_argument("--negative-prompt",
                   help="default SeeSR's 'dotted, noise, blur, lowres, smooth' or CoSeR's list")
    s.add_argument("--process-size", type=_positive_int,
                   help="inputs with a side below process_size // upscale are enlarged first "
                        "(default 512)")
    s.add_argument("--upscale", type=_positive_int,
                   help="output scale N, the scripts' --upscale (default 4). SeeSR: the input "
                        "is enlarged N times (after the process-size enlargement) and the "
                        "result resized to N times the input. CoSeR: reference mode samples "
                        "at N times the (padded) input, as inference.py; tiled mode enlarges "
                        "by max(input_size / short side, N), as inference_tile.py")
    s.add_argument("--sample-times", type=_positive_int, default=1,
                   help="K outputs per input (test_seesr.py's --sample_times), written as "
                        "<stem>-s0.png ... <stem>-s{K-1}.png, each from its own random "
                        "stream (default 1: <stem>.png)")
    s.add_argument("--conditioning-scale", type=float,
                   help="SeeSR: the ControlNet residuals' scale (test_seesr.py's "
                        "--conditioning_scale, default 1.0)")
    s.add_argument("--start-steps", type=int,
                   help="SeeSR: the timestep the LR latent is noised to; the steps at t above "
                        "it are skipped (pipeline_seesr.py's start_steps; default 999, which "
                        "skips none)")
    s.add_argument("--start-point", choices=("lr", "noise"),
                   help="SeeSR: start from the noised LR latent (lr, default) or from pure "
                        "noise, without encoding the LR (test_seesr.py's --start_point)")
    s.add_argument("--save-prompts", action="store_true",
                   help="SeeSR: write the positive prompt used (DAPE tags + prompt + added "
                        "prompt) beside each output as <stem>.txt (test_seesr.py's "
                        "--save_prompts)")

    c = p.add_argument_group("CoSeR")
    c.add_argument("--reference-guidance", type=float,
                   help="guidance scale of the reference generation (default 3.0)")
    c.add_argument("--decoder", choices=("auto", "cfw", "vae"),
                   help="CFW decoder when the weights have it (auto, default) or the plain VAE")
    c.add_argument("--fusion-weight", type=float, help="CFW fusion weight w (default 0.5)")
    c.add_argument("--mode", choices=("auto", "reference", "tiled"),
                   help="reference: generate a reference then super-resolve (inference.py); "
                        "tiled: latent tiles and a gray reference (inference_tile.py); auto "
                        "(default): tiled above a 512x512 output")
    c.add_argument("--save-reference", action="store_true",
                   help="also write the generated reference image to OUTPUT/reference/")
    c.add_argument("--input-size", type=_positive_int,
                   help="tiled mode: the short side is enlarged to this (inference_tile.py's "
                        "--input_size, default 512; the script also takes input_size / 8 as "
                        "its latent tile, here --latent-tile)")
    c.add_argument("--patch-size", type=_positive_int,
                   help="tiled mode: pixel patch side, a multiple of 32 (inference_tile.py's "
                        "--vqgantile_size, default 1280)")
    c.add_argument("--patch-stride", type=_positive_int,
                   help="tiled mode: pixel stride between patches (inference_tile.py's "
                        "--vqgantile_stride, default 1000)")
    c.add_argument("--tiled-padding", choices=("exact", "script"),
                   help="tiled mode: exact (default) pads the enlarged image to the next "
                        "multiple of 32 and ends at exactly N times the input; script does "
                        "as inference_tile.py: a side already a multiple of 32 is padded by "
                        "32 more when the other is not, and the final resize is sized from "
                        "the padded image (a 50x70 input gives 212x287, not 200x280)")

    t = p.add_argument_group("tiling (bounds memory on large images)")
    t.add_argument("--latent-tile", type=_positive_int,
                   help="latent tile side; SeeSR tiles above tile^2 latent pixels "
                        "(default SeeSR 96, CoSeR 64)")
    t.add_argument("--latent-tile-overlap", type=int, help="default SeeSR 4, CoSeR 32")
    t.add_argument("--vae-encoder-tile", type=_positive_int, help="pixels (default 1024)")
    t.add_argument("--vae-decoder-tile", type=_positive_int, help="latent pixels (default 224)")

    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=_positive_int,
                   help="images per compiled call (default: the number of devices, over "
                        "--spatial-shards)")
    r.add_argument("--devices", type=_positive_int,
                   help="use the first N local devices (default: all)")
    r.add_argument("--spatial-shards", type=_positive_int, default=1,
                   help="SeeSR: split each image's height over N of the devices (the "
                        "rest split the batch), an alternative to latent tiling for large "
                        "outputs; raise --latent-tile to run untiled")
    r.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype of the UNet, ControlNet and text encoder, which also "
                        "hold their weights in it; auto (default): bfloat16 on GPUs, TPUs "
                        "and CPUs with native bfloat16 (AVX512_BF16, AMX, ARM BF16), float32 "
                        "on other CPUs, where bfloat16 is emulated and slower. The VAE, DAPE "
                        "and the cognitive encoder run in float32. CoSeR's released "
                        "precision is float32: its hard reference attention's argmax is "
                        "sensitive to rounding")
    r.add_argument("--attention", default="auto", choices=("auto", "xla", "dpa", "cudnn"),
                   help="attention kernel (default auto)")
    r.add_argument("--compile-cache", metavar="DIR",
                   help="persistent XLA compilation cache (default $JAX_COMPILATION_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/jaxsr/xla or ~/.cache/jaxsr/xla; '' turns it off)")
    distributed.add_arguments(p)
    p.set_defaults(run=run)


# argparse destination -> SeeSROptions field; only the options given are passed, so
# the pipeline's defaults stay the single source of truth.
_OPTION_FIELDS = {
    "steps": "steps", "sampler": "sampler", "guidance": "guidance_scale",
    "color_fix": "color_fix", "prompt": "prompt", "added_prompt": "added_prompt",
    "negative_prompt": "negative_prompt", "process_size": "process_size",
    "latent_tile": "latent_tile", "latent_tile_overlap": "latent_tile_overlap",
    "vae_encoder_tile": "vae_encoder_tile", "vae_decoder_tile": "vae_decoder_tile",
    "upscale": "upscale", "conditioning_scale": "conditioning_scale",
    "start_steps": "start_timestep", "start_point": "start_point",
}


# The same for CoSeROptions.
_COSER_FIELDS = {
    "steps": "steps", "guidance": "guidance_scale",
    "reference_guidance": "reference_guidance_scale", "color_fix": "color_fix",
    "prompt": "prompt", "negative_prompt": "negative_prompt", "decoder": "decoder",
    "fusion_weight": "fusion_weight", "mode": "mode", "latent_tile": "latent_tile",
    "latent_tile_overlap": "latent_tile_overlap", "upscale": "upscale",
    "input_size": "input_size", "patch_size": "patch_size", "patch_stride": "patch_stride",
    "tiled_padding": "tiled_padding",
}
_SEESR_ONLY = ("turbo", "sampler", "added_prompt", "process_size", "vae_encoder_tile",
               "vae_decoder_tile", "conditioning_scale", "start_steps", "start_point",
               "save_prompts")
_COSER_ONLY = ("reference_guidance", "decoder", "fusion_weight", "mode", "save_reference",
               "input_size", "patch_size", "patch_stride", "tiled_padding")


def _given(args, dest: str) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value is not False


def build_options(args, model: str = "seesr"):
    """The pipeline options from the flags; flags of the other model are refused."""
    other = _COSER_ONLY if model == "seesr" else _SEESR_ONLY
    wrong = [f"--{d.replace('_', '-')}" for d in other if _given(args, d)]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not an option of {model}")
    if model == "coser":
        from jaxsr.pipelines.coser import CoSeROptions

        return CoSeROptions(**{field: getattr(args, dest) for dest, field in
                               _COSER_FIELDS.items() if getattr(args, dest) is not None})
    from jaxsr.pipelines.seesr import SeeSROptions

    given = {field: getattr(args, dest) for dest, field in _OPTION_FIELDS.items()
             if getattr(args, dest) is not None}
    # ValueError (exit 2) on inconsistent values.
    return SeeSROptions.sd_turbo(**given) if args.turbo else SeeSROptions(**given)


def weights_model(folder: Path) -> str:
    """The model a weights folder holds ("seesr" or "coser"); ValueError otherwise."""
    from jaxsr.convert.cache import read_manifest

    model = read_manifest(folder).get("model")
    if model not in MODELS:
        raise ValueError(f"{folder} holds {model or 'SD2'!r} weights, not SeeSR's or CoSeR's; "
                         "convert with --seesr ... or --coser ...")
    return model


def configure_compile_cache(folder: str | None) -> Path | None:
    """Point JAX's persistent compilation cache at `folder` (None: the default, '': off).

    Only programs that took at least a second to compile are stored: SeeSR's sampling
    loop takes far longer, while small helper programs would only fill the folder.
    """
    import jax

    if folder == "":
        return None
    if folder is None:
        folder = jax.config.values.get("jax_compilation_cache_dir") or default_compile_cache()
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def _fail(message: str) -> None:
    print(f"failed: {message}", file=sys.stderr, flush=True)


def _load_pipeline(args, model: str):
    import jax

    devices = jax.local_devices()
    if args.devices is not None:
        if args.devices > len(devices):
            raise ValueError(f"--devices {args.devices}: only {len(devices)} local devices")
        devices = devices[:args.devices]
    if model == "coser":
        from jaxsr.pipelines.coser import CoSeRPipeline as Pipeline
    else:
        from jaxsr.pipelines.seesr import SeeSRPipeline as Pipeline
    extra = {}
    if args.spatial_shards != 1:
        if model == "coser":
            raise ValueError("--spatial-shards is for SeeSR; CoSeR tiles its latents")
        extra["spatial_shards"] = args.spatial_shards
    try:
        return Pipeline.from_pretrained(args.weights, dtype=args.dtype,
                                        attention=args.attention, devices=devices, **extra)
    except KeyError as e:          # a manifest naming a module whose files are gone
        raise ValueError(f"{args.weights} is incomplete ({e}); run `jaxsr convert` again") \
            from None


def _save_prompt(path: Path, prompt: str) -> None:
    """The prompt file, written before its image so that a run stopped in between
    redoes both: exactly the prompt, no newline (as test_seesr.py writes it)."""
    try:
        path.write_text(prompt, encoding="utf-8")
    except OSError as e:
        raise ImageError(f"{path}: cannot write ({e})") from e


def _out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def run(args) -> int:
    started = time.monotonic()
    distributed.settings(args)             # incomplete multi-process flags: say so first
    model = weights_model(args.weights)
    if args.model is not None and args.model != model:
        raise ValueError(f"--model {args.model}, but {args.weights} holds {model} weights")
    options = build_options(args, model)
    if args.seed is None:
        args.seed = DEFAULT_SEED[model]
    distributed.initialize(args)           # before any JAX backend starts
    import jax

    found = discover(args.inputs, recursive=args.recursive, output_dir=args.output)
    failed = 0
    for spec in found.missing:
        _fail(f"{spec}: no such file or folder")
        failed += 1
    if found.in_output:
        print(f"note: ignoring {found.in_output} input(s) inside the output folder {args.output}",
              file=sys.stderr)
    if not found.files and not found.missing:
        print("note: no input files found", file=sys.stderr)
    jobs = for_process(plan_jobs(found.files, args.output, samples=args.sample_times),
                       jax.process_index(), jax.process_count())
    todo, done = split_done(jobs, args.overwrite)
    if done:
        print(f"skipping {len(done)} output(s) that exist in {args.output} "
              "(--overwrite redoes them)", file=sys.stderr)
    sized, sizes = [], {}         # header pass: sizes only, nothing decoded yet
    for job in todo:
        if job.source not in sizes:      # several samples of one input: read it once
            try:
                sizes[job.source] = read_size(job.source)
            except ImageError as e:
                sizes[job.source] = None
                _fail(str(e))
        if sizes[job.source] is None:
            failed += 1
        else:
            sized.append((job, sizes[job.source]))
    written = 0
    if sized:
        configure_compile_cache(args.compile_cache)
        pipe = _load_pipeline(args, model)
        args.output.mkdir(parents=True, exist_ok=True)
        written, n_failed = _process(pipe, sized, options, args, model)
        failed += n_failed
    summary = format_summary(written, len(done), failed, time.monotonic() - started)
    if jax.process_count() > 1:
        summary = f"process {jax.process_index()}/{jax.process_count()}: {summary}"
    print(summary, flush=True)
    return EXIT_FAILED if failed else 0


def _upscale(pipe, model: str, images, chunk, options, args):
    """-> (SR images, reference images or Nones, positive prompts or Nones) of one batch."""
    if model == "coser":
        # One output per input: key(seed) for every image, as the scripts. Several
        # samples: each output name's stream, or they would all be the same image.
        ids = [j.stream for j in chunk] if args.sample_times > 1 else None
        results, references = pipe.upscale(images, options=options, seed=args.seed, ids=ids,
                                           batch_size=len(chunk), return_references=True)
        return results, references, [None] * len(results)
    results, prompts = pipe.upscale(images, options=options, seed=args.seed,
                                    ids=[j.stream for j in chunk], batch_size=len(chunk),
                                    return_prompts=True)
    return results, [None] * len(results), prompts


def _process(pipe, sized, options, args, model: str = "seesr") -> tuple[int, int]:
    """Batches of one size bucket each, decoded one batch at a time; returns
    (written, failed)."""
    buckets: dict[tuple[int, int], list] = {}     # insertion order = first input's order
    for job, size in sized:
        buckets.setdefault(pipe.bucket_key(size, options), []).append(job)
    batch_size = args.batch_size or pipe.batch_multiple
    progress = Progress(len(sized))
    written = failed = 0
    for key, members in buckets.items():
        height, width = key[-2:]            # SeeSR: (H, W); CoSeR: (mode, H, W)
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            chunk, images, loaded = [], [], {}
            for job in batch:
                try:
                    if job.source not in loaded:      # the samples of an input share it
                        loaded[job.source] = load_image(job.source)
                    images.append(loaded[job.source])
                    chunk.append(job)
                except ImageError as e:
                    _fail(str(e))
                    failed += 1
            results, references, prompts = [], [], []
            if chunk:
                try:
                    results, references, prompts = _upscale(pipe, model, images, chunk,
                                                            options, args)
                except Exception as e:                   # noqa: BLE001 - reported per file
                    if not _out_of_memory(e):
                        raise
                    for job in chunk:
                        _fail(f"{job.source}: out of device memory at {width}x{height} "
                              "(try --batch-size 1 or smaller tiles)")
                    failed += len(chunk)
            for job, image, reference, prompt in zip(chunk, results, references, prompts):
                try:
                    if reference is not None and getattr(args, "save_reference", False):
                        folder = job.output.parent / REFERENCE_FOLDER
                        folder.mkdir(exist_ok=True)
                        save_image(folder / job.output.name, reference)
                    if prompt is not None and getattr(args, "save_prompts", False):
                        _save_prompt(job.output.with_suffix(".txt"), prompt)
                    save_image(job.output, image)   # last: its presence marks the output done
                    written += 1
                except ImageError as e:
                    _fail(f"{job.source}: {e}")
                    failed += 1
            progress.advance(len(batch), note=f"batch of {len(chunk)} at {width}x{height}")
    return written, failed
