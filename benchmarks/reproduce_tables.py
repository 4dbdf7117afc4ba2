"""The SeeSR / CoSeR papers' quality tables, reproduced with jaxsr's command line.

    python benchmarks/reproduce_tables.py --model seesr --weights WEIGHTS_DIR \\
        --metric-weights METRIC_DIR --set div2k-val=LR_DIR:HR_DIR \\
        --set realsr=LR_DIR:HR_DIR [--steps 50] [--work DIR] [--json OUT.json]

For every `--set NAME=LR_DIR:HR_DIR` (the first ":" after "=" separates the two
folders), runs the real `jaxsr sr LR_DIR --weights WEIGHTS_DIR --output WORK/NAME/sr`
and then the real `jaxsr eval WORK/NAME/sr --reference HR_DIR --metrics ...
--output WORK/NAME/eval`, and prints one table per set: jaxsr's mean of every metric
beside the published value of that model on that set (blank where the source reports
none; benchmarks/published_numbers.py holds the numbers and their sources). Known set
names: div2k-val, realsr, drealsr, reallr200, imagenet-test2000; any other name is
run the same way and shown without published columns.

Metric options: the default is every metric of the papers' tables (psnr, ssim, lpips,
dists, fid, niqe, musiq, maniqa, clipiqa), with FID between the SR folder and the HR
folder, PSNR/SSIM on RGB and no border cropped (`jaxsr eval`'s defaults: the border
and colour space behind the published rows are not recorded in
benchmarks/published_numbers.py, so the plainest choice is kept and written to the
JSON). --crop-border and --y-channel change it. Other `jaxsr sr` / `jaxsr eval`
options go through --sr-args / --eval-args, e.g. `--sr-args="--devices 1 --dtype float32"`.

The published numbers come from the full test sets, the released weights and the
papers' sampling settings; a run with other sets, weights or step counts is not
comparable with them.

Exit status: 0 when every set ran and every file was scored; `jaxsr sr`'s or
`jaxsr eval`'s failing status (1 or 2) as soon as one of them fails; 3 when every set
ran but `jaxsr eval` skipped some files (their sets' means leave them out).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.published_numbers import KNOWN_SETS, published  # noqa: E402

PAPER_METRICS = "psnr,ssim,lpips,dists,fid,niqe,musiq,maniqa,clipiqa"
EXIT_SKIPPED = 3
NOT_RUN = "not run"


def parse_set(text: str) -> tuple[str, Path, Path]:
    """"NAME=LR_DIR:HR_DIR" -> (NAME, LR_DIR, HR_DIR)."""
    name, eq, dirs = text.partition("=")
    lr, colon, hr = dirs.partition(":")
    if not (eq and colon and name and lr and hr):
        raise argparse.ArgumentTypeError(f"expected NAME=LR_DIR:HR_DIR, got {text!r}")
    return name, Path(lr), Path(hr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("seesr", "coser"), required=True)
    ap.add_argument("--weights", type=Path, required=True, help="`jaxsr convert` folder")
    ap.add_argument("--metric-weights", type=Path, metavar="DIR",
                    help="`jaxsr convert --metric` folder (needed by every metric but "
                         "psnr and ssim)")
    ap.add_argument("--set", dest="sets", type=parse_set, action="append", required=True,
                    metavar="NAME=LR_DIR:HR_DIR", help="a test set (repeatable)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: jaxsr sr's, 50)")
    ap.add_argument("--process-size", type=int, help="jaxsr sr --process-size")
    ap.add_argument("--metrics", default=PAPER_METRICS,
                    help=f"jaxsr eval metrics (default {PAPER_METRICS})")
    ap.add_argument("--crop-border", type=int, default=0, help="jaxsr eval --crop-border")
    ap.add_argument("--y-channel", action="store_true", help="jaxsr eval --y-channel")
    ap.add_argument("--sr-args", default="", help="more jaxsr sr options, one string")
    ap.add_argument("--eval-args", default="", help="more jaxsr eval options, one string")
    ap.add_argument("--work", type=Path, default=Path("reproduce-tables"),
                    help="folder for SR outputs and eval reports (default reproduce-tables/)")
    ap.add_argument("--json", type=Path, help="write the results here")
    return ap


def sr_argv(args, lr_dir: Path, out: Path) -> list[str]:
    argv = ["sr", str(lr_dir), "--weights", str(args.weights), "--model", args.model,
            "--output", str(out)]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.process_size is not None:
        argv += ["--process-size", str(args.process_size)]
    return argv + shlex.split(args.sr_args)


def eval_argv(args, sr_dir: Path, hr_dir: Path, out: Path) -> list[str]:
    argv = ["eval", str(sr_dir), "--reference", str(hr_dir), "--metrics", args.metrics,
            "--crop-border", str(args.crop_border), "--output", str(out)]
    if args.metric_weights is not None:
        argv += ["--metric-weights", str(args.metric_weights)]
    if args.y_channel:
        argv.append("--y-channel")
    return argv + shlex.split(args.eval_args)


def _cell(value) -> str:
    # Blank, not "-", where a source reports nothing: the published columns are sparse.
    return "" if value is None else f"{value:.4f}"


def table_rows(summary: dict, rows_published) -> tuple[list[dict], list[str]]:
    """One row per metric, in the papers' order: ours, then one column per published
    source. A metric a source reports but this run did not measure gets a row too
    ("not run"), so the published table is shown whole."""
    from jaxsr.metrics.registry import METRICS

    columns = ["metric", "jaxsr"] + [f"published: {p.label}" for p in rows_published]
    ours = {name: m["mean"] for name, m in summary["metrics"].items()}
    names = set(ours).union(*(p.values for p in rows_published))
    rows = []
    for name in sorted(names, key=lambda n: METRICS[n].order):
        spec = METRICS[name]
        mean = ours.get(name, NOT_RUN)
        row = {"metric": f"{spec.display}{'↑' if spec.higher_is_better else '↓'}",
               "jaxsr": (mean if mean is NOT_RUN else
                         "-" if mean is None else f"{mean:.4f}")}
        for p in rows_published:
            row[f"published: {p.label}"] = _cell(p.values.get(name))
        rows.append(row)
    return rows, columns


def run_set(args, name: str, lr_dir: Path, hr_dir: Path) -> tuple[int, dict | None]:
    """`jaxsr sr` then `jaxsr eval` on one set: (exit status, the set's results)."""
    from jaxsr.cli import main as jaxsr

    sr_dir, report = args.work / name / "sr", args.work / name / "eval"
    print(f"\n[{name}] jaxsr {shlex.join(sr_argv(args, lr_dir, sr_dir))}", flush=True)
    code = jaxsr(sr_argv(args, lr_dir, sr_dir))
    if code != 0:
        print(f"[{name}] jaxsr sr failed (exit {code})", file=sys.stderr)
        return code, None
    argv = eval_argv(args, sr_dir, hr_dir, report)
    print(f"[{name}] jaxsr {shlex.join(argv)}", flush=True)
    code = jaxsr(argv)
    if code not in (0, EXIT_SKIPPED):
        print(f"[{name}] jaxsr eval failed (exit {code})", file=sys.stderr)
        return code, None
    summary = json.loads((report / "summary.json").read_text())
    return code, {"lr_dir": str(lr_dir), "hr_dir": str(hr_dir), "sr_dir": str(sr_dir),
                  "report_dir": str(report), "eval_exit": code, "summary": summary}


def print_set(model: str, name: str, result: dict) -> list:
    rows_published = published(model, name)
    counts = result["summary"]["counts"]
    print(f"\n== {name}: {model}, {counts['scored']} image(s) scored, "
          f"{counts['skipped']} skipped ==")
    rows, columns = table_rows(result["summary"], rows_published)
    print_table(rows, columns)
    for p in rows_published:
        print(f"  {p.label}: {p.source}")
    if not rows_published:
        known = name in KNOWN_SETS
        print(f"  (no published numbers for {model} on "
              f"{'this set' if known else 'a set of this name'})")
    return rows_published


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [name for name, _, _ in args.sets]
    if len(set(names)) != len(names):
        print(f"error: a set name is given twice: {names}", file=sys.stderr)
        return 2
    results, status = {}, 0
    for name, lr_dir, hr_dir in args.sets:
        code, result = run_set(args, name, lr_dir, hr_dir)
        if result is None:
            return code
        results[name] = result
        status = status or code
    sets = {}
    for name, result in results.items():
        rows_published = print_set(args.model, name, result)
        summary = result.pop("summary")
        sets[name] = {**result,
                      "ours": {k: m["mean"] for k, m in summary["metrics"].items()},
                      "counts": summary["counts"],
                      "published": [p.as_dict() for p in rows_published]}
    if args.json is not None:
        write_json(args.json, {
            "model": args.model, "weights": str(args.weights),
            "options": {"steps": args.steps, "process_size": args.process_size,
                        "metrics": args.metrics.split(","), "crop_border": args.crop_border,
                        "y_channel": args.y_channel, "sr_args": args.sr_args,
                        "eval_args": args.eval_args,
                        "metric_weights": (None if args.metric_weights is None
                                           else str(args.metric_weights))},
            "sets": sets, "environment": environment()})
    return status


if __name__ == "__main__":
    sys.exit(main())
