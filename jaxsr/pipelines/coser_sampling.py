"""The device half of CoSeR inference: cognitive embedding → LR latent start → reference
generation → SR sampling → decode → colour fix, as one function for jit.

    coser_restore(nets, settings, params, schedule, lr, prompt_emb, negative_emb, keys,
                  noises=None) -> CoSeROutput

lr: [B, h, w, 3] float32 in [0, 1], the raw LR (n·h, n·w multiples of the VAE's factor,
  n = settings.upscale, 4 by default).
prompt_emb: [B, Lp, D] text embedding of the prompt ("" by default; 77 tokens).
negative_emb: [B, Ln, D] text embedding of the negative prompt (77 tokens).
keys: [B] typed PRNG keys, one per image (ignored when `noises` is given).
noises: None, or explicit draws {"start": [B, h', w', c], "reference_steps":
  [N, B, h', w', c], "steps": [N, B, h', w', c]} (latent NHWC, h' = n·h/8) to replay a
  reference run exactly; `draw_noises` gives the ones `keys` would give.

Per image, as CoSeR's scripts/inference.py (docs/coser_reference.md §7):
1. E = cognitive(lr) [B, 50, 1024];
2. im_lq = clamp(bicubic×n(2·lr − 1), −1, 1); z_lr = scaling · VAE.encode(im_lq).mode()
   (the script's --upscale n, 4 by default);
3. x_T = √ᾱ_999·z_lr + √(1−ᾱ_999)·ε with the base 1000-step tables (not pure noise);
4. reference generation: the respaced N-step DDPM from x_T with the UNet in gen mode,
   ε = ε_n + g_ref·(ε_p − ε_n); positive context [p; E] (127 tokens), negative
   context the negative-prompt embedding alone in E's slot (77 tokens). The two
   contexts differ in length, so the branches are two UNet calls, not one batch;
5. SR: the same DDPM from the same x_T; per step the ControlNet runs once for the LR
   hint (X) and the reference-latent hint (R) (one doubled batch), and both guidance
   branches read those features: ε_p = UNet([p; E], X, R), ε_n = UNet(n, X, R);
6. decode with the plain VAE decoder, or the CFW decoder with the features of im_lq;
   optional colour fix against im_lq in [−1, 1] (StableSR fixes the decoder output
   before mapping it to [0, 1]); uint8 = trunc(clamp((x + 1)/2)·255).
The reference latent is also decoded (plain VAE, no colour fix): the image saved
beside the output.

The respaced sampler is jaxsr.diffusion.respace: the networks get the original t_k,
the coefficients the index k, no noise at k = 0.

Large images (CoSeR's scripts/inference_tile.py): `coser_restore_tiled` takes the
already enlarged im_lq (one ≤ 1280 px patch of it) and E of the whole LR, skips
reference generation (the reference latent is the VAE code of a zero, i.e. gray,
image, for both guidance branches), and runs the ControlNet + UNet on square latent
tiles (64, overlap 32) blended with Gaussian weights (jaxsr.diffusion.tiling, the
grid StableSR and SeeSR share). It returns the colour-fixed image in [−1, 1] before
clamping, because the host averages overlapping patches first.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsr.diffusion.colorfix import color_fix, to_uint8_truncate
from jaxsr.diffusion.noise import noise_source, per_image_normal
from jaxsr.diffusion.respace import RespacedSchedule, ldm_noise_tables, respaced_step
from jaxsr.diffusion.samplers import per_step
from jaxsr.diffusion.tiling import tiled_apply
from jaxsr.inference import step_progress
from jaxsr.models.cfw_vae import CFWAutoencoderKL
from jaxsr.models.cognitive import CognitiveEncoder
from jaxsr.models.coser_controlnet import CoSeRControlNet
from jaxsr.models.coser_unet import CoSeRUNet, coser_context
from jaxsr.models.vae import AutoencoderKL
from jaxsr.nn.resize import torch_resize_bicubic

# Stream ids folded into each image's key: one independent stream per use.
START_STREAM, REFERENCE_STREAM, SR_STREAM = 0, 1, 2
UPSCALE = 4

_SQRT_AC, _SQRT_ONE_MINUS_AC = ldm_noise_tables()


class CoSeRSettings(NamedTuple):
    """Everything that changes the compiled program (hashable, static under jit).
    Defaults are CoSeR's inference defaults (cfg 3.0, cfg_ref 3.0, dec_w 0.5, no
    colour fix) and the t = 999 start coefficients of SD's 1000-step schedule."""

    guidance_scale: float = 3.0              # SR pass
    reference_guidance_scale: float = 3.0    # reference generation
    color_fix: str = "nofix"                 # "adain" | "wavelet" | "nofix"
    fusion_weight: float = 0.5               # CFW w, used when nets.cfw is given
    start_sqrt_alpha: float = float(_SQRT_AC[-1])
    start_sqrt_one_minus_alpha: float = float(_SQRT_ONE_MINUS_AC[-1])
    latent_tile: int = 64                    # coser_restore_tiled only
    latent_tile_overlap: int = 32
    upscale: int = UPSCALE                   # coser_restore's bicubic enlargement (--upscale)
    step_progress: bool = False              # report each loop step to the host


