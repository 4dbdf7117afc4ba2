"""`jaxsr quickstart`: train the tiny SeeSR end to end on built-in photos, then use it.

    jaxsr quickstart --workdir quickstart/

Everything a real run does, at laptop scale and with no download:
1. sample photos that ship inside an installed package → DIR/data/train (one held out);
2. tiny random SeeSR weights (configs/seesr_train.py "tiny") → DIR/init_weights;
3. `jaxsr train`'s loop: TFDS folder source → grain → on-device degradation → sharded
   train step → orbax checkpoints, in DIR/train (metrics.jsonl, tensorboard/);
   with sample SR images of the held-out photo half-way and at the end (train/samples/);
4. the trained ControlNet + RCA blocks → DIR/weights (the format `jaxsr sr` reads);
5. the held-out photo, degraded like the training data, super-resolved with DIR/weights:
   DIR/comparison.png (LR | SR | HR) and DIR/metrics.json (PSNR, SSIM, LPIPS with
   --metric-weights, losses).

The networks are tiny and train for a few dozen steps, so the SR image is not good;
what the run shows is that every stage works and that the loss falls. Run it again to
resume training where it stopped (raise --steps to train longer).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="train tiny SeeSR on built-in photos, then use it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("quickstart"),
                   help="everything goes here (default quickstart/)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--sr-steps", type=int, default=20,
                   help="denoising steps for the held-out image (default 20)")
    p.add_argument("--metric-weights", type=Path, default=None,
                   help="a `jaxsr convert --metric` folder: adds LPIPS to metrics.json and "
                        "to the held-out evaluation during training")
    p.set_defaults(run=run, accepts_config_overrides=True)


QUICKSTART_METRICS = ("psnr", "ssim", "lpips")


def image_metrics(sr: np.ndarray, hr: np.ndarray, metric_weights=None) -> dict:
    """PSNR, SSIM (BasicSR's, RGB) and, with converted weights, LPIPS of one uint8
    image pair; metrics left out for want of weights are named under "notes"."""
    from jaxsr.metrics.registry import HeldOutMetrics

    notes = []
    scores = HeldOutMetrics(QUICKSTART_METRICS, metric_weights, note=notes.append)(
        sr[None], hr[None])
    return {**scores, **({"notes": notes} if notes else {})}


def run(args) -> int:
    import jax

    from configs import seesr_train
    from jaxsr.data.image_io import load_image, save_image
    from jaxsr.data.samples import sample_image_folder
    from jaxsr.demo import write_random_seesr
    from jaxsr.pipelines.seesr import SeeSROptions, SeeSRPipeline
    from jaxsr.train.config_file import apply_override
    from jaxsr.train.export import export_seesr
    from jaxsr.train.held_out import comparison_strip, held_out_pair
    from jaxsr.train.seesr_trainer import train

    started = time.monotonic()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    train_dir, held_out = sample_image_folder(work / "data" / "samples")
    print(f"training photos in {train_dir}; held out: {held_out.name}", flush=True)

    config = seesr_train.get_config("tiny")
    init = work / "init_weights"
    if not (init / "manifest.json").is_file():
        write_random_seesr(init, config.model, seed=config.seed)
    config.init.weights = str(init)
    config.data.source = f"folder:{train_dir}"
    config.data.data_dir = str(work / "data" / "tfds")
    config.total_steps = args.steps
    config.checkpoint_every = max(args.steps // 2, 1)
    config.log_every = 1          # every step's loss, for the before/after comparison
    # Sample images of the held-out photo half-way and at the end (DIR/train/samples).
    config.samples.every = max(args.steps // 2, 1)
    config.samples.source = str(held_out.parent)
    config.samples.count = 1
    config.samples.steps = args.sr_steps
    # Held-out PSNR/SSIM at the same steps (metrics.jsonl rows with eval/psnr, eval/ssim).
    config.eval.every = config.samples.every
    config.eval.source = config.samples.source
    config.eval.count = 1
    config.eval.steps = args.sr_steps
    config.eval.metrics = "psnr,ssim,lpips" if args.metric_weights else "psnr,ssim"
    config.eval.metric_weights = str(args.metric_weights or "")
    for item in getattr(args, "config_overrides", []):
        apply_override(config, item)
    result = train(config, work / "train")
    if result.status:
        return result.status

    weights = export_seesr(init, result.state.params, work / "weights", step=result.step)
    rows = [json.loads(s) for s in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}   # not the eval/* rows
    steps = sorted(losses)
    k = max(len(steps) // 4, 1)
    first = float(np.mean([losses[s] for s in steps[:k]]))
    last = float(np.mean([losses[s] for s in steps[-k:]]))

    lr, hr = held_out_pair(load_image(held_out), 128, config.degradation, config.seed)
    pipe = SeeSRPipeline.from_pretrained(weights, dtype=config.model.dtype)
    options = SeeSROptions(steps=args.sr_steps, process_size=128)
    [sr] = pipe.upscale([lr], options=options, seed=config.seed)
    save_image(work / "comparison.png", comparison_strip(lr, sr, hr))
    report = {"train_steps": result.step, "loss_first_quarter": first,
              "loss_last_quarter": last, **image_metrics(sr, hr, args.metric_weights),
              "held_out": held_out.name, "sr_steps": args.sr_steps,
              "devices": jax.device_count(), "seconds": time.monotonic() - started}
    (work / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    print(f"wrote {work / 'comparison.png'} (LR | SR | HR) and {work / 'metrics.json'}")
    return 0
