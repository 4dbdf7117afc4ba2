"""Peak memory of full-size `jaxsr sr` as a user runs it, each run in a fresh process.

    python benchmarks/sr_memory.py                        # SeeSR and CoSeR, bf16 and fp32
    python benchmarks/sr_memory.py --models seesr --dtypes bfloat16 --work /big/disk

What runs, per model (all on random weights of the released sizes and key names):
1. the release is written (tests/full_release.py: SeeSR's sd2/, seesr/, RAM and DAPE
   .pth; CoSeR's SD 2.1, stage-1 and stage-2 checkpoints), once, into --work;
2. `jaxsr convert` turns it into a float32 folder (what most users will have), its
   peak RSS and time recorded;
3. for each dtype, `jaxsr sr` on one 128² photo (scikit-image's astronaut, bicubic
   down from 512²) with 2 steps, in a fresh process: peak RSS (the kernel's own
   count, from wait4), wall time and exit status.

Beside each row: the weights held on the device (exact, from the folder's headers and
jaxsr.pipelines.placement's dtype rule) and the bare process (python + jax started),
so "runtime" = peak − held − bare is what the pipelines' memory check allows for
(jaxsr.pipelines.memory). Needs ~40 GB of disk in --work (release + folder, both
models) and ~16 GB of RAM. Writes benchmarks/results/sr_memory_<backend>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, write_json  # noqa: E402

GB = 1 << 30
# The goals for a CPU host (bytes of peak RSS).
GOALS = {("seesr", "bfloat16"): 10 * GB, ("seesr", "float32"): 14 * GB,
         ("coser", "float32"): 16 * GB}


def run_measured(argv: list[str], env: dict | None = None) -> dict:
    """Run a command in a fresh process: exit status, wall seconds, peak RSS bytes (the
    kernel's ru_maxrss of that child, from wait4) and its last output lines."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - start,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "tail": out.strip().splitlines()[-6:]}


def bare_process_bytes() -> int:
    """Peak RSS of a process that imports jaxsr's CLI and starts JAX's CPU backend."""
    code = "import jax, jaxsr.cli; jax.devices(); jax.numpy.zeros(1).block_until_ready()"
    return run_measured([sys.executable, "-c", code])["peak_rss_bytes"]


def write_photo(path: Path) -> Path:
    from PIL import Image
    from skimage import data

    if not path.exists():
        Image.fromarray(data.astronaut()).resize((128, 128), Image.BICUBIC).save(path)
    return path


def prepare(model: str, work: Path, log) -> tuple[Path, dict | None]:
    """The converted float32 folder (written, with its conversion measured, unless it
    already exists)."""
    from tests.full_release import write_coser_release, write_seesr_release

    release, folder = work / f"{model}_release", work / f"{model}_weights_float32"
    if not (release / "done").exists():
        log(f"writing the full-size {model} release to {release} ...")
        (write_seesr_release if model == "seesr" else write_coser_release)(release)
        (release / "done").write_text("")
    if (folder / "manifest.json").exists():
        return folder, None
    if model == "seesr":
        args = ["--sd", release / "sd2", "--seesr", release / "seesr",
                "--ram", release / "ram_swin_large_14m.pth", "--dape", release / "DAPE.pth"]
    else:
        args = ["--coser", release / "coser.safetensors",
                "--qformer", release / "qformer.safetensors",
                "--sd", release / "sd21.safetensors", "--tokenizer", release / "tokenizer"]
    log(f"converting {model} ...")
    conv = run_measured([sys.executable, "-m", "jaxsr.cli", "convert", *map(str, args),
                         "--output", str(folder)])
    if conv["returncode"]:
        raise SystemExit(f"conversion failed: {conv['tail']}")
    return folder, conv


def held_weight_bytes(folder: Path, model: str, dtype: str) -> int:
    import jax.numpy as jnp

    from jaxsr.convert.cache import tensor_info
    from jaxsr.pipelines.placement import held_bytes

    compute = jnp.dtype(dtype)
    lowered = ("unet", "controlnet", "text_encoder")
    return sum(held_bytes(info, compute if name in lowered else jnp.float32)
               for name, info in tensor_info(folder).items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("sr_memory_work"),
                    help="folder for the releases and converted weights (~40 GB)")
    ap.add_argument("--models", default="seesr,coser")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    photo = write_photo(args.work / "photo128.png")
    log = lambda *a: print(*a, flush=True)
    bare = bare_process_bytes()
    rows, conversions = [], {}
    for model in args.models.split(","):
        folder, conv = prepare(model, args.work, log)
        if conv is not None:
            conversions[model] = {k: conv[k] for k in ("wall_s", "peak_rss_bytes")}
        for dtype in args.dtypes.split(","):
            out = args.work / f"out_{model}_{dtype}"
            log(f"jaxsr sr, {model}, {dtype} ...")
            run = run_measured([sys.executable, "-m", "jaxsr.cli", "sr", str(photo),
                                "--weights", str(folder), "--output", str(out),
                                "--steps", str(args.steps), "--dtype", dtype, "--devices", "1",
                                "--overwrite", "--compile-cache", ""])
            held = held_weight_bytes(folder, model, dtype)
            goal = GOALS.get((model, dtype))
            rows.append({
                "model": model, "dtype": dtype, "ok": run["returncode"] == 0,
                "peak_rss_gb": run["peak_rss_bytes"] / GB, "held_weights_gb": held / GB,
                "bare_gb": bare / GB,
                "runtime_gb": (run["peak_rss_bytes"] - held - bare) / GB,
                "wall_s": run["wall_s"], "goal_gb": goal / GB if goal else None,
                "meets_goal": (run["peak_rss_bytes"] <= goal) if goal else None,
                "output_tail": run["tail"]})
            log(f"  peak RSS {rows[-1]['peak_rss_gb']:.2f} GB, {run['wall_s']:.0f} s, "
                f"exit {run['returncode']}")
    print()
    print_table(rows, ["model", "dtype", "ok", "peak_rss_gb", "goal_gb", "held_weights_gb",
                       "runtime_gb", "bare_gb", "wall_s"])
    for model, conv in conversions.items():
        print(f"jaxsr convert {model}: peak RSS {conv['peak_rss_bytes'] / GB:.2f} GB, "
              f"{conv['wall_s']:.0f} s")
    import jax

    write_json(args.out or f"benchmarks/results/sr_memory_{jax.default_backend()}.json",
               {"benchmark": "sr_memory", "steps": args.steps, "photo": "astronaut 128x128",
                "rows": rows, "conversions": conversions, "environment": environment()})


if __name__ == "__main__":
    main()