class CoSeRNetworks(NamedTuple):
    """The modules (static). `cfw`: None for the plain VAE decoder."""

    cognitive: CognitiveEncoder
    unet: CoSeRUNet
    controlnet: CoSeRControlNet
    vae: AutoencoderKL
    cfw: CFWAutoencoderKL | None = None


class CoSeROutput(NamedTuple):
    image: jax.Array              # [B, n·h, n·w, 3] uint8, the SR result
    reference_image: jax.Array    # [B, n·h, n·w, 3] uint8, the decoded reference latent
    latent: jax.Array             # [B, h', w', c] float32, the final SR latent (scaled)
    reference_latent: jax.Array   # [B, h', w', c] float32, z_ref (scaled)


def draw_noises(keys, num_steps: int, latent_shape) -> dict[str, jax.Array]:
    """The draws `coser_restore` makes from `keys` ([B] typed keys), in the explicit
    `noises` layout: start [B, *latent_shape], reference_steps and steps
    [N, B, *latent_shape] (loop order: entry i is used at loop step i)."""
    latent_shape = tuple(latent_shape)
    per_step = lambda stream: jnp.stack(
        [per_image_normal(keys, stream, i, latent_shape) for i in range(num_steps)])
    return {"start": per_image_normal(keys, START_STREAM, None, latent_shape),
            "reference_steps": per_step(REFERENCE_STREAM), "steps": per_step(SR_STREAM)}


def lq_image(lr, upscale: int = UPSCALE):
    """im_lq = clamp(bicubic×n(2·lr − 1), −1, 1) with PyTorch's bicubic (a = −0.75).
    lr [B, h, w, 3] in [0, 1] -> [B, n·h, n·w, 3] float32."""
    _, h, w, _ = lr.shape
    up = torch_resize_bicubic(2.0 * lr.astype(jnp.float32) - 1.0, (upscale * h, upscale * w))
    return jnp.clip(up, -1.0, 1.0)


def guide(eps_neg, eps_pos, scale: float):
    """Classifier-free guidance ε_n + g·(ε_p − ε_n) in float32."""
    eps_neg, eps_pos = eps_neg.astype(jnp.float32), eps_pos.astype(jnp.float32)
    return eps_neg + scale * (eps_pos - eps_neg)


def _timesteps(schedule: RespacedSchedule, i, batch: int):
    """The original t_k of loop step i, one per image: [B] int32."""
    return jnp.full((batch,), schedule.timesteps[i], jnp.int32)


def _report(settings: CoSeRSettings, i, schedule: RespacedSchedule, loop: str) -> None:
    """Step i of `loop` to the host's step listeners, when settings ask for it (static:
    without it the program has no callback)."""
    if settings.step_progress:
        step_progress.report(i, schedule.num_steps, loop)


def generate_reference(nets: CoSeRNetworks, settings: CoSeRSettings, unet_params,
                       schedule: RespacedSchedule, x_start, positive, negative, noise):
    """Reference latent z_ref: the respaced DDPM from x_start with the gen-mode UNet.

    x_start [B, h', w', c]; positive [B, Lp + Le, D] ([p; E]); negative [B, Ln, D].
    Returns float32 [B, h', w', c]."""
    g = settings.reference_guidance_scale
    b = x_start.shape[0]

    def eps_of(p, x, t, ctx):
        return nets.unet.apply({"params": p}, x, t, ctx)

    def body(i, x):
        t = _timesteps(schedule, i, b)
        p, x = per_step(unet_params, x)
        eps = eps_of(p, x, t, positive)
        if g != 1.0:   # as LDM: no unconditional pass without guidance
            eps = guide(eps_of(p, x, t, negative), eps, g)
        _report(settings, i, schedule, step_progress.REFERENCE)
        return respaced_step(schedule, i, x, eps, noise("reference_steps", REFERENCE_STREAM, i))

    return jax.lax.fori_loop(0, schedule.num_steps, body, x_start.astype(jnp.float32))


