"""The TPU plan table: full-size jaxsr programs compiled for real TPU slices from a
CPU host (`jaxsr plan`), each row at the largest batch per chip that fits, with the
best mesh of a small sweep.

    python benchmarks/tpu_plan.py                       # every row (hours on 2 cores)
    python benchmarks/tpu_plan.py --rows sample_v5e     # rows whose name contains it
    python benchmarks/tpu_plan.py --list
    python benchmarks/tpu_plan.py --rows train_v5p_4x4x4 --record A.json B.json  # hand-run
                                    # `jaxsr plan --json` compiles kept as the row

Each compile runs `jaxsr plan --json` in a fresh process (a full-size compile holds
several GB; a failure costs one row). The batch search per (row, mesh): compile at
batch b0 and 2·b0, extrapolate the memory per image to the HBM limit, compile at
that batch, and once more at the batch extrapolated from the two largest compiles
when it lies between the largest that fit and the smallest that did not. Every
number is the compiler's (memory) or a roofline prediction from the chip table
(time, MFU): nothing runs on a TPU. Writes benchmarks/results/tpu_plan/<row>.json
(every compile of the row, and the best) and prints the table; rows run before are
kept and re-listed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from jaxsr.plan.report import RUNTIME_HEADROOM  # noqa: E402

# name: (program, config, topology, meshes to sweep, fixed batches or None to search,
#        extra CLI arguments)
# SeeSR training keeps ~28 GB of activations per 512² image without remat (v5p:4x4x4,
# FSDP 8, batch 4: 110.8 GB of temporaries per chip), so the training rows rematerialise
# the UNet and ControlNet layers; train_v5p_4x4x4_noremat is the same row without.
REMAT = ["--config.remat=True"]
ROWS = {
    "train_v5e_4x4": ("train", "configs/seesr_train.py", "v5e:4x4",
                      ["[('data', -1), ('fsdp', 16)]",
                       "[('data', -1), ('fsdp', 4), ('tensor', 4)]"], None, REMAT),
    "train_v5p_2x2x2": ("train", "configs/seesr_train.py", "v5p:2x2x2",
                        ["[('data', -1), ('fsdp', 8)]", "[('data', -1), ('fsdp', 4)]"], None,
                        REMAT),
    "train_v5p_4x4x4": ("train", "configs/seesr_train.py", "v5p:4x4x4",
                        ["[('data', -1), ('fsdp', 8)]", "[('data', -1), ('fsdp', 16)]"], None,
                        REMAT),
    "train_v5p_4x4x4_noremat": ("train", "configs/seesr_train.py", "v5p:4x4x4",
                                ["[('data', -1), ('fsdp', 8)]"], [4], []),
    "train_v6e_4x4": ("train", "configs/seesr_train.py", "v6e:4x4",
                      ["[('data', -1), ('fsdp', 16)]", "[('data', -1), ('fsdp', 8)]"], None,
                      REMAT),
    # DAPE distillation trains only the LoRA (~1 MB): data parallel, RAM replicated.
    "dape_v5p_2x2x2": ("train", "configs/dape_train.py", "v5p:2x2x2", ["[('data', -1)]"],
                       None, []),
    "coser2_v5p_2x2x2": ("train", "configs/coser_train.py:stage2", "v5p:2x2x2",
                         ["[('data', -1), ('fsdp', 8)]"], None, REMAT),
    "sample_v5e_b1": ("sample", "configs/seesr.py", "v5e:1x1", ["[('data', 1)]"], [1], []),
    "sample_v5e_b4": ("sample", "configs/seesr.py", "v5e:1x1", ["[('data', 1)]"], [4], []),
    "sample_v5e_b8": ("sample", "configs/seesr.py", "v5e:1x1", ["[('data', 1)]"], [8], []),
    "sample_v5p_b1": ("sample", "configs/seesr.py", "v5p:1x1x1", ["[('data', 1)]"], [1], []),
    "sample_v5p_b8": ("sample", "configs/seesr.py", "v5p:1x1x1", ["[('data', 1)]"], [8], []),
    "sample_v6e_b1": ("sample", "configs/seesr.py", "v6e:1x1", ["[('data', 1)]"], [1], []),
    "sample_v6e_b8": ("sample", "configs/seesr.py", "v6e:1x1", ["[('data', 1)]"], [8], []),
    "coser_v5e_b1": ("sample", "configs/coser.py", "v5e:1x1", ["[('data', 1)]"], [1], []),
    # 2048² outputs on 4 chips: one image per chip in SeeSR's latent tiles (96² tiles,
    # overlap 4), against one image split by height over the 4 chips, untiled.
    "tiled_2048_v5p": ("sample", "configs/seesr.py", "v5p:2x2x1", ["[('data', 4)]"], [1],
                       ["--size", "2048"]),
    "spatial_2048_v5p": ("sample", "configs/seesr.py", "v5p:2x2x1",
                         ["[('data', 1), ('space', 4)]"], [1],
                         ["--size", "2048", "--config.sampling.latent_tile=256"]),
}


def run_plan(program, config, topology, mesh, batch, extra=(), timeout=3600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "jaxsr.cli", "plan", "--program", program, "--config",
               config, "--topology", topology, "--mesh", mesh, "--batch-per-chip",
               str(batch), "--json", str(out), *extra]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            # A compile that outlasts --timeout is a row of the table too (the host's
            # limit, not the slice's), not the end of the run.
            return {"error": f"compile not finished in {timeout} s (--timeout)",
                    "batch_per_chip": batch, "topology": topology, "mesh_arg": mesh}
        if proc.returncode or not out.exists():
            return {"error": (proc.stderr or proc.stdout)[-2000:], "batch_per_chip": batch,
                    "topology": topology, "mesh_arg": mesh}
        report = json.loads(out.read_text())
        report["wall_s"] = round(time.perf_counter() - start, 1)
        return report


def largest_fitting_batch(low: dict, high: dict) -> int | None:
    """The largest batch whose total stays within the usable HBM, on the line through
    two compiled reports' (batch, total bytes); None when memory does not grow with
    the batch, or a report has no total (the compiler refused it without saying how
    much it needed): nothing to extrapolate."""
    if low["memory"]["total"] is None or high["memory"]["total"] is None:
        return None
    per_image = ((high["memory"]["total"] - low["memory"]["total"])
                 / (high["batch_per_chip"] - low["batch_per_chip"]))
    if per_image <= 0:
        return None
    usable = low["hbm_bytes"] * (1 - RUNTIME_HEADROOM)
    return max(1, low["batch_per_chip"] + int((usable - low["memory"]["total"]) / per_image))


def search_batch(compile_at, start: int = 1) -> list[dict]:
    """Compiles at start and 2·start, then at the batch extrapolated from their memory
    to the HBM limit, then once more from the line through the two largest compiles
    (a short slope between small batches can over- or under-state the per-image
    bytes): up to four compiles. `compile_at(batch)` returns a `jaxsr plan` report."""
    tried = [compile_at(b) for b in (start, 2 * start)]
    if any("error" in r for r in tried):
        return tried
    guess = largest_fitting_batch(*tried)
    if guess is None or guess <= 2 * start:
        return tried
    tried.append(compile_at(guess))
    if "error" in tried[-1]:
        return tried
    again = largest_fitting_batch(tried[1], tried[2])
    fitted = [r["batch_per_chip"] for r in tried if r["fits"]]
    # Worth one more compile only if it lands between the largest batch that fits
    # and the smallest that does not.
    ceiling = min([r["batch_per_chip"] for r in tried if not r["fits"]], default=None)
    if (again is not None and again > max(fitted, default=0)
            and (ceiling is None or again < ceiling)):
        tried.append(compile_at(again))
    elif not tried[-1]["fits"] and guess - 1 > 2 * start:
        tried.append(compile_at(guess - 1))
    return tried


def row_summary(name: str, r: dict) -> dict:
    head = {"row": name, "topology": r["topology"],
            "mesh": r["mesh_arg"] if "error" in r else str(r["mesh"]),
            "batch/chip": r["batch_per_chip"]}
    if "error" in r:
        return {**head, "fits": "error"}
    if r["predicted"] is None:   # refused by the compiler for lack of HBM
        return {**head, "fits": False}
    p = r["predicted"]
    return {**head, "GB/chip": r["memory"]["total"] / 1e9,
            "HBM GB": r["hbm_bytes"] / 1e9, "fits": r["fits"],
            "TFLOP/chip": r["flops_per_chip"] / 1e12,
            "coll GB": sum(v["bytes"] for v in r["collectives"].values()) / 1e9,
            "pred step s": p["step_s"], "pred img/s/chip": p["images_per_s_per_chip"],
            "pred MFU": p["mfu"], "bound": p["bound"], "warnings": len(r["warnings"]),
            "compile s": r["compile_s"]}


def _checked(name: str, report_path: Path) -> dict:
    """A hand-run report, after checking it is row `name`'s program on that row's
    topology with one of its meshes."""
    program, config, topology, meshes, _, extra = ROWS[name]
    report = json.loads(report_path.read_text())
    from jaxsr.commands.plan import parse_mesh

    wanted = [{n: s for n, s in parse_mesh(m) if s != -1} for m in meshes]
    given = report["mesh"]
    if (report["topology"] != topology or program not in report["program"]
            or not any(all(given.get(n) == s for n, s in w.items()) for w in wanted)):
        raise SystemExit(f"{report_path} is {report['program']} on {report['topology']} with "
                         f"mesh {given}; row {name} is {program} on {topology} with {meshes}")
    report["mesh_arg"] = next(m for m, w in zip(meshes, wanted)
                              if all(given.get(n) == s for n, s in w.items()))
    report["recorded_by_hand"] = ("`jaxsr plan --json` compiles at batches chosen by hand, "
                                  "kept with --record: the batch was not searched")
    # As the row runs it (the report itself does not carry its config overrides).
    report["extra_args"] = extra
    return report


def _best(runs: list[dict]) -> dict | None:
    """The run with the most images per second per chip among those that fit."""
    fitting = [r for r in runs if "error" not in r and r.get("fits")]
    return max(fitting, key=lambda r: r["predicted"]["images_per_s_per_chip"], default=None)


def record(name: str, report_paths: list[Path], out_dir: Path) -> None:
    """Saves hand-run reports as row `name`: every one is a run, the best is the one
    that fits with the most images per second per chip."""
    if name not in ROWS:
        raise SystemExit(f"--record needs --rows to name one row exactly: {', '.join(ROWS)}")
    runs = [_checked(name, path) for path in report_paths]
    best = _best(runs)
    write_json(out_dir / f"{name}.json", {"benchmark": "tpu_plan", "row": name, "best": best,
                                          "runs": runs, "environment": environment()})
    print_table([row_summary(name, r) for r in runs], list(row_summary(name, runs[0])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help="run the row of this name, or else the rows "
                    "whose name contains it")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    ap.add_argument("--out-dir", default="benchmarks/results/tpu_plan")
    ap.add_argument("--record", type=Path, nargs="+", default=None, metavar="PLAN.json",
                    help="with --rows NAME: keep `jaxsr plan --json` reports run by hand "
                         "(with the row's program, config, topology and one of its meshes) "
                         "as that row, batch not searched: for compiles that outlast the "
                         "sweep on a small host")
    args = ap.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    out_dir = Path(args.out_dir)
    if args.record:
        record(args.rows, args.record, out_dir)
        return
    for name, (program, config, topology, meshes, batches, extra) in ROWS.items():
        # A row's exact name runs that row alone (train_v5p_4x4x4 is also part of
        # train_v5p_4x4x4_noremat's name); anything else matches as a substring.
        if name != args.rows if args.rows in ROWS else args.rows not in name:
            continue
        runs = []
        for mesh in meshes:
            if batches:
                runs += [run_plan(program, config, topology, mesh, b, extra, args.timeout)
                         for b in batches]
            else:
                runs += search_batch(partial(run_plan, program, config, topology, mesh,
                                             extra=extra, timeout=args.timeout))
        best = _best(runs)
        write_json(out_dir / f"{name}.json", {"benchmark": "tpu_plan", "row": name,
                                              "best": best, "runs": runs,
                                              "environment": environment()})
        print_table([row_summary(name, r) for r in runs], list(row_summary(name, runs[0])))
    table = []
    for path in sorted(out_dir.glob("*.json")):
        saved = json.loads(path.read_text())
        if saved.get("best"):
            table.append(row_summary(saved["row"], saved["best"]))
    if table:
        print("\nbest plan per row (memory from the compiler; time and MFU predicted by "
              "a roofline, not measured):")
        print_table(table, list(table[0]))


if __name__ == "__main__":
    main()
