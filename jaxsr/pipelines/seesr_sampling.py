"""The device half of SeeSR inference: VAE encode → LR-latent start → denoising loop →
VAE decode → colour fix, as one function for jit.

    restore(params, plan, control, text, ram, keys, noises) -> uint8 [B, H, W, 3]

control: [B, H, W, 3] float32 in [0, 1], the ×4 bicubic LR (the ControlNet image and
  the colour-fix reference), H and W multiples of 8.
text: [B, 2, L, D] (each image's negative, then positive prompt) with guidance,
  else [B, L, D]. The guidance batch is interleaved (image 0 unconditional,
  image 0 conditional, image 1 ...) rather than concatenated as in diffusers: the
  numbers are the same, and a data-parallel shard then holds both branches of its
  own images, so the loop needs no cross-device traffic.
ram: [B, N, E] DAPE soft prompts (both guidance branches get the same ones, as SeeSR).
keys: [B] typed PRNG keys, one per image (unused when `noises` is given).
noises: None, or explicit draws {"posterior": [B,h,w,c], "initial": [B,h,w,c],
  "steps": [N,B,h,w,c]} to replay a reference exactly.

The start is pipeline_seesr.py's start_point: "lr" noises the LR latent to the start
timestep (√ᾱ_t·z + √(1−ᾱ_t)·ε, its `add_noise`), "noise" starts from ε alone and
encodes nothing (settings.start_from_noise). Either way the plan's steps at t above the
start timestep are skipped, as that loop skips them (`skip_steps_above`).

The facts (schedule, t=999 start, guidance, tiling, rounding) are SeeSR's
`test_seesr.py`/`pipeline_seesr.py`; see the pipeline module's docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.diffusion.colorfix import color_fix, to_uint8_round, to_uint8_truncate
from jaxsr.diffusion.noise import noise_source
from jaxsr.diffusion.samplers import SamplerPlan, per_step, sampler_init, sampler_step
from jaxsr.diffusion.tiled_vae import tiled_decode, tiled_encode
from jaxsr.diffusion.tiling import maybe_tiled_apply
from jaxsr.inference import step_progress
from jaxsr.models.controlnet import ControlNetModel
from jaxsr.models.unet import UNet2DConditionModel
from jaxsr.models.vae import AutoencoderKL

# Stream ids folded into each image's key: one independent stream per use.
POSTERIOR_STREAM, INITIAL_STREAM, STEP_STREAM = 0, 1, 2


class SamplingSettings(NamedTuple):
    """Everything that changes the compiled program (hashable, static under jit)."""

    guidance_scale: float
    conditioning_scale: float
    start_sqrt_alpha: float          # √ᾱ_start and √(1−ᾱ_start) of the LR-latent start
    start_sqrt_one_minus_alpha: float
    color_fix: str                   # "adain" | "wavelet" | "nofix"
    latent_tile: int
    latent_tile_overlap: int
    vae_encoder_tile: int
    vae_decoder_tile: int
    start_from_noise: bool = False   # start_point "noise": x_T = ε, the LR is not encoded
    step_progress: bool = False      # report each loop step to the host (step_progress.py)

    @property
    def guided(self) -> bool:
        # diffusers: do_classifier_free_guidance = guidance_scale > 1
        return self.guidance_scale > 1.0


class Networks(NamedTuple):
    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    vae: AutoencoderKL


def lr_latent_start(nets: Networks, settings: SamplingSettings, vae_params, control, noise):
    """√ᾱ_start·z_lr + √(1−ᾱ_start)·ε with z_lr = scaling · posterior sample of 2·control − 1.

    control [B, H, W, 3] in [0, 1] -> float32 [B, H/8, W/8, c]."""
    posterior = tiled_encode(nets.vae, vae_params, 2.0 * control - 1.0,
                             tile=settings.vae_encoder_tile)
    z = posterior.sample_with_noise(noise("posterior", POSTERIOR_STREAM))
    z = z * nets.vae.config.scaling_factor
    return (settings.start_sqrt_alpha * z
            + settings.start_sqrt_one_minus_alpha * noise("initial", INITIAL_STREAM))


def guided_eps(nets: Networks, settings: SamplingSettings, params, t, x, control, text, ram):
    """ControlNet + UNet ε at timestep t with guidance and latent tiling: [B, h, w, c] float32.

    text: [2B, L, D] interleaved (uncond, cond) pairs with guidance, else [B, L, D]."""
    s = settings
    b = x.shape[0]

    def twice(a):   # [B, ...] -> [2B, ...] as (a0, a0, a1, a1, ...)
        return jnp.repeat(a, 2, axis=0) if s.guided else a

    ram_in = twice(ram)

    def predict(x_tile, cond_tile):
        x_tile, cond_tile = twice(x_tile), twice(cond_tile)
        down, mid = nets.controlnet.apply(
            {"params": params["controlnet"]}, x_tile, t, text, cond_tile, ram_in,
            conditioning_scale=s.conditioning_scale)
        return nets.unet.apply({"params": params["unet"]}, x_tile, t, text, ram_in,
                               down_block_additional_residuals=down,
                               mid_block_additional_residual=mid)

    eps = maybe_tiled_apply(predict, x, control, s.latent_tile, s.latent_tile_overlap)
    eps = eps.astype(jnp.float32)
    if not s.guided:
        return eps
    pairs = eps.reshape((b, 2) + eps.shape[1:])
    uncond, cond = pairs[:, 0], pairs[:, 1]
    return uncond + s.guidance_scale * (cond - uncond)


def denoise(nets: Networks, settings: SamplingSettings, params, plan: SamplerPlan, x,
            control, text, ram, noise):
    """The sampler loop (`lax.fori_loop` over plan's steps) from x: float32 latent."""
    if settings.guided:
        text = text.reshape((2 * x.shape[0],) + text.shape[2:])

    def body(i, carry):
        x, state = carry
        step_params, x = per_step(params, x)
        eps = guided_eps(nets, settings, step_params, plan.timesteps[i], x, control, text, ram)
        step_noise = noise("steps", STEP_STREAM, i) if plan.needs_noise else None
        state, x = sampler_step(plan, state, i, x, eps, step_noise)
        if settings.step_progress:
            step_progress.report(i, plan.num_steps, step_progress.DENOISE)
        return x, state

    x, _ = jax.lax.fori_loop(0, plan.num_steps, body, (x, sampler_init(plan, x)))
    return x


def decode_and_fix(nets: Networks, settings: SamplingSettings, vae_params, x, control):
    """Latent -> uint8 image: decode x/scaling, round to uint8 as diffusers' PIL output,
    colour-fix against `control`, truncate as ToPILImage."""
    image = tiled_decode(nets.vae, vae_params, x / nets.vae.config.scaling_factor,
                         tile=settings.vae_decoder_tile)
    rounded = to_uint8_round(image / 2.0 + 0.5)
    if settings.color_fix == "nofix":
        return rounded
    fixed = color_fix(rounded.astype(jnp.float32) / 255.0, control, settings.color_fix)
    return to_uint8_truncate(fixed)


def restore(nets: Networks, settings: SamplingSettings, params, plan: SamplerPlan,
            control, text, ram, keys, noises=None):
    """See the module docstring. params: {"unet", "controlnet", "vae"} param trees."""
    b, height, width, _ = control.shape
    lat_shape = (height // 8, width // 8, nets.vae.config.latent_channels)
    noise = noise_source(keys, noises, lat_shape)
    if settings.start_from_noise:
        # prepare_latents' draw (init_noise_sigma is 1 for SeeSR's samplers).
        x = noise("initial", INITIAL_STREAM)
    else:
        x = lr_latent_start(nets, settings, params["vae"], control, noise)
    x = denoise(nets, settings, params, plan, x, control, text, ram, noise)
    return decode_and_fix(nets, settings, params["vae"], x, control)


def skip_steps_above(plan: SamplerPlan, start_timestep: int) -> SamplerPlan:
    """The plan without its steps at t > start_timestep, which pipeline_seesr.py's loop
    passes over (`if t > start_steps: continue`); e.g. 50 DDPM steps and 500 keep the
    25 steps from t = 481. The kept steps keep their tables (a DDPM or DDIM step does
    not depend on the ones before it); DPM-Solver++'s first kept step is first order,
    as diffusers' multistep solver takes it with an empty memory."""
    first = int(np.count_nonzero(np.asarray(plan.timesteps) > start_timestep))
    if first == 0:
        return plan
    kept = jax.tree.map(lambda table: table[first:], plan)    # every table is [N]
    if kept.kind == "dpmpp" and kept.num_steps:
        schedule = kept.schedule
        kept = kept.replace(schedule=schedule.replace(d_coef=schedule.d_coef.at[0].set(0.0)))
    return kept


def start_coefficients(alphas_cumprod: np.ndarray, start_timestep: int) -> tuple[float, float]:
    """√ᾱ_t and √(1−ᾱ_t) of DDPMScheduler.add_noise at t (float32, as torch)."""
    a = np.float32(alphas_cumprod[start_timestep])
    return float(np.sqrt(a)), float(np.sqrt(np.float32(1.0) - a))