def sr_eps(nets: CoSeRNetworks, settings: CoSeRSettings, params, t, x, z_lr, z_ref, positive,
           negative):
    """Guided ε of one SR step: the ControlNet once for the LR hint (X) and the
    reference hint (R), positive context only; both guidance branches of the AiA UNet
    read those features. x, z_lr, z_ref [B, h', w', c] -> float32."""
    lr_feats, ref_feats = nets.controlnet.apply(
        {"params": params["controlnet"]}, x, t, positive, z_lr, z_ref,
        method="lr_and_reference")
    eps_of = lambda ctx: nets.unet.apply({"params": params["unet"]}, x, t, ctx,
                                         lr_feats, ref_feats)
    eps = eps_of(positive)
    if settings.guidance_scale == 1.0:
        return eps.astype(jnp.float32)
    return guide(eps_of(negative), eps, settings.guidance_scale)


def super_resolve(nets: CoSeRNetworks, settings: CoSeRSettings, params,
                  schedule: RespacedSchedule, x_start, z_lr, z_ref, positive, negative, noise):
    """The SR pass: the respaced DDPM from x_start with `sr_eps`. Shapes as
    `generate_reference`; z_lr, z_ref [B, h', w', c]. Returns float32."""
    b = x_start.shape[0]

    def body(i, x):
        t = _timesteps(schedule, i, b)
        step_params, x = per_step(params, x)
        eps = sr_eps(nets, settings, step_params, t, x, z_lr, z_ref, positive, negative)
        _report(settings, i, schedule, step_progress.SR)
        return respaced_step(schedule, i, x, eps, noise("steps", SR_STREAM, i))

    return jax.lax.fori_loop(0, schedule.num_steps, body, x_start.astype(jnp.float32))


def guided_tiled_eps(nets: CoSeRNetworks, settings: CoSeRSettings, params, t, x, z_lr, z_ref,
                     positive, negative):
    """`sr_eps` over latent tiles (the LR and reference hints cut like x), blended with
    Gaussian weights. x, z_lr, z_ref [B, h', w', c] -> float32."""
    c = x.shape[-1]

    def predict(x_tile, hints):
        return sr_eps(nets, settings, params, t, x_tile, hints[..., :c], hints[..., c:],
                      positive, negative)

    return tiled_apply(predict, x, jnp.concatenate([z_lr, z_ref], axis=-1),
                       settings.latent_tile, settings.latent_tile_overlap, cond_scale=1)


def decode_float(nets: CoSeRNetworks, settings: CoSeRSettings, params, z, im_lq,
                 use_cfw: bool, fix: bool):
    """Scaled latent -> image [B, 8h', 8w', 3] float32 in about [−1, 1]: plain or CFW
    decode, then the colour fix against im_lq when `fix` (not clamped)."""
    z = z / nets.vae.config.scaling_factor
    if use_cfw:
        cfw = {"params": params["cfw"]}
        feats = nets.cfw.apply(cfw, im_lq, method="encode_features")
        image = nets.cfw.apply(cfw, z, feats, settings.fusion_weight, method="decode_cfw")
    else:
        image = nets.vae.apply({"params": params["vae"]}, z, method="decode")
    if fix:
        image = color_fix(image, im_lq, settings.color_fix)
    return image


def decode_image(nets: CoSeRNetworks, settings: CoSeRSettings, params, z, im_lq,
                 use_cfw: bool, fix: bool):
    """Scaled latent -> uint8 image [B, 8h', 8w', 3]: `decode_float`, then
    trunc(clamp((x + 1)/2)·255)."""
    image = decode_float(nets, settings, params, z, im_lq, use_cfw, fix)
    return to_uint8_truncate((image + 1.0) / 2.0)


def _check(nets: CoSeRNetworks, settings: CoSeRSettings, h: int, w: int, what: str):
    factor = 2 ** (len(nets.vae.config.block_out_channels) - 1)
    if h % factor or w % factor:
        raise ValueError(f"{what}: the image size {h}×{w} must be a multiple of the VAE "
                         f"factor {factor}")
    if settings.color_fix not in ("adain", "wavelet", "nofix"):
        raise ValueError(f"unknown colour-fix method {settings.color_fix!r}")


