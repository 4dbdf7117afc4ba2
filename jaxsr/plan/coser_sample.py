"""CoSeR's sampling program (reference mode) as a Program, from shapes only.

    program = coser_sample_program(config, mesh, batch_per_chip=2, size=512)   # configs/coser.py

What `CoSeRPipeline` jits for images whose outputs fit one pass: the cognitive
embedding of the LR image, the LR latent, reference generation (guided AiA UNet) and
the guided SR pass (AiA UNet + ControlNet), both over config.sampling.steps respaced
DDPM steps, then the decode of the SR latent (config.sampling.decoder: "cfw", StableSR's
CFW autoencoder fusing the LR image's encoder features, with the released fusion
layers' shape `CFWConfig()`; or "vae") and of the reference latent (plain VAE).
Parameters are held as the pipeline holds them (bfloat16 kernels when the networks
compute in bfloat16) and placed by config.sharding.params (default: replicated);
images, prompts and keys are split over the batch axes.

With config.sampling.mode = "tiled" (or "auto" for outputs larger than 512², as
`jaxsr sr --coser` picks) the program is tiled mode's per-patch call
(`coser_restore_tiled`, inference_tile.py): a batch of enlarged patches of
config.sampling.patch_size² (or the whole padded image when smaller), each sampled in
latent tiles of config.sampling.latent_tile with Gaussian blending, no reference
generation; one "image" of the report is then one patch, and the notes say how many
patches one `size`² output takes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.parallel.mesh import batch_axes
from jaxsr.plan.programs import (
    _DTYPES,
    Program,
    as_held,
    global_batch,
    image_keys,
    inference_parts,
    inference_shardings,
    with_shardings,
)


def coser_sample_program(config, mesh: Mesh, batch_per_chip: int, size: int,
                         steps: int | None = None) -> Program:
    """`size`² outputs (`size` / config.sampling.upscale LR inputs)."""
    from jaxsr.convert.coser_weights import CoSeRArchitecture
    from jaxsr.diffusion.respace import respaced_schedule
    from jaxsr.models import coser_controlnet, coser_unet, vae
    from jaxsr.models.cfw_vae import CFWAutoencoderKL, CFWConfig, cfw_param_shapes
    from jaxsr.models.cognitive import CognitiveEncoder
    from jaxsr.models.cognitive import param_shapes as cognitive_shapes
    from jaxsr.pipelines.coser import COLOR_FIXES
    from jaxsr.pipelines.coser_sampling import CoSeRNetworks, CoSeRSettings, coser_restore

    dt = _DTYPES[config.get("dtype", "bfloat16")]
    vdt = _DTYPES[config.get("vae_dtype", "float32")]
    att = config.get("attention", "auto")
    arch = CoSeRArchitecture.from_config(config)
    s = config.sampling
    upscale = int(s.upscale)
    if size % (8 * upscale):
        raise ValueError(f"--size {size} must be a multiple of {8 * upscale} (the LR side "
                         f"times upscale {upscale} must be a whole number of latents)")
    decoder = s.get("decoder", "cfw")
    if decoder not in ("cfw", "vae"):
        raise ValueError(f"config.sampling.decoder={decoder!r}: choose 'cfw' or 'vae'")
    # The released fusion layers' shape (vqgan_cfw_00011.ckpt); a converted folder
    # records its own, read off the checkpoint.
    cfw = CFWConfig(fusion_weight=float(s.fusion_weight))
    nets = CoSeRNetworks(
        cognitive=CognitiveEncoder(arch.cognitive, attention=att, dtype=jnp.float32),
        unet=coser_unet.CoSeRUNet(arch.unet, dtype=dt, attention=att),
        controlnet=coser_controlnet.CoSeRControlNet(arch.controlnet, dtype=dt, attention=att),
        vae=vae.AutoencoderKL(arch.vae, dtype=vdt, attention=att),
        cfw=(CFWAutoencoderKL(arch.vae, cfw=cfw, dtype=vdt, attention=att)
             if decoder == "cfw" else None))
    settings = CoSeRSettings(guidance_scale=float(s.guidance_scale),
                             reference_guidance_scale=float(s.reference_guidance_scale),
                             color_fix=COLOR_FIXES[s.color_fix],
                             fusion_weight=float(s.fusion_weight), upscale=upscale)
    num_steps = int(steps or s.steps)
    schedule = jax.tree.map(np.asarray, respaced_schedule(num_steps))

    params = {"cognitive": as_held(cognitive_shapes(arch.cognitive), jnp.float32),
              "unet": as_held(coser_unet.param_shapes(arch.unet), dt),
              "controlnet": as_held(coser_controlnet.param_shapes(arch.controlnet), dt),
              "vae": as_held(vae.param_shapes(arch.vae), vdt)}
    if decoder == "cfw":
        params["cfw"] = as_held(cfw_param_shapes(arch.vae, cfw), vdt)
    params_sh = inference_shardings(params, config, mesh)
    n = global_batch(mesh, batch_per_chip)
    batch_sh = NamedSharding(mesh, P(batch_axes(mesh)))
    options = _options(config)
    if options.pick_mode(size // upscale, size // upscale) == "tiled":
        return _tiled_program(options, arch, nets, settings, schedule, num_steps,
                              params, params_sh, n, batch_sh, size)
    lr_side = size // upscale
    lr = jax.ShapeDtypeStruct((n, lr_side, lr_side, 3), jnp.float32, sharding=batch_sh)
    prompt, negative, keys = _text_and_keys(arch, n, batch_sh)
    jitted = jax.jit(partial(coser_restore, nets, settings),
                     in_shardings=(params_sh, None, batch_sh, batch_sh, batch_sh, batch_sh),
                     out_shardings=batch_sh)
    args = (with_shardings(params, params_sh), schedule, lr, prompt, negative, keys)
    parts = inference_parts(params, params_sh, (lr, prompt, negative))
    return Program("coser sample", jitted, args, n, parts,
                   notes=[f"{num_steps} respaced DDPM steps for the reference and again for "
                          f"the SR pass, guidance {settings.reference_guidance_scale} / "
                          f"{settings.guidance_scale}, {size}² outputs, "
                          + ("CFW decoder (fusion weight "
                             f"{settings.fusion_weight})" if decoder == "cfw"
                             else "plain VAE decoder")])


def _options(config):
    """config.sampling's mode and tiling as the pipeline's CoSeROptions (which checks
    them and picks the mode for "auto" as `jaxsr sr --coser` does)."""
    from jaxsr.pipelines.coser import CoSeROptions

    s = config.sampling
    return CoSeROptions(mode=s.get("mode", "auto"), upscale=int(s.upscale),
                        latent_tile=int(s.latent_tile),
                        latent_tile_overlap=int(s.latent_tile_overlap),
                        input_size=int(s.input_size), patch_size=int(s.patch_size),
                        patch_stride=int(s.patch_stride))


def _text_and_keys(arch, n: int, batch_sh):
    """The abstract prompt and negative-prompt embeddings [n, 77, D] and per-image keys."""
    shape = (n, arch.text_encoder.max_position_embeddings, arch.text_encoder.hidden_size)
    text = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh)
    return text, text, image_keys(n, batch_sh)


def _tiled_program(options, arch, nets, settings, schedule, num_steps, params,
                   params_sh, n: int, batch_sh, size: int) -> Program:
    """Tiled mode's per-patch program for `size`² outputs (see the module docstring)."""
    from jaxsr.pipelines.coser import patch_starts, tiled_geometry
    from jaxsr.pipelines.coser_sampling import coser_adapter, coser_restore_tiled

    lr_side = size // options.upscale
    geometry = tiled_geometry(lr_side, lr_side, options)
    ph, pw = geometry.padded
    side_h, side_w = min(ph, options.patch_size), min(pw, options.patch_size)
    patches = (len(patch_starts(ph, options.patch_size, options.patch_stride))
               * len(patch_starts(pw, options.patch_size, options.patch_stride)))
    settings = settings._replace(latent_tile=options.latent_tile,
                                 latent_tile_overlap=options.latent_tile_overlap)
    # E of the whole LR image, computed once per image by its own small program.
    adapter_shape = jax.eval_shape(
        partial(coser_adapter, nets), params,
        jax.ShapeDtypeStruct((1, lr_side, lr_side, 3), jnp.float32)).shape
    im_lq = jax.ShapeDtypeStruct((n, side_h, side_w, 3), jnp.float32, sharding=batch_sh)
    adapter = jax.ShapeDtypeStruct((n, *adapter_shape[1:]), jnp.float32, sharding=batch_sh)
    prompt, negative, keys = _text_and_keys(arch, n, batch_sh)
    jitted = jax.jit(partial(coser_restore_tiled, nets, settings),
                     in_shardings=(params_sh, None, batch_sh, batch_sh, batch_sh, batch_sh,
                                   batch_sh),
                     out_shardings=(batch_sh, batch_sh))
    args = (with_shardings(params, params_sh), schedule, im_lq, adapter, prompt, negative,
            keys)
    parts = inference_parts(params, params_sh, (im_lq, adapter, prompt, negative))
    return Program("coser sample (tiled)", jitted, args, n, parts,
                   notes=[f"tiled mode: one call samples {n} enlarged patches of "
                          f"{side_h}x{side_w} ({num_steps} respaced DDPM steps, latent tiles "
                          f"of {options.latent_tile} overlapping {options.latent_tile_overlap}"
                          f", guidance {settings.guidance_scale}, "
                          + ("CFW decoder" if nets.cfw is not None else "plain VAE decoder")
                          + f"); a {size}² output takes {patches} patch(es): images/s = "
                          f"patches/s / {patches}"])
