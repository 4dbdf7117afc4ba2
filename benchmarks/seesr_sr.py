"""Full-size SeeSR super-resolution (random weights): per-image time, compile time, MFU.

    python benchmarks/seesr_sr.py                        # CPU: 2 steps, batch 1
    python benchmarks/seesr_sr.py --steps 50 --batches 1,8 --torch   # GPU

Work per image: a 128² LR → 512² output (latent 64²), DAPE (Swin-L 384), text
encoder (positive + negative), VAE encode, `--steps` steps of ControlNet + UNet
with classifier-free guidance (batch 2 per image), VAE decode, colour fix — the
whole jitted `restore` program the pipeline runs, on random weights of the
released sizes (UNet 1.13 B, ControlNet 0.49 B parameters).

Reported per batch size: compile seconds of the restore program; seconds per image
(end to end: DAPE + text + restore); seconds per denoising step; the step loop's
FLOPs (XLA cost analysis of one guided ControlNet+UNet evaluation) and MFU against
the peak measured here by a large matmul in the same dtype. When fewer steps than
50 run (the CPU default), the 50-step time is extrapolated as
time(N steps) + (50 − N) · time per step, with the per-step time taken from the
difference of an N-step and a 1-step run; the JSON says so.

With `--torch`, the same denoising loop runs in PyTorch diffusers on the same device
(UNet2DConditionModel + ControlNetModel with SeeSR's RCA blocks composed as in the
tests, DDPMScheduler, guidance batch 2) for a side-by-side time per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    environment,
    measure_peak,
    print_table,
    random_params,
    unchunked,
    write_json,
)

SD2_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
                 "set_alpha_to_one": False, "prediction_type": "epsilon"}


def flops_of(program) -> float:
    """The "flops" of XLA's cost analysis of a lowered or compiled program."""
    cost = program.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default: 50 on GPU/TPU, 2 on CPU")
    ap.add_argument("--batches", default=None, help="comma list; default 1,8 on GPU, 1 on CPU")
    ap.add_argument("--lr-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch diffusers loop")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (checks the script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from jaxsr.platform import configure_xla_defaults

    configure_xla_defaults()
    import jax
    import jax.numpy as jnp

    from jaxsr.diffusion.samplers import make_sampler
    from jaxsr.diffusion.schedule import SchedulerConfig
    from jaxsr.models import clip_text, controlnet, dape, unet, vae
    from jaxsr.pipelines.seesr_sampling import (
        Networks,
        SamplingSettings,
        guided_eps,
        restore,
        start_coefficients,
    )

    on_cpu = jax.default_backend() == "cpu"
    steps = args.steps or (2 if on_cpu else 50)
    batches = [int(b) for b in (args.batches or ("1" if on_cpu else "1,8")).split(",")]
    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]

    unet_cfg = dataclasses.replace(unet.SD2_BASE_UNET, use_image_cross_attention=True,
                                   image_cross_attention_dim=512)
    cn_cfg, vae_cfg = controlnet.SEESR_CONTROLNET, vae.SD2_VAE
    text_cfg, dape_cfg = clip_text.SD2_TEXT_ENCODER, dape.DAPEConfig()
    if args.tiny:
        unet_cfg = dataclasses.replace(
            unet_cfg, block_out_channels=(32, 64, 64, 64), attention_head_dim=(1, 2, 2, 2),
            norm_num_groups=8, image_cross_attention_dim=dape_cfg.embed_width)
        cn_cfg = dataclasses.replace(cn_cfg, block_out_channels=(32, 64, 64, 64),
                                     attention_head_dim=(1, 2, 2, 2), norm_num_groups=8)
        vae_cfg = dataclasses.replace(vae_cfg, block_out_channels=(16, 32, 32, 32),
                                      norm_num_groups=8)

    print("building random weights ...", flush=True)
    nets = Networks(unet=unet.UNet2DConditionModel(unet_cfg, dt, args.attention),
                    controlnet=controlnet.ControlNetModel(cn_cfg, dt, args.attention),
                    vae=vae.AutoencoderKL(vae_cfg, jnp.float32, args.attention))
    params = {"unet": random_params(unet.param_shapes(unet_cfg), 0),
              "controlnet": random_params(controlnet.param_shapes(cn_cfg), 1),
              "vae": random_params(vae.param_shapes(vae_cfg), 2)}
    text_params = random_params(clip_text.param_shapes(text_cfg), 3)
    dape_params = random_params(dape.param_shapes(dape_cfg), 4)
    params, text_params, dape_params = jax.device_put((params, text_params, dape_params))
    n_params = {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(v)))
                for k, v in params.items()}

    sa, s1a = start_coefficients(SchedulerConfig.from_diffusers(SD2_SCHEDULER, "ddpm")
                                 .alphas_cumprod(), 999)
    settings = SamplingSettings(guidance_scale=5.5, conditioning_scale=1.0, start_sqrt_alpha=sa,
                                start_sqrt_one_minus_alpha=s1a, color_fix="adain",
                                latent_tile=96, latent_tile_overlap=4, vae_encoder_tile=1024,
                                vae_decoder_tile=224)
    text_model = clip_text.CLIPTextModel(text_cfg, dt, args.attention)
    dape_model = dape.DAPE(dape_cfg, attention=args.attention, dtype=jnp.float32)
    dape_fn = jax.jit(lambda p, x: dape_model.apply({"params": p}, x))
    text_fn = jax.jit(lambda p, ids: text_model.apply({"params": p}, ids))
    restore_fn = jax.jit(partial(restore, nets, settings))

    peak = measure_peak(dt)
    print(f"measured {args.dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s", flush=True)
    side = args.lr_size * 4
    lat = side // 8
    rows, results = [], []
    for b in batches:
        rng = np.random.default_rng(b)
        lr_dape = rng.standard_normal((b, 384, 384, 3)).astype(np.float32)
        ids = rng.integers(0, text_cfg.vocab_size, (2 * b, 77)).astype(np.int32)
        control = rng.uniform(size=(b, side, side, 3)).astype(np.float32)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(b))

        def run(plan, _b=b, _ids=ids, _lr=lr_dape, _control=control, _keys=keys):
            ram, _ = dape_fn(dape_params, _lr)
            text = text_fn(text_params, _ids).reshape(_b, 2, 77, -1)
            return restore_fn(params, plan, _control, text, ram, _keys).block_until_ready()

        plan_n, plan_1 = (make_sampler("ddpm", SD2_SCHEDULER, n) for n in (steps, 1))
        start = time.perf_counter()
        ram0, _ = dape_fn(dape_params, lr_dape)
        text0 = text_fn(text_params, ids).reshape(b, 2, 77, -1)
        restore_fn.lower(params, plan_n, control, text0, ram0, keys).compile()
        compile_s = time.perf_counter() - start
        run(plan_n)                        # warm-up
        t_n = _timed(run, plan_n)
        t_1 = t_n
        if steps > 1:
            run(plan_1)                    # the 1-step program compiles separately
            t_1 = _timed(run, plan_1)
        per_step = (t_n - t_1) / (steps - 1) if steps > 1 else None

        # FLOPs of one guided ControlNet+UNet evaluation (the loop body's networks),
        # traced without jaxsr's row-chunk loops, whose bodies XLA would count once.
        step_fn = jax.jit(lambda p, x, c, tx, r: guided_eps(nets, settings, p, jnp.int32(500),
                                                          x, c, tx, r))
        x0 = jnp.zeros((b, lat, lat, 4), jnp.float32)
        with unchunked():
            step_flops = flops_of(step_fn.lower(params, x0, control,
                                                text0.reshape(2 * b, 77, -1), ram0))
        at50 = t_n + (50 - steps) * per_step if per_step is not None else None
        row = {"batch": b, "steps_run": steps, "compile_s": compile_s,
               "s_per_image": t_n / b, "s_per_step": per_step,
               "s_per_image_50_steps": (at50 / b) if at50 else None,
               "step_TFLOP": step_flops / 1e12,
               "loop_MFU": (step_flops / per_step / peak) if per_step else None,
               "extrapolated": steps < 50}
        if args.torch:
            row["torch_s_per_step"] = torch_step_time(b, lat, args.dtype, args.tiny, steps)
        rows.append(row)
        results.append(row)
        print_table([row], list(row))

    print(f"\nSeeSR {side}² output, random weights, {args.dtype}, guidance 5.5; "
          f"params {n_params}")
    cols = ["batch", "steps_run", "compile_s", "s_per_image", "s_per_step",
            "s_per_image_50_steps", "step_TFLOP", "loop_MFU"]
    if args.torch:
        cols.append("torch_s_per_step")
    print_table(rows, cols)
    name = "seesr_sr_" + ("cpu" if on_cpu else jax.default_backend()) + ("_tiny" if args.tiny
                                                                       else "")
    write_json(args.out or f"benchmarks/results/{name}.json",
               {"benchmark": "seesr_sr", "lr_size": args.lr_size, "dtype": args.dtype,
                "tiny": args.tiny, "peak_flops": peak, "params": n_params,
                "rows": results, "environment": environment()})


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def torch_step_time(batch: int, lat: int, dtype: str, tiny: bool, steps: int) -> float:
    """Seconds per guided step of a diffusers UNet+ControlNet (with RCA) DDPM loop."""
    import diffusers
    import torch

    from jaxsr.models.unet import SD2_BASE_UNET
    from tests import seesr_reference as ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    cfg = SD2_BASE_UNET.to_diffusers_config()
    if tiny:
        cfg.update(block_out_channels=(32, 64, 64, 64), attention_head_dim=(1, 2, 2, 2),
                   norm_num_groups=8)
    unet = ref.seesr_unet(cfg, 512)
    cn = ref.seesr_controlnet_from_unet(unet, 512)
    unet, cn = (m.to(device, tdt).eval() for m in (unet, cn))
    sched = diffusers.DDPMScheduler(**{k: v for k, v in SD2_SCHEDULER.items()
                                       if k != "set_alpha_to_one"})
    sched.set_timesteps(steps)
    x = torch.randn(batch, 4, lat, lat, device=device, dtype=tdt)
    image = torch.rand(2 * batch, 3, lat * 8, lat * 8, device=device, dtype=tdt)
    text = torch.randn(2 * batch, 77, 1024, device=device, dtype=tdt)
    ref.RCA_CONTEXT["image"] = torch.randn(2 * batch, 145, 512, device=device, dtype=tdt)

    def loop(timesteps):
        y = x
        for t in timesteps:
            xin = torch.cat([y, y])
            down, mid = cn(xin, t, encoder_hidden_states=text, controlnet_cond=image,
                           return_dict=False)
            eps = unet(xin, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
            u, c = eps.chunk(2)
            y = sched.step(u + 5.5 * (c - u), t, y).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        loop(sched.timesteps[:1])          # warm-up: one step is enough in eager mode
        start = time.perf_counter()
        loop(sched.timesteps)
        return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