def coser_restore(nets: CoSeRNetworks, settings: CoSeRSettings, params: dict[str, Any],
                  schedule: RespacedSchedule, lr, prompt_emb, negative_emb, keys,
                  noises=None) -> CoSeROutput:
    """See the module docstring. params: {"cognitive", "unet", "controlnet", "vae"} and,
    with nets.cfw, "cfw" (the CFW autoencoder's own tree: encoder + fusion decoder).

    jit with nets and settings static, e.g.
    `jax.jit(coser_restore, static_argnums=(0, 1))`."""
    b, h, w, _ = lr.shape
    _check(nets, settings, settings.upscale * h, settings.upscale * w, "coser_restore")
    lr = lr.astype(jnp.float32)

    adapter = nets.cognitive.apply({"params": params["cognitive"]}, lr)
    positive = coser_context(prompt_emb, adapter)       # [B, Lp + Le, D]
    negative = coser_context(None, negative_emb)        # [B, Ln, D]

    im_lq = lq_image(lr, settings.upscale)
    posterior = nets.vae.apply({"params": params["vae"]}, im_lq, method="encode")
    z_lr = posterior.mode() * nets.vae.config.scaling_factor

    noise = noise_source(keys, noises, z_lr.shape[1:])
    x_start = (settings.start_sqrt_alpha * z_lr
               + settings.start_sqrt_one_minus_alpha * noise("start", START_STREAM))

    z_ref = generate_reference(nets, settings, params["unet"], schedule, x_start, positive,
                               negative, noise)
    z = super_resolve(nets, settings, params, schedule, x_start, z_lr, z_ref, positive,
                      negative, noise)

    use_cfw = nets.cfw is not None
    image = decode_image(nets, settings, params, z, im_lq, use_cfw,
                         fix=settings.color_fix != "nofix")
    reference = decode_image(nets, settings, params, z_ref, im_lq, False, fix=False)
    return CoSeROutput(image, reference, z, z_ref)


def coser_adapter(nets: CoSeRNetworks, params, lr):
    """E = cognitive(lr): lr [B, h, w, 3] in [0, 1] -> [B, Le, D] float32."""
    return nets.cognitive.apply({"params": params["cognitive"]}, lr.astype(jnp.float32))


def coser_restore_tiled(nets: CoSeRNetworks, settings: CoSeRSettings, params: dict[str, Any],
                        schedule: RespacedSchedule, im_lq, adapter, prompt_emb, negative_emb,
                        keys, noises=None):
    """inference_tile.py's sampling of one enlarged patch (see the module docstring).

    im_lq: [B, H, W, 3] in [−1, 1], H, W multiples of the VAE factor; adapter: E
    [B, Le, D] of the whole LR; prompt_emb / negative_emb / keys / noises as in
    `coser_restore` (noises without "reference_steps"). Returns (image float32
    [B, H, W, 3] in about [−1, 1], colour-fixed, not clamped; final latent)."""
    b, h, w, _ = im_lq.shape
    _check(nets, settings, h, w, "coser_restore_tiled")
    im_lq = im_lq.astype(jnp.float32)
    positive = coser_context(prompt_emb, adapter)
    negative = coser_context(None, negative_emb)
    vae = {"params": params["vae"]}
    scale = nets.vae.config.scaling_factor
    z_lr = nets.vae.apply(vae, im_lq, method="encode").mode() * scale
    # The reference is the code of a zero (mid-gray) image: no reference generation.
    z_ref = nets.vae.apply(vae, jnp.zeros_like(im_lq[:1]), method="encode").mode() * scale
    z_ref = jnp.broadcast_to(z_ref, z_lr.shape)
    noise = noise_source(keys, noises, z_lr.shape[1:])
    x_start = (settings.start_sqrt_alpha * z_lr
               + settings.start_sqrt_one_minus_alpha * noise("start", START_STREAM))

    def body(i, x):
        t = _timesteps(schedule, i, b)
        step_params, x = per_step(params, x)
        eps = guided_tiled_eps(nets, settings, step_params, t, x, z_lr, z_ref, positive,
                               negative)
        _report(settings, i, schedule, step_progress.SR)
        return respaced_step(schedule, i, x, eps, noise("steps", SR_STREAM, i))

    z = jax.lax.fori_loop(0, schedule.num_steps, body, x_start)
    image = decode_float(nets, settings, params, z, im_lq, nets.cfw is not None,
                         fix=settings.color_fix != "nofix")
    return image, z
