"""CoSeR super-resolution per image (random weights): time, FLOPs two ways, TFLOP/s.

    python benchmarks/coser_sr.py                           # CPU default: tiny nets, 50 steps
    python benchmarks/coser_sr.py --size full --batch 1     # accelerator default: full, 50 steps
    python benchmarks/coser_sr.py --size full --flops-only  # FLOP counts only, no weights

What runs: the jitted device program `jaxsr.pipelines.coser_sampling.coser_restore` on
one device (cognitive embedding E of the LR, VAE encode of the ×4 bicubic LR, `--steps`
respaced DDPM steps of reference generation (gen-mode UNet, two guidance branches)
and `--steps` SR steps (ControlNet once on a doubled batch for the LR and reference
hints, AiA UNet for both guidance branches), CFW decode of the SR latent and plain
VAE decode of the reference latent). Random weights of the module shapes (no
downloads). Prompt embeddings are random inputs: CoSeR's prompt ("") and negative
prompt are the same for every image, so their text encoder is not per-image work.
  --size tiny: the test suite's tiny networks, 16² LR -> 64² output;
  --size full: the released sizes (SD-2.1-base AiA UNet and ControlNet, ViT-H/14 +
               Q-Former cognitive encoder, SD2 VAE, CFW), 128² LR -> 512² output.

Time: compile seconds of the whole program (separate), then the median seconds per
call after warm-up, divided by the batch. When fewer than 50 steps run (full size on
CPU: 2 by default) the 50-step time is extrapolated as
    t(N) + (50 − N)·(t_ref_step + t_sr_step),
with the step times measured on the reference and SR loops compiled on their own
for one step; table and JSON say `extrapolated`.

FLOPs per image, two ways:
  (a) XLA: the "flops" of XLA's cost analysis of the compiled programs. XLA counts a
      while-loop body once whatever its trip count (probed at start-up, so a version
      that multiplies is handled too), so the total is composed: the whole program's
      count minus one reference step and one SR step gives the part outside the loops
      (cognitive, encode, decodes); per-step counts come from the reference and SR
      loops compiled on their own for one step; total(n) = outside + n·(ref + SR).
  (b) analytic: 2 × the multiply-accumulates of every matmul (dot_general) and
      convolution in the traced program (jaxpr), from their operand shapes, with scan
      (fori_loop) bodies counted at their trip counts, after dead-code elimination
      (as XLA drops unused results, e.g. the encoder tail behind the CFW features).
      Elementwise work, norms and softmax are not counted, as in the reference doc.
  The two differ by a few per cent either way: XLA adds the elementwise work but
  counts no work for the taps of a convolution window that fall on padding (a 3×3
  conv on a 64² map: 0.979 of the analytic count; on a 1² map: 1/9), which matters
  for the tiny networks' 1²–8² maps.
Counting traces use einsum attention without the query-chunk `lax.map` of the softmax
and the reference (argmax) attention (a loop XLA would again count once;
flash-attention custom calls are not costed by XLA at all), so
at full size the counted programs are compiled apart from the timed ones; at sizes
where the timed program has no such loop (tiny on CPU) the timed program is costed.
Achieved TFLOP/s = FLOPs per image / seconds per image at 50 steps, and its fraction
of the matmul peak measured here (benchmarks.common.measure_peak, `--dtype`).

The full-size analytic count of single passes (batch 1, 512² output) is printed next
to docs/coser_reference.md §7's numbers: UNet-AiA 1.02, gen-mode UNet 0.81, ControlNet
0.23 TFLOP per pass; SR step 2.50, reference step 1.62; VAE encode 1.12 (×3 in the
doc: LR, zeros, CFW encoder), decode 2.51, CFW decode 5.00; ≈217 TFLOP at 50 steps.
The doc's total omits the cognitive encoder and counts the "zeros" encode the script
makes but never uses; jaxsr runs neither that encode nor the full CFW encoder (only
the levels whose features CFW reads), so the program total is printed as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    environment,
    has_chunk_loops,
    measure_peak,
    print_table,
    random_params,
    time_call,
    unchunked,
    write_json,
    xla_flops,
)
from jaxsr.plan.flops import analytic_flops  # noqa: E402

FULL_STEPS = 50
PROMPT_TOKENS = 77
# docs/coser_reference.md §7, TFLOP at 512² output, batch 1.
DOC_TFLOP = {"unet_aia_pass": 1.02, "unet_gen_pass": 0.81, "controlnet_pass": 0.23,
             "sr_step": 2.50, "reference_step": 1.62, "vae_encode": 1.12,
             "vae_decode": 2.51, "cfw_decode": 5.00, "total_50_steps": 217.0}
# Programs that are only costed, never run, need no optimised machine code; these CPU
# options halve their compile time without changing the HLO that XLA costs.
_CPU_COST_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class Sizes:
    cognitive: object
    unet: object
    controlnet: object
    vae: object
    cfw: object
    lr_side: int

    @property
    def context_width(self) -> int:
        return self.unet.base.cross_attention_dim

    @property
    def adapter_tokens(self) -> int:
        return self.cognitive.qformer.num_query_tokens


def sizes(which: str) -> Sizes:
    """The released CoSeR module configs, or the test suite's tiny ones (same structure:
    tests/test_coser_sampling.py, test_unet.py, test_vae.py, test_cfw_vae.py)."""
    from jaxsr.models.cfw_vae import CFWConfig
    from jaxsr.models.cognitive import COSER_COGNITIVE, TINY_COGNITIVE
    from jaxsr.models.coser_controlnet import COSER_CONTROLNET, CoSeRControlNetConfig
    from jaxsr.models.coser_unet import COSER_UNET, CoSeRUNetConfig
    from jaxsr.models.unet import SD2_BASE_UNET
    from jaxsr.models.vae import SD2_VAE

    if which == "full":
        return Sizes(COSER_COGNITIVE, COSER_UNET, COSER_CONTROLNET, SD2_VAE, CFWConfig(), 128)
    # E's width must equal the UNet's context width: the adapter tokens join the prompt.
    base = dataclasses.replace(
        SD2_BASE_UNET, block_out_channels=(16, 32, 64, 64), attention_head_dim=(1, 2, 4, 4),
        cross_attention_dim=TINY_COGNITIVE.qformer.hidden_size, norm_num_groups=8,
        sample_size=16)
    vae = dataclasses.replace(SD2_VAE, block_out_channels=(8, 16, 32, 32), norm_num_groups=4,
                              sample_size=64)
    return Sizes(TINY_COGNITIVE, CoSeRUNetConfig(base=base), CoSeRControlNetConfig(base=base),
                 vae, CFWConfig(rrdb_blocks=2, grow_channels=8), 16)


def build_networks(sz: Sizes, dtype, vae_dtype, attention: str, use_cfw: bool):
    """CoSeRNetworks: diffusion networks and cognitive encoder in `dtype`, autoencoders
    in `vae_dtype`."""
    from jaxsr.models.cfw_vae import CFWAutoencoderKL
    from jaxsr.models.cognitive import CognitiveEncoder
    from jaxsr.models.coser_controlnet import CoSeRControlNet
    from jaxsr.models.coser_unet import CoSeRUNet
    from jaxsr.models.vae import AutoencoderKL
    from jaxsr.pipelines.coser_sampling import CoSeRNetworks

    cfw = CFWAutoencoderKL(sz.vae, vae_dtype, attention, cfw=sz.cfw) if use_cfw else None
    return CoSeRNetworks(CognitiveEncoder(sz.cognitive, attention, dtype),
                         CoSeRUNet(sz.unet, dtype, attention),
                         CoSeRControlNet(sz.controlnet, dtype, attention),
                         AutoencoderKL(sz.vae, vae_dtype, attention), cfw)


def param_shapes(sz: Sizes, use_cfw: bool) -> dict:
    """The param tree `coser_restore` takes, as ShapeDtypeStructs (nothing allocated)."""
    from jaxsr.models import cognitive, coser_controlnet, coser_unet, vae
    from jaxsr.models.cfw_vae import cfw_param_shapes

    shapes = {"cognitive": cognitive.param_shapes(sz.cognitive),
              "unet": coser_unet.param_shapes(sz.unet),
              "controlnet": coser_controlnet.param_shapes(sz.controlnet),
              "vae": vae.param_shapes(sz.vae)}
    if use_cfw:
        shapes["cfw"] = cfw_param_shapes(sz.vae, sz.cfw)
    return shapes


# --------------------------------------------------------------------------- programs

def _fresh_noise(key, shape):
    """The pipeline's own noise source (`jaxsr.diffusion.noise`), one key per image:
    the same draws and cost as inside `coser_restore`."""
    import jax

    from jaxsr.diffusion.noise import noise_source

    return noise_source(jax.random.split(key, shape[0]), None, tuple(shape[1:]))


def reference_loop(nets, settings, unet_params, schedule, x, positive, negative, key):
    """The pipeline's reference-generation loop alone (one step with a 1-step schedule)."""
    from jaxsr.pipelines.coser_sampling import generate_reference

    return generate_reference(nets, settings, unet_params, schedule, x, positive, negative,
                              _fresh_noise(key, x.shape))


