"""`jaxsr sr`: super-resolve image files with SeeSR (4x).

    jaxsr sr INPUT... --weights DIR --output DIR [options]

INPUT: image files, folders (their files; subfolders with --recursive) or glob
patterns. WEIGHTS: a folder written by `jaxsr convert --sd ... --seesr ... --ram ...
--dape ...`. Every input is written as <output>/<stem>.png; inputs sharing a stem
keep their extension (a.jpg.png, a.png.png). An input whose output already exists
is skipped unless --overwrite, so an interrupted run resumes where it stopped.

Results depend on the seed, the output name and the device count only: an input
draws its noise from fold_in(key(seed), crc32(output file name)), whatever the
batching and whatever other inputs the run has. Images are grouped by processed
size, so each size compiles once.

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def default_compile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxsr", "xla")


def register(sub) -> None:
    p = sub.add_parser("sr", help="super-resolve images with SeeSR",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders or glob patterns")
    p.add_argument("--weights", required=True, type=Path,
                   help="SeeSR weights folder (from `jaxsr convert --seesr ...`)")
    p.add_argument("--output", required=True, type=Path, help="folder for the PNG results")
    p.add_argument("--recursive", action="store_true",
                   help="take the files of subfolders too (and let ** span folders in globs)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose output exists (default: skip them)")

    s = p.add_argument_group("sampling (defaults: the released test_seesr.py's)")
    s.add_argument("--turbo", action="store_true",
                   help="SeeSR's sd-turbo settings (2 steps, no guidance, trailing timesteps, "
                        "tile overlap 32) for weights converted with --unet-from-sd; the "
                        "options below still override them")
    s.add_argument("--steps", type=_positive_int, help="denoising steps (default 50)")
    s.add_argument("--sampler", choices=SAMPLERS, help="default ddpm")
    s.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale; <= 1 turns guidance off (default 5.5)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--color-fix", choices=COLOR_FIXES, help="default adain")
    s.add_argument("--prompt", help="user prompt inserted after the DAPE tags (default empty)")
    s.add_argument("--added-prompt", help="appended to the prompt "
                   "(default 'clean, high-resolution, 8k')")
    s.add_argument("--negative-prompt",
                   help="default 'dotted, noise, blur, lowres, smooth'")
    s.add_argument("--process-size", type=_positive_int,
                   help="inputs with a side below process_size/4 are enlarged first (default 512)")

    t = p.add_argument_group("tiling (bounds memory on large images)")
    t.add_argument("--latent-tile", type=_positive_int,
                   help="latent tile side; tiling starts above tile^2 latent pixels (default 96)")
    t.add_argument("--latent-tile-overlap", type=int, help="default 4")
    t.add_argument("--vae-encoder-tile", type=_positive_int, help="pixels (default 1024)")
    t.add_argument("--vae-decoder-tile", type=_positive_int, help="latent pixels (default 224)")

    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=_positive_int,
                   help="images per compiled call (default: the number of devices)")
    r.add_argument("--devices", type=_positive_int,
                   help="use the first N local devices (default: all)")
    r.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="compute dtype of the UNet, ControlNet and text encoder (default "
                        "bfloat16); the VAE and DAPE run in float32")
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
}


def build_options(args):
    from jaxsr.pipelines.seesr import SeeSROptions

    given = {field: getattr(args, dest) for dest, field in _OPTION_FIELDS.items()
             if getattr(args, dest) is not None}
    # ValueError (exit 2) on inconsistent values.
    return SeeSROptions.sd_turbo(**given) if args.turbo else SeeSROptions(**given)


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


def _load_pipeline(args):
    import jax

    from jaxsr.pipelines.seesr import SeeSRPipeline

    devices = jax.local_devices()
    if args.devices is not None:
        if args.devices > len(devices):
            raise ValueError(f"--devices {args.devices}: only {len(devices)} local devices")
        devices = devices[:args.devices]
    try:
        return SeeSRPipeline.from_pretrained(args.weights, dtype=args.dtype,
                                             attention=args.attention, devices=devices)
    except KeyError as e:          # a manifest naming a module whose files are gone
        raise ValueError(f"{args.weights} is incomplete ({e}); run `jaxsr convert` again") \
            from None


def _out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def run(args) -> int:
    started = time.monotonic()
    options = build_options(args)
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
    jobs = for_process(plan_jobs(found.files, args.output),
                       jax.process_index(), jax.process_count())
    todo, done = split_done(jobs, args.overwrite)
    if done:
        print(f"skipping {len(done)} input(s) whose output exists in {args.output} "
              "(--overwrite redoes them)", file=sys.stderr)
    sized = []                    # header pass: sizes only, nothing decoded yet
    for job in todo:
        try:
            sized.append((job, read_size(job.source)))
        except ImageError as e:
            _fail(str(e))
            failed += 1
    written = 0
    if sized:
        configure_compile_cache(args.compile_cache)
        pipe = _load_pipeline(args)
        args.output.mkdir(parents=True, exist_ok=True)
        written, n_failed = _process(pipe, sized, options, args)
        failed += n_failed
    summary = format_summary(written, len(done), failed, time.monotonic() - started)
    if jax.process_count() > 1:
        summary = f"process {jax.process_index()}/{jax.process_count()}: {summary}"
    print(summary, flush=True)
    return EXIT_FAILED if failed else 0


def _process(pipe, sized, options, args) -> tuple[int, int]:
    """Batches of one size bucket each, decoded one batch at a time; returns
    (written, failed)."""
    buckets: dict[tuple[int, int], list] = {}     # insertion order = first input's order
    for job, size in sized:
        buckets.setdefault(pipe.bucket_key(size, options), []).append(job)
    batch_size = args.batch_size or pipe.num_devices
    progress = Progress(len(sized))
    written = failed = 0
    for (height, width), members in buckets.items():
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            chunk, images = [], []
            for job in batch:
                try:
                    images.append(load_image(job.source))
                    chunk.append(job)
                except ImageError as e:
                    _fail(str(e))
                    failed += 1
            results = []
            if chunk:
                try:
                    results = pipe.upscale(images, options=options, seed=args.seed,
                                           ids=[j.stream for j in chunk],
                                           batch_size=len(chunk))
                except Exception as e:                   # noqa: BLE001 - reported per file
                    if not _out_of_memory(e):
                        raise
                    for job in chunk:
                        _fail(f"{job.source}: out of device memory at {width}x{height} "
                              "(try --batch-size 1 or smaller tiles)")
                    failed += len(chunk)
            for job, image in zip(chunk, results):
                try:
                    save_image(job.output, image)
                    written += 1
                except ImageError as e:
                    _fail(f"{job.source}: {e}")
                    failed += 1
            progress.advance(len(batch), note=f"batch of {len(chunk)} at {width}x{height}")
    return written, failed
