"""SeeSR training beside MaxDiffusion's published SDXL training throughput, normalised
by the FLOPs one training image costs.

    python benchmarks/maxdiffusion_compare.py          # ~1 min on 2 cores, no TPU

MaxDiffusion publishes SDXL training at 512² on a v5p-128 slice (64 chips) at 77
images/s/chip. Images of different models cost different work, so the comparison
is in FLOPs per image:

- SeeSR: the full-size `configs/seesr_train.py` train step exactly as `jaxsr plan`
  traces it (degradation, frozen DAPE / text encoder / VAE encoder, ControlNet +
  UNet forward and backward), counted by `jaxsr.plan.flops` (2 x matmul/conv MACs,
  loops at their trip counts). Traced from shapes only: nothing is compiled.
- SDXL: diffusers' UNet2DConditionModel at SDXL-base's configuration (2.57 B
  parameters), forward and backward at a 64² latent, counted by PyTorch's
  FlopCounterMode on the meta device (no weights, no compute). Only the UNet: the
  VAE latents and text embeddings are taken as precomputed, as MaxDiffusion's SDXL
  trainer caches them; counting them would only raise MaxDiffusion's figure.
- The two counters are checked against each other on the SD2 UNet forward (the
  same network in both libraries): their ratio is printed and must be ~1.

From these: the MFU MaxDiffusion's 77 images/s/chip implies on v5p (459 TFLOP/s
peak bf16), and the SeeSR images/s/chip that the same MFU would give. Both are
arithmetic on a published number and counted FLOPs, not measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, write_json  # noqa: E402

MAXDIFFUSION_SDXL = {
    "images_per_s_per_chip": 77.0, "resolution": 512, "slice": "v5p-128 (64 chips)",
    "source": "MaxDiffusion's published SDXL training throughput, as cited in jaxsr's TPU "
              "plan issue; the primary page was not available offline to re-read"}

SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


def torch_unet_flops(unet_kwargs: dict, latent: int, context: tuple[int, int],
                     added: dict | None, backward: bool) -> tuple[float, float]:
    """(FLOPs, parameters) of one diffusers UNet call on one latent, on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kwargs)
        x = torch.zeros(1, 4, latent, latent)
        ctx = torch.zeros(1, *context)
        cond = {k: torch.zeros(1, n) for k, n in (added or {}).items()}
        t = torch.tensor([500])
    counter = FlopCounterMode(display=False)
    with counter:
        out = unet(x, t, ctx, added_cond_kwargs=cond or None).sample
        if backward:
            out.sum().backward()
    return float(counter.get_total_flops()), float(sum(p.numel() for p in unet.parameters()))


def jaxsr_sd2_unet_forward_flops(latent: int) -> float:
    """jaxsr's counter on its own SD2 UNet forward at one `latent`² latent."""
    import jax
    import jax.numpy as jnp

    from jaxsr.models import unet
    from jaxsr.plan.flops import analytic_flops

    cfg = unet.SD2_BASE_UNET
    model = unet.UNet2DConditionModel(cfg)
    args = (unet.param_shapes(cfg),
            jax.ShapeDtypeStruct((1, latent, latent, 4), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1, 77, cfg.cross_attention_dim), jnp.float32))
    return analytic_flops(lambda p, x, t, c: model.apply({"params": p}, x, t, c), *args)[
        "flops"]


def seesr_train_flops_per_image(crop: int) -> dict:
    """FLOPs per image of the full-size SeeSR train step (traced for one CPU device as
    for a TPU; the count does not depend on the mesh)."""
    import jax

    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.flops import jaxpr_flops
    from jaxsr.plan.programs import seesr_train_program
    from jaxsr.platform import compiling_for
    from jaxsr.train.config_file import load_config

    config = load_config("configs/seesr_train.py", [])
    config.data.crop_size = crop
    mesh = make_mesh([("data", 1)], jax.devices()[:1])
    batch = 2
    with compiling_for("tpu"):
        program = seesr_train_program(config, mesh, batch)
        counted = jaxpr_flops(program.jitted.trace(*program.args).jaxpr.jaxpr)
    return {"flops_per_image": counted["flops"] / program.images_per_call,
            "images_traced": program.images_per_call}


