"""`jaxsr eval`: image-quality metrics of a folder of results, as in the SeeSR and CoSeR
papers' tables.

    jaxsr eval SR_DIR --reference HR_DIR --metrics psnr,ssim,lpips \\
        --metric-weights METRIC_DIR --crop-border 4 --y-channel --output REPORT_DIR
    jaxsr eval SR_DIR --metrics niqe --metric-weights METRIC_DIR --output REPORT_DIR
    jaxsr eval SR_DIR --metrics fid --fid-reference STATS.npz --metric-weights METRIC_DIR \\
        --output REPORT_DIR

SR and reference images are paired by file stem (`0801.png` with `0801.png` or
`0801.jpg`). Full-reference metrics (psnr, ssim, lpips, lpips-vgg, dists) need
--reference; no-reference ones (niqe, musiq, maniqa, clipiqa) score the SR images alone; fid
compares the SR folder with the reference folder, or with precomputed statistics
(--fid-reference, an .npz with `mu` and `sigma`). Metrics with weights read them from
--metric-weights DIR, filled by `jaxsr convert --metric NAME --from FILE ... --output DIR`.

Files that cannot be scored (no partner with the same stem, unreadable, a size that
differs from the reference's) are listed with the reason and left out of the means.

Writes REPORT_DIR/per_image.csv (one row per image, one column per metric) and
REPORT_DIR/summary.json (means, counts, skipped files with reasons, options), and prints
the means in the papers' column order.

Exit status: 0 every file scored; 3 some files skipped (the scores of the others are
written); 2 usage error (unknown metric, missing weights, no images, bad options).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

EXIT_SKIPPED = 3


def register(sub) -> None:
    from jaxsr.metrics.registry import METRICS

    by_order = sorted(METRICS.values(), key=lambda s: s.order)
    names = ", ".join(s.name for s in by_order if s.module is not None)
    planned = ", ".join(s.name for s in by_order if s.module is None)
    planned = f" (not in this version: {planned})" if planned else ""
    p = sub.add_parser("eval", help="image-quality metrics (PSNR, SSIM, LPIPS, ...) of a folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sr_dir", type=Path, metavar="SR_DIR", help="folder of images to score")
    p.add_argument("--reference", type=Path, metavar="HR_DIR",
                   help="folder of ground-truth images, paired with SR_DIR's by file stem")
    p.add_argument("--metrics", default="psnr,ssim",
                   help=f"comma-separated metric names (default psnr,ssim): {names}"
                        f"{planned}")
    p.add_argument("--metric-weights", type=Path, metavar="DIR",
                   help="converted metric weights, one subfolder per metric")
    p.add_argument("--crop-border", type=int, default=0,
                   help="pixels left out on every side for psnr/ssim/niqe (commonly the "
                        "scale factor, e.g. 4; default 0)")
    p.add_argument("--y-channel", action="store_true",
                   help="psnr/ssim on the luma (MATLAB rgb2ycbcr's Y) instead of RGB")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per step (rounded up to a multiple of the local devices)")
    p.add_argument("--fid-reference", type=Path, metavar="STATS.npz",
                   help="precomputed FID statistics (mu, sigma) instead of --reference's")
    p.add_argument("--output", type=Path, required=True, metavar="REPORT_DIR",
                   help="folder for per_image.csv and summary.json")
    p.set_defaults(run=run)


def _check_options(args, specs) -> None:
    from jaxsr.metrics.registry import FULL_REFERENCE, SET

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.crop_border < 0:
        raise ValueError("--crop-border must be 0 or more")
    if not args.sr_dir.is_dir():
        raise NotADirectoryError(f"SR_DIR {args.sr_dir} is not a folder")
    if args.reference is not None and not args.reference.is_dir():
        raise NotADirectoryError(f"--reference {args.reference} is not a folder")
    full = [s.name for s in specs if s.kind == FULL_REFERENCE]
    if full and args.reference is None:
        raise ValueError(f"{', '.join(full)} compare with ground truth: pass --reference HR_DIR")
    if any(s.kind == SET for s in specs):
        if args.reference is None and args.fid_reference is None:
            raise ValueError("fid needs --reference HR_DIR or --fid-reference STATS.npz")
    elif args.fid_reference is not None:
        raise ValueError("--fid-reference is only used by the fid metric")


def run(args) -> int:
    import jax

    from jaxsr.metrics import folders, registry

    specs = registry.parse_names(args.metrics)
    _check_options(args, specs)
    weights = {s.name: registry.load_metric_weights(args.metric_weights, s.name)
               for s in specs if s.needs_weights}
    fid_reference = None
    if args.fid_reference is not None:
        from jaxsr.metrics.fid import load_reference_statistics

        fid_reference = load_reference_statistics(args.fid_reference)

    items, skipped = folders.pair(args.sr_dir, args.reference)
    groups, unsized = folders.group_by_size(items)
    skipped += unsized
    total = sum(len(g) for g in groups.values())
    if total == 0:
        where = args.sr_dir if args.reference is None else f"{args.sr_dir} and {args.reference}"
        raise ValueError(f"no images to score in {where}"
                         + (f" ({len(skipped)} file(s) skipped: {skipped[0].reason}, ...)"
                            if skipped else ""))

    scorer = _Scorer(specs, weights, args, jax.local_devices())
    from jaxsr.inference.progress import Progress

    progress = Progress(total, stream=sys.stderr)
    for (height, width), group in sorted(groups.items()):
        skipped += scorer.score_group(group, progress, f"{width}x{height}")
    return _report(args, specs, scorer, skipped, fid_reference)


class _Scorer:
    """Runs every metric on batches of one size: the batch sharded over the local
    devices, each metric jitted once per (size, batch) shape."""

    def __init__(self, specs, weights, args, devices):
        import jax

        from jaxsr.metrics import registry
        from jaxsr.parallel.mesh import batch_sharding, make_mesh, replicated

        self.specs = specs
        self.args = args
        mesh = make_mesh((("data", -1),), devices=devices)
        self.devices = len(devices)
        self.sharding = batch_sharding(mesh)
        self.fns, self.params = {}, {}
        for s in specs:
            config, params = weights.get(s.name, (None, None))
            fn = registry.scorer(s, config, params, crop_border=args.crop_border,
                                 y_channel=args.y_channel)
            self.fns[s.name] = jax.jit(fn) if s.jit else fn
            self.params[s.name] = (None if params is None
                                   else jax.device_put(params, replicated(mesh)))
        self.rows: dict[str, dict[str, float]] = {}
        self.features = {"sr": [], "hr": []}
        self.scored: set[str] = set()

    def score_group(self, group, progress, note: str) -> list:
        from jaxsr.data.image_io import ImageError, load_image
        from jaxsr.metrics.folders import Skip

        # --batch-size rounded up to a multiple of the devices; a smaller group is
        # padded to that multiple only.
        padded = -(-min(self.args.batch_size, len(group)) // self.devices) * self.devices
        per_step = min(padded, len(group))
        skipped, batch = [], []
        for i, item in enumerate(group):
            try:
                sr = load_image(item.sr)
                hr = None if item.hr is None else load_image(item.hr)
            except ImageError as e:
                skipped.append(Skip(str(item.sr), str(e)))
                progress.advance(1, f"skipped {item.sr.name}")
                continue
            if hr is not None and hr.shape != sr.shape:
                # The headers agreed but the decoded images do not (an EXIF rotation
                # found only when decoding).
                skipped.append(Skip(str(item.sr), f"size {sr.shape[1]}x{sr.shape[0]} "
                                                  f"differs from the reference's "
                                                  f"{hr.shape[1]}x{hr.shape[0]} ({item.hr})"))
                progress.advance(1, f"skipped {item.sr.name}")
                continue
            batch.append((item, sr, hr))
            if len(batch) == per_step or i == len(group) - 1:
                self._run(batch, padded)
                progress.advance(len(batch), f"batch of {len(batch)} at {note}")
                batch = []
        if batch:
            self._run(batch, padded)
            progress.advance(len(batch), f"batch of {len(batch)} at {note}")
        return skipped

    def _stack(self, images, padded: int):
        import jax
        import numpy as np

        # Padding repeats the first image; its scores are dropped.
        images = images + [images[0]] * (padded - len(images))
        return jax.device_put(np.stack(images), self.sharding)

    def _run(self, batch, padded: int) -> None:
        import numpy as np

        from jaxsr.metrics.registry import FULL_REFERENCE, SET

        n = len(batch)
        self.scored.update(item.stem for item, _, _ in batch)
        sr = self._stack([b[1] for b in batch], padded)
        hr = None if batch[0][2] is None else self._stack([b[2] for b in batch], padded)
        for s in self.specs:
            fn, params = self.fns[s.name], self.params[s.name]
            if s.kind == SET:
                self.features["sr"].append(np.asarray(fn(params, sr))[:n])
                if hr is not None and self.args.fid_reference is None:
                    self.features["hr"].append(np.asarray(fn(params, hr))[:n])
                continue
            scores = fn(params, sr, hr) if s.kind == FULL_REFERENCE else fn(params, sr)
            for (item, _, _), v in zip(batch, np.asarray(scores)[:n]):
                self.rows.setdefault(item.stem, {})[s.name] = float(v)

    def fid(self, reference) -> float:
        import numpy as np

        from jaxsr.metrics.fid import feature_statistics, frechet_distance

        sr = np.concatenate(self.features["sr"])
        if sr.shape[0] < 2:
            raise ValueError("fid needs at least 2 scored images")
        mu, sigma = feature_statistics(sr)
        if reference is None:
            reference = feature_statistics(np.concatenate(self.features["hr"]))
        return float(frechet_distance(mu, sigma, *reference))


def _fmt(v: float) -> str:
    # 9 significant digits give a float32 score back exactly.
    return f"{v:.9g}"


def _report(args, specs, scorer: _Scorer, skipped, fid_reference) -> int:
    from jaxsr.metrics.registry import SET

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    per_image = [s for s in specs if s.kind != SET]
    rows = scorer.rows
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + [s.name for s in per_image])
        for stem in sorted(rows):
            w.writerow([stem] + [_fmt(rows[stem][s.name]) for s in per_image])
    # None (JSON null, "-" in the table) when every image was skipped at decoding.
    means = {s.name: (math.fsum(r[s.name] for r in rows.values()) / len(rows) if rows
                      else None) for s in per_image}
    for s in specs:
        if s.kind == SET:
            means[s.name] = scorer.fid(fid_reference) if scorer.scored else None
    summary = {
        "metrics": {s.name: {"mean": means[s.name], "display": s.display,
                             "higher_is_better": s.higher_is_better} for s in specs},
        "counts": {"scored": len(scorer.scored), "skipped": len(skipped)},
        "skipped": [k.as_dict() for k in skipped],
        "options": {"sr_dir": str(args.sr_dir),
                    "reference": None if args.reference is None else str(args.reference),
                    "metrics": [s.name for s in specs], "crop_border": args.crop_border,
                    "y_channel": args.y_channel, "batch_size": args.batch_size,
                    "metric_weights": (None if args.metric_weights is None
                                       else str(args.metric_weights)),
                    "fid_reference": (None if args.fid_reference is None
                                      else str(args.fid_reference))},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for k in skipped:
        print(f"skipped {k.file}: {k.reason}", file=sys.stderr)
    print(format_table(specs, means, len(scorer.scored)))
    print(f"scored {len(scorer.scored)} image(s), skipped {len(skipped)}; report in {out}")
    sys.stdout.flush()
    return EXIT_SKIPPED if skipped else 0


def format_table(specs, means: dict[str, float], count: int) -> str:
    """Two aligned lines: the metric names (with ↑/↓) in table order, and the means."""
    heads = [f"{s.display}{'↑' if s.higher_is_better else '↓'}" for s in specs]
    cells = ["-" if means[s.name] is None else f"{means[s.name]:.4f}" for s in specs]
    widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
    line1 = "  ".join(["images"] + [h.rjust(w) for h, w in zip(heads, widths)])
    line2 = "  ".join([str(count).rjust(6)] + [c.rjust(w) for c, w in zip(cells, widths)])
    return f"{line1}\n{line2}"
