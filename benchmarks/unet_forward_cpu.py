"""SD2-base-size UNet forward on the CPU: jaxsr (jit) vs diffusers (PyTorch), one run.

    python benchmarks/unet_forward_cpu.py [--batch 2] [--latent 64] [--repeats 5]

Same random weights (diffusers init, converted with jaxsr's loader), same inputs,
float32 in both. The two implementations' timed runs alternate (jaxsr, PyTorch,
jaxsr, ...), so a slow spell of a shared machine falls on both, and the speed-up
is also given as the median of the per-pair ratios. Also times the
UNet's heaviest single op on its own: the level-0 self-attention (4096 tokens at
a 64² latent, 5 heads of 64), jaxsr's "xla" backend against PyTorch's fused
`scaled_dot_product_attention`. Prints compile time, median seconds after
warm-up, achieved GFLOP/s (FLOPs from XLA's cost analysis of the forward traced
without jaxsr's row-chunk loops) and the PyTorch/jaxsr time ratio; writes the
numbers to benchmarks/results/. jaxsr runs with its default XLA flags (jaxsr/platform.py),
as the `jaxsr` command does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    environment,
    print_table,
    summarize,
    time_alternating,
    unchunked,
    write_json,
)


def attention_times(batch: int, tokens: int, heads: int, repeats: int, backend: str) -> dict:
    """Level-0 self-attention alone, [B, L, H, 64]: jaxsr's `backend`, jaxsr's "xla"
    backend and torch SDPA."""
    import functools

    import jax
    import torch

    from jaxsr.nn.attention import dot_product_attention

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((batch, tokens, heads, 64), dtype=np.float32)
               for _ in range(3))
    fn = jax.jit(functools.partial(dot_product_attention, backend=backend))
    xla = jax.jit(functools.partial(dot_product_attention, backend="xla"))
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3)))
                  for a in (q, k, v))

    def torch_attention():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    times = time_alternating({"jaxsr": lambda: fn(q, k, v).block_until_ready(),
                              "jaxsr xla": lambda: xla(q, k, v).block_until_ready(),
                              "torch": torch_attention}, warmup=1, repeats=repeats)
    flops = 4.0 * batch * heads * tokens * tokens * 64
    stats = {name: summarize(t) for name, t in times.items()}
    return {name: {**st, "GFLOP/s": flops / st["median_s"] / 1e9}
            for name, st in stats.items()} | {"flops": flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attention", default="auto",
                    help="jaxsr attention backend (auto: what the pipelines use)")
    ap.add_argument("--out", default="benchmarks/results/unet_forward_cpu.json")
    args = ap.parse_args()

    from jaxsr.platform import configure_xla_defaults

    configure_xla_defaults()

    import diffusers
    import jax
    import torch

    from jaxsr.convert.networks import load_unet
    from jaxsr.kernels import ISA_NAMES, cpu_attention_isa
    from jaxsr.models.unet import SD2_BASE_UNET, UNet2DConditionModel
    from jaxsr.nn.attention import resolve_backend

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
    # FLOPs from the same forward with XLA-op attention traced without jaxsr's row-chunk
    # loops (XLA's cost analysis counts a loop body once and cannot see into the fused
    # CPU kernel); lowering is enough, no second compile.
    counted = UNet2DConditionModel(SD2_BASE_UNET, attention="xla")
    with unchunked():
        cost = jax.jit(counted.apply).lower({"params": params}, x, t, ctx).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))

    xt, tt, ct = (torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy()), torch.from_numpy(t),
                  torch.from_numpy(ctx))

    def torch_forward():
        with torch.inference_mode():
            ref(xt, tt, ct)

    def jaxsr_forward():
        compiled({"params": params}, x, t, ctx).block_until_ready()

    times = time_alternating({"jaxsr": jaxsr_forward, "torch": torch_forward},
                             warmup=args.warmup, repeats=args.repeats)
    jax_s, torch_s = summarize(times["jaxsr"]), summarize(times["torch"])
    rows = [
        {"impl": "jaxsr (jax.jit)", "compile_s": compile_s, "median_s": jax_s["median_s"],
         "min_s": jax_s["min_s"], "GFLOP/s": flops / jax_s["median_s"] / 1e9},
        {"impl": "diffusers (torch)", "compile_s": None, "median_s": torch_s["median_s"],
         "min_s": torch_s["min_s"], "GFLOP/s": flops / torch_s["median_s"] / 1e9},
    ]
    print(f"\nSD2-base UNet forward, batch {b}, latent {s}x{s}, float32, "
          f"{flops / 1e12:.2f} TFLOP per forward (XLA cost analysis)")
    print_table(rows, ["impl", "compile_s", "median_s", "min_s", "GFLOP/s"])
    ratio = torch_s["median_s"] / jax_s["median_s"]
    # Each PyTorch run over the jaxsr run just before it: the machine's speed drifts
    # between pairs far more than within one.
    pairs = [b / a for a, b in zip(times["jaxsr"], times["torch"])]
    paired = statistics.median(pairs)
    print(f"speed-up of jaxsr over PyTorch: {ratio:.2f}x (ratio of medians), "
          f"{paired:.2f}x (median of {len(pairs)} paired runs; jaxsr faster in "
          f"{sum(r > 1 for r in pairs)})")

    heads = SD2_BASE_UNET.heads[0]
    backend = resolve_backend(args.attention, s * s)
    isa = cpu_attention_isa()
    attn = attention_times(b, s * s, heads, args.repeats, args.attention)
    print(f"\njaxsr attention: {args.attention} -> {backend}; fused CPU kernel path: "
          f"{ISA_NAMES.get(isa, 'not built')}")
    print(f"level-0 self-attention alone ({b}x{s * s} tokens, {heads} heads of 64)")
    print_table([{"impl": name, **attn[name]} for name in ("jaxsr", "jaxsr xla", "torch")],
                ["impl", "median_s", "min_s", "GFLOP/s"])
    write_json(args.out, {"benchmark": "unet_forward_cpu", "batch": b, "latent": s,
                          "attention": {"requested": args.attention, "used": backend,
                                        "fused_cpu_path": ISA_NAMES.get(isa)},
                          "flops_per_forward": flops, "jaxsr": {**jax_s, "compile_s": compile_s},
                          "torch": torch_s, "torch_over_jaxsr": ratio,
                          "torch_over_jaxsr_paired": {"median": paired, "runs": pairs},
                          "level0_self_attention": attn, "environment": environment()})


if __name__ == "__main__":
    main()