def sr_loop(nets, settings, params, schedule, x, z_lr, z_ref, positive, negative, key):
    """The pipeline's SR loop alone; params {"unet", "controlnet"}."""
    from jaxsr.pipelines.coser_sampling import super_resolve

    return super_resolve(nets, settings, params, schedule, x, z_lr, z_ref, positive, negative,
                         _fresh_noise(key, x.shape))


@dataclasses.dataclass
class Programs:
    """The three functions costed (and, with a 1-step schedule, the step ones timed) and
    their arguments; `params` may be arrays or ShapeDtypeStructs."""

    full: object
    full_args: tuple
    reference: object
    reference_args: tuple
    sr: object
    sr_args: tuple


def make_programs(nets, settings, params, sz: Sizes, batch: int, steps: int, seed: int = 0):
    import jax
    import jax.numpy as jnp

    from jaxsr.diffusion.respace import respaced_schedule
    from jaxsr.pipelines.coser_sampling import UPSCALE, coser_restore

    rng = np.random.default_rng(seed)
    side, width = sz.lr_side, sz.context_width
    lat = side * UPSCALE // 2 ** (len(sz.vae.block_out_channels) - 1)
    lr = rng.uniform(size=(batch, side, side, 3)).astype(np.float32)
    prompt, negative = (rng.standard_normal((batch, PROMPT_TOKENS, width)).astype(np.float32)
                        for _ in range(2))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(batch))
    positive = rng.standard_normal(
        (batch, PROMPT_TOKENS + sz.adapter_tokens, width)).astype(np.float32)
    x, z_lr, z_ref = (rng.standard_normal((batch, lat, lat, sz.vae.latent_channels))
                      .astype(np.float32) for _ in range(3))
    one = respaced_schedule(1)
    key = jax.random.key(seed + 1)
    return Programs(
        full=partial(coser_restore, nets, settings),
        full_args=(params, respaced_schedule(steps), lr, prompt, negative, keys),
        reference=partial(reference_loop, nets, settings),
        reference_args=(params["unet"], one, x, positive, negative, key),
        sr=partial(sr_loop, nets, settings),
        sr_args=({"unet": params["unet"], "controlnet": params["controlnet"]}, one, x, z_lr,
                 z_ref, positive, negative, key))