def _plan_row(path: str) -> dict | None:
    """The predicted SeeSR training row of the TPU plan table (benchmarks/tpu_plan.py),
    if it has been compiled: FLOPs per image there include the remat recompute."""
    p = Path(path)
    best = json.loads(p.read_text()).get("best") if p.exists() else None
    if not best:
        return None
    per_step = best["flops_per_chip"] * best["chips"] / best["images_per_step"]
    return {"flops_per_image": per_step, "batch_per_chip": best["batch_per_chip"],
            "mesh": best["mesh"], "mfu": best["predicted"]["mfu"],
            "images_per_s_per_chip": best["predicted"]["images_per_s_per_chip"],
            "bound": best["predicted"]["bound"], "extra_args": best.get("extra_args", [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/maxdiffusion_compare.json")
    args = ap.parse_args()
    from jaxsr.plan.chips import CHIPS
    from jaxsr.platform import quiet_absent_tpu

    quiet_absent_tpu()      # CPU tracing only: no TPU backend start-up noise

    start = time.perf_counter()
    sd2 = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
               cross_attention_dim=1024, use_linear_projection=True, sample_size=64)
    torch_sd2, _ = torch_unet_flops(sd2, 64, (77, 1024), None, backward=False)
    jaxsr_sd2 = jaxsr_sd2_unet_forward_flops(64)
    sdxl_fwd, sdxl_params = torch_unet_flops(
        SDXL_BASE_UNET, 64, (77, 2048), {"text_embeds": 1280, "time_ids": 6}, backward=False)
    sdxl_train, _ = torch_unet_flops(
        SDXL_BASE_UNET, 64, (77, 2048), {"text_embeds": 1280, "time_ids": 6}, backward=True)
    seesr = seesr_train_flops_per_image(512)
    plan = _plan_row("benchmarks/results/tpu_plan/train_v5p_4x4x4.json")

    v5p = CHIPS["v5p"]
    md_rate = MAXDIFFUSION_SDXL["images_per_s_per_chip"]
    md_mfu = md_rate * sdxl_train / v5p.peak_bf16_flops
    seesr_rate = md_rate * sdxl_train / seesr["flops_per_image"]
    rows = [
        {"work": "SD2 UNet forward, 64² latent (counter check)",
         "TFLOP/image": jaxsr_sd2 / 1e12, "note": f"jaxsr / PyTorch count = "
                                                 f"{jaxsr_sd2 / torch_sd2:.4f}"},
        {"work": "SDXL UNet forward, 64² latent", "TFLOP/image": sdxl_fwd / 1e12,
         "note": f"{sdxl_params / 1e9:.2f} B params"},
        {"work": "SDXL training (UNet fwd + bwd), 512²", "TFLOP/image": sdxl_train / 1e12,
         "img/s/chip": md_rate, "MFU": md_mfu,
         "note": "MaxDiffusion, published rate; MFU implied on v5p"},
        {"work": "SeeSR training step, 512² crops", "TFLOP/image":
         seesr["flops_per_image"] / 1e12, "img/s/chip": seesr_rate, "MFU": md_mfu,
         "note": "at MaxDiffusion's implied MFU (normalised by FLOPs/image)"},
    ]
    if plan:
        rows.append({"work": "SeeSR training step, jaxsr plan on v5p:4x4x4",
                     "TFLOP/image": plan["flops_per_image"] / 1e12,
                     "img/s/chip": plan["images_per_s_per_chip"], "MFU": plan["mfu"],
                     "note": f"predicted by the roofline, {plan['bound']}-bound "
                             f"(batch {plan['batch_per_chip']}/chip, {plan['mesh']})"})
    print("FLOPs per training image (2 x matmul/conv MACs); rates are arithmetic on "
          "MaxDiffusion's published number, not measurements:")
    print_table(rows, ["work", "TFLOP/image", "img/s/chip", "MFU", "note"])
    write_json(args.out, {
        "benchmark": "maxdiffusion_compare", "maxdiffusion": MAXDIFFUSION_SDXL,
        "chip": {"name": "v5p", "peak_bf16_flops": v5p.peak_bf16_flops,
                 "source": v5p.source},
        "sd2_unet_forward_flops": {"jaxsr": jaxsr_sd2, "torch": torch_sd2,
                                   "ratio": jaxsr_sd2 / torch_sd2},
        "sdxl_unet": {"params": sdxl_params, "forward_flops": sdxl_fwd,
                      "train_flops_per_image": sdxl_train},
        "seesr_train": seesr,
        "maxdiffusion_implied_mfu": md_mfu,
        "seesr_images_per_s_per_chip_at_that_mfu": seesr_rate,
        "seesr_plan_v5p_4x4x4": plan,
        "wall_s": round(time.perf_counter() - start, 1), "environment": environment()})


if __name__ == "__main__":
    main()
