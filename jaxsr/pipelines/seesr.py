"""SeeSR super-resolution: LR image in, an image `upscale`× its size out.

    pipe = SeeSRPipeline.from_pretrained("weights/seesr")       # jaxsr convert output
    [sr] = pipe.upscale([lr_uint8])                              # uint8 [4h, 4w, 3]

What runs, per image (SeeSR's `test_seesr.py` + `pipeline_seesr.py`):
1. DAPE on the original LR (bilinear resize to its input size, antialias off,
   ImageNet normalisation) → soft prompt [145, 512] and tag logits → hard prompt
   (per-class thresholds). Prompt: f"{tags}, {prompt}," + added_prompt.
2. CLIP tokenizer (77) → text encoder; the negative prompt likewise (guidance > 1).
3. PIL bicubic chain: enlarge so the short side reaches process_size/upscale,
   ×upscale, crop-resize to multiples of 8 → the ControlNet image in [0, 1].
4. On device (`seesr_sampling.restore`, one jit per size bucket): VAE encode, start at
   √ᾱ_t·z + √(1−ᾱ_t)·ε with t = start_timestep (999; start_point "noise": ε alone, no
   encode), the sampler loop without its steps at t > start_timestep, with guidance
   (ControlNet residuals × conditioning_scale) and latent tiling, VAE decode, uint8
   rounding, colour fix, truncation.
5. PIL bicubic back to (upscale·w, upscale·h) when step 3 changed the size.

Host steps (resizes, tags, tokens) run in numpy/PIL; the denoising loop, the text
encoder and DAPE run jitted on a data-parallel mesh over the pipeline's devices.
Batches are padded to a multiple of the device count. Image k's random draws come
from fold_in(key(seed), ids[k]), so a result depends on the seed and id only, not on
batching or the device count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from jaxsr.convert.cache import tensor_info
from jaxsr.convert.seesr_weights import SeeSRWeights, load_seesr_folder
from jaxsr.data.image_io import to_rgb_uint8
from jaxsr.data.resize import pil_bicubic, seesr_upscale_input, seesr_upscale_sizes
from jaxsr.diffusion.samplers import SAMPLERS, make_sampler
from jaxsr.diffusion.schedule import SchedulerConfig
from jaxsr.inference import step_progress
from jaxsr.models.clip_text import CLIPTextModel
from jaxsr.models.controlnet import ControlNetModel
from jaxsr.models.dape import DAPE, IMAGENET_MEAN, IMAGENET_STD
from jaxsr.models.tags import hard_prompt
from jaxsr.models.tokenizer import load_tokenizer, tokenize
from jaxsr.models.unet import UNet2DConditionModel
from jaxsr.models.vae import AutoencoderKL
from jaxsr.nn.resize import linear_matrix
from jaxsr.parallel.mesh import make_mesh
from jaxsr.pipelines import memory
from jaxsr.pipelines.placement import Placement, compute_dtype, held_bytes
from jaxsr.pipelines.seesr_sampling import (
    Networks,
    SamplingSettings,
    restore,
    skip_steps_above,
    start_coefficients,
)

COLOR_FIXES = {"adain": "adain", "wavelet": "wavelet", "none": "nofix", "nofix": "nofix"}
START_POINTS = ("lr", "noise")
# Activations, compiled programs and compiler scratch beside the weights, at a 128² LR
# (512² output), batch 1: peak RSS minus held weights minus the bare process, 1.8-1.9
# GB in bfloat16 and float32 on a 2-core CPU (benchmarks/sr_memory.py), rounded up
# (jaxsr.pipelines.memory).
SEESR_RUNTIME_BYTES = 3 * memory.GB


@dataclasses.dataclass(frozen=True)
class SeeSROptions:
    """Sampling options; the defaults are the released `test_seesr.py`'s."""

    steps: int = 50
    sampler: str = "ddpm"                 # ddpm | ddim | dpmpp
    guidance_scale: float = 5.5           # <= 1: no classifier-free guidance
    conditioning_scale: float = 1.0
    eta: float = 0.0                      # DDIM only
    # test_seesr.py's --start_steps / --start_point (pipeline_seesr.py's arguments): the
    # LR latent is noised to this t ("lr") or the start is pure noise ("noise"); either
    # way the steps at t > start_timestep are skipped.
    start_timestep: int = 999
    start_point: str = "lr"
    color_fix: str = "adain"              # adain | wavelet | none
    prompt: str = ""
    added_prompt: str = "clean, high-resolution, 8k"
    negative_prompt: str = "dotted, noise, blur, lowres, smooth"
    latent_tile: int = 96                 # latent tiling when h·w > latent_tile²
    latent_tile_overlap: int = 4
    vae_encoder_tile: int = 1024          # pixels; tiled above tile + 64
    vae_decoder_tile: int = 224           # latent pixels; tiled above tile + 22
    upscale: int = 4
    process_size: int = 512               # a side below process_size // upscale is enlarged
    timestep_spacing: str | None = None   # override the scheduler's (sd-turbo: "trailing")
    # Report each denoising step to jaxsr.inference.step_progress's listeners (a
    # separately compiled program; the images are the same).
    step_progress: bool = False

    def __post_init__(self):
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        if self.color_fix not in COLOR_FIXES:
            problems.append(f"color_fix {self.color_fix!r} is not one of adain, wavelet, none")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.start_timestep < 1000:
            problems.append(f"start_timestep must be in [0, 1000), got {self.start_timestep}")
        if self.start_point not in START_POINTS:
            problems.append(f"start_point {self.start_point!r} is not one of lr, noise")
        if self.latent_tile < 8 or not 0 <= self.latent_tile_overlap < self.latent_tile:
            problems.append(f"latent tile {self.latent_tile} with overlap "
                            f"{self.latent_tile_overlap}: need tile >= 8, 0 <= overlap < tile")
        if self.upscale < 1 or self.process_size < self.upscale:
            problems.append(f"upscale {self.upscale} / process_size {self.process_size}")
        if problems:
            raise ValueError("invalid SeeSR options: " + "; ".join(problems))

    @classmethod
    def sd_turbo(cls, **overrides) -> SeeSROptions:
        """SeeSR's sd-turbo mode (`test_seesr_turbo.py`): 2 steps, no guidance, tile
        overlap 32, DDPM on trailing timesteps (999, 499). Use with weights converted
        with `--sd sd-turbo --unet-from-sd`."""
        values = dict(steps=2, guidance_scale=1.0, latent_tile_overlap=32,
                      timestep_spacing="trailing")
        return cls(**{**values, **overrides})

    def positive_prompt(self, tags: str) -> str:
        # Exactly the reference's f-string (note the comma before the added prompt).
        return f"{tags}, {self.prompt}," + self.added_prompt