def compile_timed(fn, args, options=None):
    """(compiled, seconds to lower + compile)."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
    return compiled, time.perf_counter() - start


# --------------------------------------------------------------------------- FLOP counts

def loop_body_counted_once() -> bool:
    """Whether XLA's cost analysis counts a fori_loop body once (True for the XLA of
    JAX 0.4–0.10) or at its trip count."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((32, 32), jnp.float32)
    one = xla_flops(jax.jit(lambda x: x @ x).lower(a).compile())
    looped = xla_flops(jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, y: y @ x, x))
                       .lower(a).compile())
    return looped is None or one is None or looped < 2 * one


def compose(outside: float | None, reference: float | None, sr: float | None, n: int):
    if None in (outside, reference, sr):
        return None
    return outside + n * (reference + sr)


def doc_check(dtype) -> list[dict]:
    """Full-size analytic TFLOP of single passes and steps (batch 1, 512² output, the
    positive context of 127 tokens unless said) next to the reference doc's."""
    import jax
    import jax.numpy as jnp

    from jaxsr.models.coser_unet import control_feature_shapes
    from jaxsr.pipelines.coser_sampling import CoSeRSettings

    sz = sizes("full")
    nets = build_networks(sz, dtype, jnp.float32, "xla", True)
    shapes = param_shapes(sz, True)
    f32 = jnp.float32
    spec = lambda *s: jax.ShapeDtypeStruct(s, f32)
    lat, ch, width = 64, sz.vae.latent_channels, sz.context_width
    x, t = spec(1, lat, lat, ch), jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = spec(1, PROMPT_TOKENS + sz.adapter_tokens, width)
    feats = [spec(*s) for s in control_feature_shapes(sz.unet.base, 1, lat, lat)]
    image = spec(1, 512, 512, 3)
    enc_feats = jax.eval_shape(
        lambda p, i: nets.cfw.apply({"params": p}, i, method="encode_features"),
        shapes["cfw"], image)

    def apply(module, params, *args, method=None):
        return module.apply({"params": params}, *args, method=method)

    parts = {
        "unet_aia_pass": (partial(apply, nets.unet), shapes["unet"], x, t, ctx, feats, feats),
        "unet_gen_pass": (partial(apply, nets.unet), shapes["unet"], x, t, ctx),
        "controlnet_pass": (partial(apply, nets.controlnet), shapes["controlnet"], x, t, ctx,
                            x),
        "vae_encode": (partial(apply, nets.vae, method="encode"), shapes["vae"], image),
        "cfw_encoder_features": (partial(apply, nets.cfw, method="encode_features"),
                                 shapes["cfw"], image),
        "vae_decode": (partial(apply, nets.vae, method="decode"), shapes["vae"], x),
        "cfw_decode": (partial(apply, nets.cfw, method="decode_cfw"), shapes["cfw"], x,
                       enc_feats, 0.5),
        "cognitive_encoder": (partial(apply, nets.cognitive), shapes["cognitive"],
                              spec(1, 128, 128, 3)),
    }
    ours = {name: analytic_flops(fn, *args)["flops"] / 1e12
            for name, (fn, *args) in parts.items()}
    progs = make_programs(nets, CoSeRSettings(), shapes, sz, 1, FULL_STEPS)
    ours["reference_step"] = analytic_flops(progs.reference, *progs.reference_args)["flops"] / 1e12
    ours["sr_step"] = analytic_flops(progs.sr, *progs.sr_args)["flops"] / 1e12
    # The doc's composition: three encodes, 50 × both steps, both decodes, no E.
    ours["total_50_steps"] = (3 * ours["vae_encode"] + FULL_STEPS * (ours["reference_step"]
                              + ours["sr_step"]) + ours["vae_decode"] + ours["cfw_decode"])
    notes = {"sr_step": "CN batch 2 + UNet-AiA (ctx 127, ctx 77)",
             "reference_step": "gen UNet (ctx 127, ctx 77)",
             "total_50_steps": "doc's composition (3 encodes, no E)",
             "cfw_encoder_features": "encoder up to level 2 (doc: a full encode)"}
    return [{"part": name, "ours_TFLOP": value, "doc_TFLOP": DOC_TFLOP.get(name),
             "ours/doc": value / DOC_TFLOP[name] if name in DOC_TFLOP else None,
             "note": notes.get(name, "")} for name, value in ours.items()]


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default=None,
                    help="default: tiny on CPU, full elsewhere")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps run; default 50, or 2 for full size on CPU (extrapolated)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="UNet/ControlNet/cognitive compute; default bfloat16 on "
                         "accelerators, float32 on CPU")
    ap.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--no-cfw", action="store_true", help="plain VAE decode of the SR latent")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flops-only", action="store_true",
                    help="only count FLOPs (abstract weights, nothing runs)")
    ap.add_argument("--skip-doc-check", action="store_true",
                    help="skip the full-size per-pass count against the reference doc")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from jaxsr.platform import configure_xla_defaults

    configure_xla_defaults()
    import jax
    import jax.numpy as jnp

    from jaxsr.nn import attention as attention_module
    from jaxsr.pipelines.coser_sampling import UPSCALE, CoSeRSettings

    platform = jax.default_backend()
    on_cpu = platform == "cpu"
    size = args.size or ("tiny" if on_cpu else "full")
    steps = args.steps or (2 if on_cpu and size == "full" else FULL_STEPS)
    dtype_name = args.dtype or ("float32" if on_cpu else "bfloat16")
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    use_cfw = not args.no_cfw
    sz = sizes(size)
    settings = CoSeRSettings()
    b = args.batch

    # The timed program can double as the counted one when it has no custom call
    # ("xla" attention everywhere) and none of jaxsr's row-chunk loops (checked below).
    timed_is_countable = attention_module.resolve_backend(args.attention, 1 << 20) == "xla"

    shapes = param_shapes(sz, use_cfw)
    n_params = {k: int(sum(math.prod(x.shape) for x in jax.tree.leaves(v)))
                for k, v in shapes.items()}
    count_nets = build_networks(sz, dt[dtype_name], dt[args.vae_dtype], "xla", use_cfw)
    timed_nets = build_networks(sz, dt[dtype_name], dt[args.vae_dtype], args.attention, use_cfw)
    print(f"CoSeR {size}: {sz.lr_side}² LR -> {sz.lr_side * UPSCALE}² output, batch {b}, "
          f"{steps} steps, {dtype_name} (VAE {args.vae_dtype}), {platform}; params {n_params}",
          flush=True)

    once = loop_body_counted_once()
    timing = {}
    compiled = {}
    if not args.flops_only:
        print("building random weights ...", flush=True)
        params = jax.device_put({k: random_params(v, seed)
                                 for seed, (k, v) in enumerate(shapes.items())})
        progs = make_programs(timed_nets, settings, params, sz, b, steps)
        timed_is_countable = (timed_is_countable
                              and not has_chunk_loops(progs.full, *progs.full_args))
        print("compiling the whole program ...", flush=True)
        compiled["full"], compile_s = compile_timed(progs.full, progs.full_args)
        print(f"  {compile_s:.1f} s", flush=True)
        run = lambda c, a: jax.block_until_ready(c(*a))
        t_full = time_call(lambda: run(compiled["full"], progs.full_args),
                           warmup=args.warmup, repeats=args.repeats)
        timing = {"compile_s": compile_s, "runs_s": t_full,
                  "median_s": statistics.median(t_full)}
        if steps < FULL_STEPS or timed_is_countable:
            # One-step loops: the per-step times for the extrapolation, and (when the
            # timed program is costed) the per-step FLOPs.
            for name in ("reference", "sr"):
                compiled[name], c_s = compile_timed(getattr(progs, name),
                                                    getattr(progs, f"{name}_args"))
                ts = time_call(lambda n=name: run(compiled[n], getattr(progs, f"{n}_args")),
                               warmup=args.warmup, repeats=args.repeats)
                timing[f"{name}_step_s"] = statistics.median(ts)
                timing[f"{name}_step_compile_s"] = c_s
        del params

    # ---- FLOPs (a): XLA cost analysis, composed over the loops.
    abstract = make_programs(count_nets, settings, shapes, sz, b, steps)
    options = _CPU_COST_ONLY if on_cpu else None
    xla = {}
    for name in ("full", "reference", "sr"):
        if timed_is_countable and name in compiled:
            xla[name] = xla_flops(compiled[name])
            continue
        print(f"compiling the {name} program for XLA's cost analysis ...", flush=True)
        with unchunked():
            c, c_s = compile_timed(getattr(abstract, name), getattr(abstract, f"{name}_args"),
                                   options)
        print(f"  {c_s:.1f} s", flush=True)
        xla[name] = xla_flops(c)
        del c
    loops_in_full = 1 if once else steps
    outside_xla = (None if None in xla.values()
                   else xla["full"] - loops_in_full * (xla["reference"] + xla["sr"]))

    # ---- FLOPs (b): analytic conv/matmul count of the same traced programs.
    ana_full = analytic_flops(abstract.full, *abstract.full_args)
    ana_ref = analytic_flops(abstract.reference, *abstract.reference_args)["flops"]
    ana_sr = analytic_flops(abstract.sr, *abstract.sr_args)["flops"]
    outside_ana = ana_full["flops"] - steps * (ana_ref + ana_sr)
    if ana_full["flops_in_unknown_loops"]:
        print(f"warning: {ana_full['flops_in_unknown_loops']:.3g} FLOPs sit in while loops "
              "of unknown trip count and were counted once", flush=True)

    per = lambda v: None if v is None else v / b
    flop_rows = [
        {"part": "outside loops (E, encode, decodes)", "XLA": per(outside_xla),
         "analytic": per(outside_ana)},
        {"part": "reference step", "XLA": per(xla["reference"]), "analytic": per(ana_ref)},
        {"part": "SR step", "XLA": per(xla["sr"]), "analytic": per(ana_sr)},
        {"part": f"total, {steps} steps", "XLA": per(compose(outside_xla, xla["reference"],
                                                             xla["sr"], steps)),
         "analytic": per(ana_full["flops"])},
        {"part": f"total, {FULL_STEPS} steps",
         "XLA": per(compose(outside_xla, xla["reference"], xla["sr"], FULL_STEPS)),
         "analytic": per(compose(outside_ana, ana_ref, ana_sr, FULL_STEPS))},
        {"part": "whole program, loop bodies once", "XLA": per(xla["full"]),
         "analytic": per(ana_full["flops_loops_once"])},
    ]
    flops50 = {"XLA": flop_rows[4]["XLA"], "analytic": flop_rows[4]["analytic"]}
    if steps == FULL_STEPS:
        del flop_rows[3]
    for row in flop_rows:
        row["XLA/analytic"] = (row["XLA"] / row["analytic"]
                               if row["XLA"] is not None and row["analytic"] else None)

    # ---- time per image and achieved rate.
    run_row = None
    peak = None
    if timing:
        peak = measure_peak(dt[dtype_name])
        s_image = timing["median_s"] / b
        extrapolated = steps < FULL_STEPS
        s50 = s_image
        if extrapolated:
            per_step = timing["reference_step_s"] + timing["sr_step_s"]
            s50 = (timing["median_s"] + (FULL_STEPS - steps) * per_step) / b
        run_row = {"size": size, "platform": platform, "dtype": dtype_name, "batch": b,
                   "steps_run": steps, "compile_s": timing["compile_s"],
                   "s_per_image": s_image, "s_per_image_50": s50,
                   "extrapolated": extrapolated,
                   "ref_step_s": timing.get("reference_step_s"),
                   "sr_step_s": timing.get("sr_step_s"),
                   "flops_50_analytic": flops50["analytic"], "flops_50_XLA": flops50["XLA"],
                   "flop_per_s_analytic": flops50["analytic"] / s50,
                   "flop_per_s_XLA": None if flops50["XLA"] is None else flops50["XLA"] / s50,
                   "peak_flop_per_s": peak,
                   "pct_of_peak": 100 * flops50["analytic"] / s50 / peak}

    doc_rows = [] if args.skip_doc_check else doc_check(dt[dtype_name])

    print(f"\nCoSeR {size}, {sz.lr_side * UPSCALE}² output, random weights, {platform}, "
          f"{dtype_name}; XLA counts a loop body once: {once}")
    unit, unit_name = (1e9, "GFLOP") if size == "tiny" else (1e12, "TFLOP")
    if run_row:
        print("\nper image (median of "
              f"{args.repeats} after {args.warmup} warm-up; 50-step time "
              f"{'EXTRAPOLATED from the step times' if run_row['extrapolated'] else 'measured'};"
              " % of peak from the analytic count):")
        scaled = lambda v: None if v is None else v / unit
        shown = {k: v for k, v in run_row.items() if not k.startswith(("flop", "peak"))}
        shown.update({f"{unit_name}_50_analytic": scaled(run_row["flops_50_analytic"]),
                      f"{unit_name}_50_XLA": scaled(run_row["flops_50_XLA"]),
                      f"{unit_name}/s_analytic": scaled(run_row["flop_per_s_analytic"]),
                      f"{unit_name}/s_XLA": scaled(run_row["flop_per_s_XLA"]),
                      f"peak_{unit_name}/s": scaled(peak)})
        shown["pct_of_peak"] = shown.pop("pct_of_peak")
        print_table([shown], list(shown))
    print(f"\nFLOPs per image, {unit_name} (XLA: cost analysis composed over the loops; "
          "analytic: 2 × conv/matmul MACs):")
    print_table([{k: (v / unit if isinstance(v, float) and k != "XLA/analytic" else v)
                  for k, v in r.items()} for r in flop_rows],
                ["part", "XLA", "analytic", "XLA/analytic"])
    if doc_rows:
        print("\nfull size, batch 1, 512² output: analytic count vs docs/coser_reference.md §7"
              " (TFLOP)")
        print_table(doc_rows, ["part", "ours_TFLOP", "doc_TFLOP", "ours/doc", "note"])

    name = f"coser_sr_{size}_{platform}"
    write_json(args.out or f"benchmarks/results/{name}.json", {
        "benchmark": "coser_sr", "size": size, "lr_side": sz.lr_side,
        "output_side": sz.lr_side * UPSCALE, "batch": b, "steps_run": steps,
        "dtype": dtype_name, "vae_dtype": args.vae_dtype, "attention": args.attention,
        "cfw_decode": use_cfw, "params": n_params, "flops_only": args.flops_only,
        "xla_counts_loop_body_once": once, "timed_program_costed": timed_is_countable,
        "timing": timing, "run": run_row, "peak_flops": peak,
        "extrapolation": ("s_per_image_50 = (t(N steps) + (50 - N) * (t_ref_step + "
                          "t_sr_step)) / batch, step times from one-step loops compiled "
                          "alone" if steps < FULL_STEPS else None),
        "flops_per_image": flop_rows, "doc_check_full_size": doc_rows,
        "environment": environment()})


if __name__ == "__main__":
    main()
