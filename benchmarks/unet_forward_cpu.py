"""SD2-base-size UNet forward on the CPU: jaxsr (jit) vs diffusers (PyTorch), one run.

    python benchmarks/unet_forward_cpu.py [--batch 2] [--latent 64] [--repeats 3]

Same random weights (diffusers init, converted with jaxsr's loader), same inputs,
float32 in both. Prints compile time, median seconds per forward after warm-up,
achieved GFLOP/s (FLOPs from XLA's cost analysis of the compiled forward) and
the PyTorch/jaxsr time ratio; writes the numbers to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, summarize, time_call, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--out", default="benchmarks/results/unet_forward_cpu.json")
    args = ap.parse_args()

    from jaxsr.platform import configure_xla_defaults

    configure_xla_defaults()

    import diffusers
    import jax
    import torch

    from jaxsr.models.unet import SD2_BASE_UNET, UNet2DConditionModel, load_unet

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(SD2_BASE_UNET.to_diffusers_config()).eval()
    params = load_unet({k: v.numpy() for k, v in ref.state_dict().items()}, SD2_BASE_UNET)
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent
    x = rng.standard_normal((b, s, s, 4)).astype(np.float32)
    t = np.full((b,), 500, np.int32)
    ctx = rng.standard_normal((b, 77, 1024)).astype(np.float32)

    model = UNet2DConditionModel(SD2_BASE_UNET, attention=args.attention)
    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower({"params": params}, x, t, ctx).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    jax_times = time_call(lambda: compiled({"params": params}, x, t, ctx).block_until_ready(),
                          warmup=args.warmup, repeats=args.repeats)

    xt, tt, ct = (torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy()), torch.from_numpy(t),
                  torch.from_numpy(ctx))

    def torch_forward():
        with torch.inference_mode():
            ref(xt, tt, ct)

    torch_times = time_call(torch_forward, warmup=args.warmup, repeats=args.repeats)

    jax_s, torch_s = summarize(jax_times), summarize(torch_times)
    rows = [
        {"impl": "jaxsr (jax.jit)", "compile_s": compile_s, "median_s": jax_s["median_s"],
         "GFLOP/s": flops / jax_s["median_s"] / 1e9},
        {"impl": "diffusers (torch)", "compile_s": None, "median_s": torch_s["median_s"],
         "GFLOP/s": flops / torch_s["median_s"] / 1e9},
    ]
    print(f"\nSD2-base UNet forward, batch {b}, latent {s}x{s}, float32, "
          f"{flops / 1e12:.2f} TFLOP per forward (XLA cost analysis)")
    print_table(rows, ["impl", "compile_s", "median_s", "GFLOP/s"])
    ratio = torch_s["median_s"] / jax_s["median_s"]
    print(f"speed-up of jaxsr over PyTorch: {ratio:.2f}x")
    write_json(args.out, {"benchmark": "unet_forward_cpu", "batch": b, "latent": s,
                          "flops_per_forward": flops, "jaxsr": {**jax_s, "compile_s": compile_s},
                          "torch": torch_s, "torch_over_jaxsr": ratio,
                          "environment": environment()})


if __name__ == "__main__":
    main()