@dataclasses.dataclass
class Noises:
    """Explicit random draws (float32, NHWC latents) to replay a reference run.

    posterior, initial: [B, h, w, c]; steps: [N, B, h, w, c] (N = the steps run:
    options.steps less those at t > options.start_timestep);
    h, w = processed image size // 8.
    """

    posterior: np.ndarray
    initial: np.ndarray
    steps: np.ndarray


def dape_input(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] → DAPE's input [size, size, 3]: torch bilinear (antialias off) on
    [0, 1], then ImageNet normalisation. float32, computed on the host."""
    x = image.astype(np.float32) / np.float32(255.0)
    mh, mw = linear_matrix(image.shape[0], size), linear_matrix(image.shape[1], size)
    x = np.einsum("oh,hwc->owc", mh, x)
    x = np.einsum("pw,owc->opc", mw, x)
    return ((x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).astype(np.float32)


def as_rgb_array(image) -> np.ndarray:
    """PIL image (any mode) or uint8 array [H, W, 3] / [H, W] → uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return to_rgb_uint8(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8 image arrays (or PIL images), got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    return array


def sampling_settings(options: SeeSROptions, alphas_cumprod) -> SamplingSettings:
    """The static part of the device program for `options` (alphas_cumprod: the
    1000-step training schedule, for the LR-latent start coefficients)."""
    sa, s1a = start_coefficients(alphas_cumprod, options.start_timestep)
    return SamplingSettings(
        guidance_scale=float(options.guidance_scale),
        conditioning_scale=float(options.conditioning_scale),
        start_sqrt_alpha=sa, start_sqrt_one_minus_alpha=s1a,
        color_fix=COLOR_FIXES[options.color_fix],
        latent_tile=options.latent_tile, latent_tile_overlap=options.latent_tile_overlap,
        vae_encoder_tile=options.vae_encoder_tile,
        vae_decoder_tile=options.vae_decoder_tile,
        start_from_noise=options.start_point == "noise",
        step_progress=options.step_progress)


def pad_rows(x: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    """Repeat the last entry along `axis` until it has n entries."""
    missing = n - x.shape[axis]
    if missing <= 0:
        return x
    last = np.take(x, [-1], axis=axis)
    return np.concatenate([x, np.repeat(last, missing, axis=axis)], axis=axis)


class SeeSRPipeline:
    """Loaded SeeSR networks, jitted per size bucket. See the module docstring."""

    def __init__(self, weights: SeeSRWeights, *, dtype="auto", vae_dtype="float32",
                 dape_dtype="float32", attention: str = "auto", devices=None,
                 spatial_shards: int = 1):
        """weights: as `load_seesr_folder` gives them, numpy or already placed (see
        `from_pretrained`, which places them while reading). The pipeline keeps the
        parameters on its devices only, in `placement.held_dtype`; `self.weights`
        keeps the configs, tags and scheduler, not the arrays.

        dtype: compute dtype of the UNet, ControlNet and text encoder: "auto" (bfloat16
        on accelerators and CPUs with native bfloat16, else float32), "bfloat16" or
        "float32". vae_dtype, dape_dtype: the VAE's and DAPE's (float32 by default).
        spatial_shards: split each image's height over this many devices (a 'space'
        mesh axis; the rest split the batch): an alternative to latent tiling for
        large outputs. The partitioner exchanges the convolutions' halo rows and
        gathers attention's keys and values; the image is the untiled one.
        """
        dt, vdt, ddt = (compute_dtype(d) for d in (dtype, vae_dtype, dape_dtype))
        self.devices = list(jax.local_devices() if devices is None else devices)
        _check_spatial(self.devices, spatial_shards)
        self.spatial_shards = spatial_shards
        self.mesh = make_mesh((("data", -1), ("space", spatial_shards)), self.devices)
        self._batch = NamedSharding(self.mesh, P("data"))
        self._control = NamedSharding(self.mesh, P("data", "space"))
        self._steps_sharding = NamedSharding(self.mesh, P(None, "data"))
        self.dtype = dt

        self.nets = Networks(
            unet=UNet2DConditionModel(weights.unet[0], dtype=dt, attention=attention),
            controlnet=ControlNetModel(weights.controlnet[0], dtype=dt, attention=attention),
            vae=AutoencoderKL(weights.vae[0], dtype=vdt, attention=attention))
        self.text_encoder = CLIPTextModel(weights.text_encoder[0], dtype=dt, attention=attention)
        self.dape = DAPE(weights.dape[0], attention=attention, dtype=ddt)
        if weights.dape[0].lora_rank:
            raise ValueError("the DAPE weights carry an unmerged LoRA; convert them for "
                             "inference (jaxsr convert merges it)")
        if weights.tokenizer_dir is None:
            raise FileNotFoundError("the weights folder has no tokenizer/; reconvert with "
                                    "jaxsr convert")
        self.tokenizer = load_tokenizer(weights.tokenizer_dir)
        place = _placement(self.devices, dt, vdt, ddt, spatial_shards)
        self.params = {name: place.tree(name, getattr(weights, name)[1])
                       for name in ("unet", "controlnet", "vae")}
        self.text_params = place.tree("text_encoder", weights.text_encoder[1])
        self.dape_params = place.tree("dape", weights.dape[1])
        self.weights = weights.configs_only()
        self.alphas_cumprod = SchedulerConfig.from_diffusers(
            weights.scheduler_config, "ddpm").alphas_cumprod()

        self._dape_fn = jax.jit(lambda p, x: self.dape.apply({"params": p}, x))
        self._text_fn = jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids))
        self._restore_fns: dict = {}

    @classmethod
    def from_pretrained(cls, folder, *, dtype="auto", vae_dtype="float32",
                        dape_dtype="float32", devices=None, check_memory: bool = True,
                        **kwargs) -> SeeSRPipeline:
        """A folder written by `jaxsr convert --sd --seesr --ram --dape`.

        Each tensor goes to the devices in its held dtype as it is read, so loading
        needs no host copy of the weights. With check_memory, the need is estimated
        from the folder's headers first, and InsufficientMemoryError says so (and
        what to try) instead of the process being killed.
        """
        devices = list(jax.local_devices() if devices is None else devices)
        dt, vdt, ddt = (compute_dtype(d) for d in (dtype, vae_dtype, dape_dtype))
        _check_spatial(devices, kwargs.get("spatial_shards", 1))
        place = _placement(devices, dt, vdt, ddt, kwargs.get("spatial_shards", 1))
        if check_memory and memory.check_enabled():
            info = tensor_info(folder)
            held = lambda dtypes: sum(held_bytes(info[m], dtypes.get(m, jnp.float32))
                                      for m in info)
            memory.check_fits(
                held(place.modules), SEESR_RUNTIME_BYTES, devices,
                what=f"SeeSR ({jnp.dtype(dt).name}) from {folder}",
                smaller_param_bytes=(held({**place.modules, "unet": jnp.bfloat16,
                                           "controlnet": jnp.bfloat16,
                                           "text_encoder": jnp.bfloat16})
                                     if dt != jnp.bfloat16 else None))
        weights = load_seesr_folder(folder, leaf=place.leaf)
        return cls(weights, dtype=dt, vae_dtype=vdt, dape_dtype=ddt, devices=devices, **kwargs)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def batch_multiple(self) -> int:
        """Images per compiled call are padded to a multiple of this (the devices that
        split the batch: all of them unless some split the height)."""
        return len(self.devices) // self.spatial_shards

    # ------------------------------------------------------------------ host steps
    def bucket_key(self, image, options: SeeSROptions | None = None) -> tuple[int, int]:
        """(H, W) of the processed image: images with equal keys share one compiled program.

        image: an array [h, w, ...], a PIL image, or an (h, w) pair.
        """
        options = options or SeeSROptions()
        if isinstance(image, Image.Image):
            h, w = image.height, image.width
        elif isinstance(image, tuple) and len(image) == 2:
            h, w = image
        else:
            h, w = np.shape(image)[:2]
        width, height = seesr_upscale_sizes(w, h, options.upscale, options.process_size)[-1]
        return height, width

    def tag_prompts(self, images: Sequence[np.ndarray]) -> tuple[list[str], jax.Array]:
        """DAPE on a batch of original LR images → (tag strings, soft prompts [B, N, E])."""
        size = self.weights.dape[0].swin.img_size
        batch = np.stack([dape_input(im, size) for im in images])
        n = len(images)
        padded = pad_rows(batch, -(-n // self.batch_multiple) * self.batch_multiple)
        embeds, logits = self._dape_fn(self.dape_params, jax.device_put(padded, self._batch))
        tags = hard_prompt(np.asarray(logits)[:n], self.weights.tags, self.weights.thresholds)
        return tags, embeds[:n]

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts → text-encoder hidden states [B, 77, D] float32."""
        ids = tokenize(self.tokenizer, list(prompts))
        n = len(prompts)
        padded = pad_rows(ids, -(-n // self.batch_multiple) * self.batch_multiple)
        return self._text_fn(self.text_params, jax.device_put(padded, self._batch))[:n]

    # ---------------------------------------------------------------- device step
    def _restore_fn(self, settings: SamplingSettings):
        fn = self._restore_fns.get(settings)
        if fn is None:
            fn = jax.jit(partial(restore, self.nets, settings))
            if settings.step_progress:
                fn = step_progress.tracked(fn)
            self._restore_fns[settings] = fn
        return fn

    def _settings(self, options: SeeSROptions) -> SamplingSettings:
        return sampling_settings(options, self.alphas_cumprod)

    def _plan(self, options: SeeSROptions):
        plan = make_sampler(options.sampler, self.weights.scheduler_config, options.steps,
                            eta=options.eta, timestep_spacing=options.timestep_spacing)
        return skip_steps_above(plan, options.start_timestep)

    def _run_bucket(self, images, ids, options, seed, noises):
        """One batch of same-bucket images → (uint8 outputs, positive prompts)."""
        n = len(images)
        m = -(-n // self.batch_multiple) * self.batch_multiple
        tags, ram = self.tag_prompts(images)
        prompts = [options.positive_prompt(t) for t in tags]
        settings = self._settings(options)
        text = self.encode_prompts(prompts)
        if settings.guided:
            neg = self.encode_prompts([options.negative_prompt] * n)
            text = jnp.stack([neg, text], axis=1)          # [n, 2, L, D]
        text = _pad_dev(text, m)
        control = np.stack([seesr_upscale_input(im, options.upscale, options.process_size)
                            for im in images]).astype(np.float32) / np.float32(255.0)
        base = jax.random.key(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
            jnp.asarray(pad_rows(np.asarray(ids, np.uint32), m)))
        noise_arrays = None
        if noises is not None:
            noise_arrays = {
                "posterior": jax.device_put(pad_rows(np.asarray(noises.posterior, np.float32), m),
                                            self._batch),
                "initial": jax.device_put(pad_rows(np.asarray(noises.initial, np.float32), m),
                                          self._batch),
                "steps": jax.device_put(pad_rows(np.asarray(noises.steps, np.float32), m, 1),
                                        self._steps_sharding)}
        out = self._restore_fn(settings)(
            self.params, self._plan(options),
            jax.device_put(pad_rows(control, m), self._control),
            jax.device_put(text, self._batch),
            jax.device_put(_pad_dev(ram, m), self._batch),
            jax.device_put(keys, self._batch), noise_arrays)
        out = np.asarray(out)[:n]
        results = []
        for im, sr in zip(images, out):
            target = (im.shape[1] * options.upscale, im.shape[0] * options.upscale)
            if (sr.shape[1], sr.shape[0]) != target:
                sr = pil_bicubic(sr, target)
            results.append(sr)
        return results, prompts

    # ---------------------------------------------------------------------- API
    def upscale(self, images, *, options: SeeSROptions | None = None, seed: int = 0,
                ids: Sequence[int] | None = None, noises: Noises | None = None,
                batch_size: int | None = None, return_prompts: bool = False):
        """Super-resolve images of any sizes; returns uint8 [upscale·h, upscale·w, 3] arrays
        in input order (and the positive prompts used, with `return_prompts`).

        images: uint8 arrays [h, w, 3] (or [h, w]) or PIL images of any mode.
        ids: per-image integers for the random streams (default 0, 1, ...).
        noises: explicit draws for all images at once (then they must share one size
          bucket and fit one batch); for matching a reference run.
        batch_size: images per compiled call (default: `batch_multiple`, the device
          count without spatial sharding); a batch is padded to a multiple of it.
        """
        options = options or SeeSROptions()
        arrays = [as_rgb_array(im) for im in images]
        ids = list(range(len(arrays))) if ids is None else [int(i) for i in ids]
        if len(ids) != len(arrays):
            raise ValueError(f"{len(ids)} ids for {len(arrays)} images")
        batch_size = batch_size or self.batch_multiple
        buckets: dict[tuple[int, int], list[int]] = {}
        for k, im in enumerate(arrays):
            buckets.setdefault(self.bucket_key(im, options), []).append(k)
        if noises is not None:
            if len(buckets) != 1:
                raise ValueError("explicit noises need all images in one size bucket")
            batch_size = max(batch_size, len(arrays))
        outputs: list = [None] * len(arrays)
        prompts: list = [None] * len(arrays)
        for members in buckets.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                sr, used = self._run_bucket([arrays[k] for k in chunk], [ids[k] for k in chunk],
                                            options, seed, noises)
                for k, image, prompt in zip(chunk, sr, used):
                    outputs[k], prompts[k] = image, prompt
        return (outputs, prompts) if return_prompts else outputs


def _check_spatial(devices, spatial_shards: int) -> None:
    if spatial_shards < 1 or len(devices) % spatial_shards:
        raise ValueError(f"spatial_shards {spatial_shards} must divide the "
                         f"{len(devices)} devices")


def _placement(devices, dt, vdt, ddt, spatial_shards: int = 1) -> Placement:
    """Replicated over the pipeline's mesh, each network in its compute dtype."""
    rep = NamedSharding(make_mesh((("data", -1), ("space", spatial_shards)), devices), P())
    return Placement({"unet": dt, "controlnet": dt, "text_encoder": dt, "vae": vdt,
                      "dape": ddt}, rep)


def _pad_dev(x: jax.Array, n: int) -> jax.Array:
    """Pad a device array's leading axis to n by repeating its last row."""
    missing = n - x.shape[0]
    if missing <= 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], missing, axis=0)])
