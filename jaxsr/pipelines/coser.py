"""CoSeR super-resolution: LR image in, an n× image out (n = options.upscale, 4 by
default; and the reference CoSeR imagined).

    pipe = CoSeRPipeline.from_pretrained("weights/coser")          # jaxsr convert --coser
    [sr] = pipe.upscale([lr_uint8])                                 # uint8 [4h, 4w, 3]
    srs, refs = pipe.upscale(images, return_references=True)

Two modes, CoSeR's two scripts:

- "reference" (scripts/inference.py): the device program `coser_restore` on the whole
  image: cognitive embedding, reference generation from the LR-latent start, the SR
  pass guided by that reference, plain or CFW decode, colour fix; the decoded
  reference is returned too. The script enlarges by its --upscale n (bicubic to
  int(n·h) × int(n·w)) and samples at that size, whatever n is; the UNet needs that
  size to be a multiple of 64, which the script simply requires. Here the LR is
  reflect-padded to a multiple of 64/gcd(n, 64) (16 for n = 4) and the result cropped
  (so E and the latents see the mirrored border).
- "tiled" (scripts/inference_tile.py), for large images: no reference generation (the
  reference latent is the VAE code of a gray image); E from the whole LR; the image is
  enlarged by s = max(input_size / short side, n) with PyTorch's bicubic, clamped,
  reflect-padded for the VAE and cut into patches of at most 1280 px with stride 1000
  that are averaged uniformly; each patch runs `coser_restore_tiled` (latent tiles of
  64, overlap 32, Gaussian blending); the padding is cropped and, when s > n, the
  result is resized with PyTorch's bicubic. `tiled_padding` picks the padding and the
  final size (see `tiled_geometry`): "exact" (default) pads each side up to the next
  multiple of 32 and ends at exactly n·h × n·w; "script" does what inference_tile.py
  does: when either side is not a multiple of 32 it pads both by 32 − side % 32, so a
  side that already is one grows by 32 (512 -> 544), and it sizes the final resize from
  the padded image, int(padded · n / s), which stretches the output (50×70 at n = 4 ->
  212×287 instead of 200×280).
- "auto" (default): "reference" when the n× output has at most (8·latent_tile)² pixels
  (512² for CoSeR, the size it was trained at), else "tiled".

The reference scripts reseed before every image (and patch): by default every image
here draws from key(seed) the same way, so a result depends on the seed and the image
only, never on batching, order or device count. `ids` gives image k the stream
fold_in(key(seed), ids[k]) instead (SeeSR's rule; `jaxsr sr --sample-times` uses it so
that samples differ); `noises` replaces every draw by given arrays (`draw_noises`'s
layout) to replay a run. Images of one padded size share a compiled program; batches
are padded to a multiple of the device count.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.convert.cache import tensor_info
from jaxsr.convert.coser_weights import CoSeRWeights, load_coser_folder
from jaxsr.diffusion.respace import respaced_schedule
from jaxsr.inference import step_progress
from jaxsr.models.cfw_vae import CFWAutoencoderKL
from jaxsr.models.clip_text import CLIPTextModel
from jaxsr.models.cognitive import CognitiveEncoder
from jaxsr.models.coser_controlnet import CoSeRControlNet
from jaxsr.models.coser_unet import CoSeRUNet
from jaxsr.models.tokenizer import load_tokenizer, tokenize
from jaxsr.models.vae import AutoencoderKL
from jaxsr.nn.resize import torch_resize_bicubic
from jaxsr.parallel.mesh import make_mesh
from jaxsr.pipelines import memory
from jaxsr.pipelines.coser_sampling import (
    CoSeRNetworks,
    CoSeRSettings,
    coser_adapter,
    coser_restore,
    coser_restore_tiled,
)
from jaxsr.pipelines.placement import Placement, compute_dtype, held_bytes
from jaxsr.pipelines.seesr import as_rgb_array, pad_rows
from jaxsr.platform import auto_compute_dtype

NEGATIVE_PROMPT = (
    "worst quality, normal quality, low quality, low res, blurry, text, watermark, logo, "
    "banner, extra digits, cropped, jpeg artifacts, signature, username, error, sketch ,"
    "duplicate, ugly, monochrome, horror, geometry, mutation, disgusting")
COLOR_FIXES = {"adain": "adain", "wavelet": "wavelet", "none": "nofix", "nofix": "nofix"}
MODES = ("auto", "reference", "tiled")
DECODERS = ("auto", "cfw", "vae")
TILED_PADDINGS = ("exact", "script")
# Activations, compiled programs and compiler scratch beside the weights at a 128² LR,
# batch 1 (jaxsr.pipelines.memory), rounded up from benchmarks/sr_memory.py: 2.3 GB in
# float32 on a 2-core CPU; 5.7 GB in bfloat16 where the CPU emulates it, because the
# float32 copies XLA makes of the weights for the positive guidance pass are kept for
# the negative one.
COSER_RUNTIME_BYTES = 3 * memory.GB
COSER_EMULATED_BF16_RUNTIME_BYTES = 6 * memory.GB
_COMPUTE_DTYPE_MODULES = ("unet", "controlnet", "text_encoder")
# The UNet downsamples the latent three times: the n× image must be a multiple of 64.
_PIXEL_MULTIPLE = 64
_PATCH_MULTIPLE = 32             # inference_tile.py pads the enlarged image to this


@dataclasses.dataclass(frozen=True)
class CoSeROptions:
    """Sampling options; the defaults are CoSeR's scripts' (50 steps, guidance 3.0 for
    both passes, CFW decoder with w 0.5 when the weights have it, no colour fix)."""

    steps: int = 50
    guidance_scale: float = 3.0
    reference_guidance_scale: float = 3.0
    color_fix: str = "none"               # adain | wavelet | none
    decoder: str = "auto"                 # auto (CFW when converted) | cfw | vae
    fusion_weight: float = 0.5            # CFW w (--dec_w)
    prompt: str = ""                      # --user_prompt
    negative_prompt: str = NEGATIVE_PROMPT
    mode: str = "auto"                    # auto | reference | tiled
    latent_tile: int = 64                 # tiled mode: input_size / 8
    latent_tile_overlap: int = 32
    input_size: int = 512                 # tiled mode: the short side is enlarged to this
    patch_size: int = 1280                # tiled mode: pixels per patch (vqgantile_size)
    patch_stride: int = 1000              # (vqgantile_stride)
    upscale: int = 4                      # --upscale: the output is upscale× the input
    tiled_padding: str = "exact"          # exact | script (see the module docstring)
    # Report each denoising step to jaxsr.inference.step_progress's listeners (a
    # separately compiled program; the images are the same).
    step_progress: bool = False

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.color_fix not in COLOR_FIXES:
            problems.append(f"color_fix {self.color_fix!r} is not one of adain, wavelet, none")
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.decoder not in DECODERS:
            problems.append(f"decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if self.latent_tile < 8 or not 0 <= self.latent_tile_overlap < self.latent_tile:
            problems.append(f"latent tile {self.latent_tile} with overlap "
                            f"{self.latent_tile_overlap}: need tile >= 8, 0 <= overlap < tile")
        if not 0 < self.patch_stride <= self.patch_size or self.patch_size % _PATCH_MULTIPLE:
            problems.append(f"patch size {self.patch_size} / stride {self.patch_stride}: need "
                            f"0 < stride <= size, size a multiple of {_PATCH_MULTIPLE}")
        if self.upscale < 1 or self.input_size < 1:
            problems.append(f"upscale {self.upscale} / input_size {self.input_size}: need >= 1")
        if self.tiled_padding not in TILED_PADDINGS:
            problems.append(f"tiled_padding {self.tiled_padding!r} is not one of "
                            f"{', '.join(TILED_PADDINGS)}")
        if problems:
            raise ValueError("invalid CoSeR options: " + "; ".join(problems))

    def pick_mode(self, h: int, w: int) -> str:
        """The mode for an LR of h×w."""
        if self.mode != "auto":
            return self.mode
        side, n = 8 * self.latent_tile, self.upscale
        return "reference" if n * h * n * w <= side * side else "tiled"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def lr_multiple(upscale: int) -> int:
    """The LR side multiple whose upscale× image the UNet takes (a multiple of 64)."""
    return _PIXEL_MULTIPLE // math.gcd(upscale, _PIXEL_MULTIPLE)


class TiledGeometry(NamedTuple):
    """Tiled mode's sizes for an LR of h×w, each (height, width)."""

    scale: float                  # s = max(input_size / short side, upscale)
    enlarged: tuple[int, int]     # (int(h·s), int(w·s)): the bicubic enlargement
    padded: tuple[int, int]       # reflect-padded to this, then cut into patches
    output: tuple[int, int]       # the result: the crop back to `enlarged`, resized


def tiled_geometry(h: int, w: int, options: CoSeROptions) -> TiledGeometry:
    """inference_tile.py's sizes (Python float arithmetic as the script). "exact"
    padding rounds each side up to a multiple of 32 and ends at upscale·(h, w);
    "script" pads as the script: nothing when both sides are multiples of 32, else
    both sides to (side // 32 + 1)·32 (+32 on a side that already is a multiple), and
    when s > upscale resizes to int(padded · upscale / s) (its lines 330-337, 418-424)."""
    n = options.upscale
    s = max(options.input_size / min(h, w), float(n))
    big = (int(h * s), int(w * s))
    if options.tiled_padding == "exact":
        padded = tuple(_round_up(x, _PATCH_MULTIPLE) for x in big)
        return TiledGeometry(s, big, padded, (n * h, n * w))
    needs_pad = any(x % _PATCH_MULTIPLE for x in big)
    padded = tuple((x // _PATCH_MULTIPLE + 1) * _PATCH_MULTIPLE if needs_pad else x
                   for x in big)
    output = tuple(int(x * float(n) / s) for x in padded) if s > n else big
    return TiledGeometry(s, big, padded, output)


def patch_starts(length: int, size: int, stride: int) -> list[int]:
    """ImageSpliterTh's starts along one axis: 0 when it fits, else every `stride`
    with the ones that would overrun moved flush to the end (duplicates dropped)."""
    if length <= size:
        return [0]
    starts = [min(s, length - size) for s in range(0, length, stride)]
    return list(dict.fromkeys(starts))


class CoSeRPipeline:
    """Loaded CoSeR networks; see the module docstring."""

    def __init__(self, weights: CoSeRWeights, *, dtype="auto", vae_dtype="float32",
                 attention: str = "auto", devices=None):
        """weights: as `load_coser_folder` gives them, numpy or already placed (see
        `from_pretrained`). The pipeline keeps the parameters on its devices only, in
        `placement.held_dtype`; `self.weights` keeps the configs, not the arrays.

        dtype: compute dtype of the UNet, ControlNet and text encoder: "auto" (bfloat16
        on accelerators and CPUs with native bfloat16, else float32), "bfloat16" or
        "float32" (CoSeR's released precision: its hard reference attention picks
        argmaxes that bfloat16 rounding can flip). The cognitive encoder runs in
        float32; vae_dtype is the VAE's and CFW decoder's.
        """
        dt, vdt = compute_dtype(dtype), compute_dtype(vae_dtype)
        arch = weights.architecture
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = make_mesh((("data", -1),), self.devices)
        self._batch = NamedSharding(self.mesh, P("data"))
        self.dtype = dt
        cfw = (CFWAutoencoderKL(arch.vae, cfw=weights.cfw, dtype=vdt, attention=attention)
               if weights.cfw is not None else None)
        self._nets = CoSeRNetworks(
            cognitive=CognitiveEncoder(arch.cognitive, attention=attention, dtype=jnp.float32),
            unet=CoSeRUNet(arch.unet, dtype=dt, attention=attention),
            controlnet=CoSeRControlNet(arch.controlnet, dtype=dt, attention=attention),
            vae=AutoencoderKL(arch.vae, dtype=vdt, attention=attention), cfw=cfw)
        self.text_encoder = CLIPTextModel(arch.text_encoder, dtype=dt, attention=attention)
        if weights.tokenizer_dir is None:
            raise FileNotFoundError("the weights folder has no tokenizer/; convert again with "
                                    "--tokenizer (e.g. SD 2.1-base's tokenizer/ folder)")
        self.tokenizer = load_tokenizer(weights.tokenizer_dir)
        place = _placement(self.devices, dt, vdt)
        self.params = {k: place.tree(k, weights.params[k])
                       for k in ("cognitive", "unet", "controlnet", "vae", "cfw")
                       if k in weights.params}
        self.text_params = place.tree("text_encoder", weights.params["text_encoder"])
        self.weights = dataclasses.replace(weights, params={})
        self._text_fn = jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids))
        self._adapter_fn = jax.jit(partial(coser_adapter, self._nets))
        self._enlarge_fn = jax.jit(_enlarge, static_argnums=1)
        self._programs: dict = {}
        self._schedules: dict = {}
        self._text_cache: dict = {}

    @classmethod
    def from_pretrained(cls, folder, *, dtype="auto", vae_dtype="float32", devices=None,
                        check_memory: bool = True, **kwargs) -> CoSeRPipeline:
        """A folder written by `jaxsr convert --coser ... --qformer ... --sd ...`.

        Each tensor goes to the devices in its held dtype as it is read (no host copy
        of the weights); with check_memory the need is estimated from the folder's
        headers first and InsufficientMemoryError says what to try.
        """
        devices = list(jax.local_devices() if devices is None else devices)
        dt, vdt = compute_dtype(dtype), compute_dtype(vae_dtype)
        place = _placement(devices, dt, vdt)
        if check_memory and memory.check_enabled():
            info = tensor_info(folder)
            held = lambda dtypes: sum(held_bytes(info[m], dtypes.get(m, jnp.float32))
                                      for m in info)
            bf16 = {**place.modules, **{m: jnp.bfloat16 for m in _COMPUTE_DTYPE_MODULES}}
            emulated = (dt == jnp.bfloat16 and devices[0].platform == "cpu"
                        and auto_compute_dtype("cpu") == "float32")
            runtime = COSER_EMULATED_BF16_RUNTIME_BYTES if emulated else COSER_RUNTIME_BYTES
            memory.check_fits(held(place.modules), runtime, devices,
                              what=f"CoSeR ({jnp.dtype(dt).name}) from {folder}",
                              smaller_param_bytes=held(bf16) if dt != jnp.bfloat16 else None)
        weights = load_coser_folder(folder, leaf=place.leaf)
        return cls(weights, dtype=dt, vae_dtype=vdt, devices=devices, **kwargs)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def batch_multiple(self) -> int:
        """Images per compiled call are padded to a multiple of this (the devices)."""
        return len(self.devices)

    @property
    def has_cfw(self) -> bool:
        return self._nets.cfw is not None

    # ------------------------------------------------------------------ host steps
    def bucket_key(self, image, options: CoSeROptions | None = None) -> tuple:
        """(mode, H, W): images with equal keys share one compiled program. `image`: an
        array [h, w, ...], a PIL image or an (h, w) pair."""
        options = options or CoSeROptions()
        if isinstance(image, tuple) and len(image) == 2:
            h, w = image
        elif hasattr(image, "height") and hasattr(image, "width"):
            h, w = image.height, image.width
        else:
            h, w = np.shape(image)[:2]
        mode = options.pick_mode(h, w)
        if mode == "reference":
            m = lr_multiple(options.upscale)
            return mode, _round_up(h, m), _round_up(w, m)
        return mode, h, w

    def encode_prompt(self, prompt: str) -> jax.Array:
        """One prompt -> text-encoder hidden states [77, D] float32 (cached)."""
        if prompt not in self._text_cache:
            ids = jnp.asarray(tokenize(self.tokenizer, [prompt]))
            self._text_cache[prompt] = self._text_fn(self.text_params, ids)[0]
        return self._text_cache[prompt]

    def _settings(self, options: CoSeROptions) -> CoSeRSettings:
        return CoSeRSettings(guidance_scale=float(options.guidance_scale),
                             reference_guidance_scale=float(options.reference_guidance_scale),
                             color_fix=COLOR_FIXES[options.color_fix],
                             fusion_weight=float(options.fusion_weight),
                             latent_tile=options.latent_tile,
                             latent_tile_overlap=options.latent_tile_overlap,
                             upscale=options.upscale,
                             step_progress=options.step_progress)

    def _nets_for(self, options: CoSeROptions) -> CoSeRNetworks:
        if options.decoder == "cfw" and not self.has_cfw:
            raise ValueError("decoder 'cfw' asked for, but the weights folder has no CFW "
                             "decoder (convert with --cfw vqgan_cfw_00011.ckpt)")
        return self._nets if options.decoder != "vae" else self._nets._replace(cfw=None)

    def _program(self, kind: str, nets: CoSeRNetworks, settings: CoSeRSettings):
        key = (kind, nets.cfw is not None, settings)
        if key not in self._programs:
            fn = coser_restore if kind == "reference" else coser_restore_tiled
            program = jax.jit(partial(fn, nets, settings))
            self._programs[key] = (step_progress.tracked(program) if settings.step_progress
                                   else program)
        return self._programs[key]

    def _schedule(self, steps: int):
        if steps not in self._schedules:
            self._schedules[steps] = respaced_schedule(steps)
        return self._schedules[steps]

    def noise_shape(self, image, options: CoSeROptions | None = None) -> tuple[int, int, int]:
        """The latent shape (h', w', c) of the explicit `noises` for an image (array, PIL
        image or (h, w) pair): the padded n× image's in reference mode, one patch's in
        tiled mode."""
        options = options or CoSeROptions()
        mode, h, w = self.bucket_key(image, options)
        if mode == "reference":
            h, w = options.upscale * h, options.upscale * w
        else:
            h, w = (min(x, options.patch_size) for x in tiled_geometry(h, w, options).padded)
        vae = self._nets.vae.config
        factor = 2 ** (len(vae.block_out_channels) - 1)
        return h // factor, w // factor, vae.latent_channels

    def _keys(self, n: int, seed: int, ids=None):
        """[n] typed keys: key(seed) for every image when ids is None (the scripts reseed
        before every image), else fold_in(key(seed), ids[k]), ids padded to n."""
        base = jax.random.key(seed)
        if ids is None:
            return jax.vmap(lambda _: base)(jnp.arange(n))
        ids = jnp.asarray(pad_rows(np.asarray(ids, np.uint32), n))
        return jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)

    def _put_noises(self, noises, m: int):
        """Explicit draws padded to m images and sharded like the batch: "start" is
        [B, ...], the step draws [N, B, ...] (image axis second)."""
        if noises is None:
            return None
        per_step = NamedSharding(self.mesh, P(None, "data"))
        out = {}
        for name, x in noises.items():
            axis = 0 if name == "start" else 1
            out[name] = jax.device_put(pad_rows(np.asarray(x, np.float32), m, axis),
                                       self._batch if axis == 0 else per_step)
        return out

    def _text_batch(self, options: CoSeROptions, n: int):
        p = self.encode_prompt(options.prompt)
        q = self.encode_prompt(options.negative_prompt)
        return (jax.device_put(jnp.broadcast_to(p, (n, *p.shape)), self._batch),
                jax.device_put(jnp.broadcast_to(q, (n, *q.shape)), self._batch))

    # ------------------------------------------------------------- reference mode
    def _run_reference(self, images: list[np.ndarray], options: CoSeROptions, seed: int,
                       ids=None, noises=None):
        """Same-bucket images -> (uint8 SR [nh, nw, 3], uint8 references) lists; ids and
        noises as `upscale`'s, for these images."""
        n, up = len(images), options.upscale
        m = _round_up(n, self.num_devices)
        _, ph, pw = self.bucket_key(images[0], options)
        lr = np.stack([np.pad(im, ((0, ph - im.shape[0]), (0, pw - im.shape[1]), (0, 0)),
                              mode="reflect") for im in images]).astype(np.float32) / 255.0
        prompt, negative = self._text_batch(options, m)
        out = self._program("reference", self._nets_for(options), self._settings(options))(
            self.params, self._schedule(options.steps),
            jax.device_put(pad_rows(lr, m), self._batch), prompt, negative,
            jax.device_put(self._keys(m, seed, ids), self._batch), self._put_noises(noises, m))
        sr, ref = np.asarray(out.image), np.asarray(out.reference_image)
        crop = lambda a, im: a[:up * im.shape[0], :up * im.shape[1]]
        return ([crop(a, im) for a, im in zip(sr[:n], images)],
                [crop(a, im) for a, im in zip(ref[:n], images)])

    # ----------------------------------------------------------------- tiled mode
    def _run_tiled(self, image: np.ndarray, options: CoSeROptions, seed: int,
                   batch_size: int, key_id=None, noises=None) -> np.ndarray:
        """One image through inference_tile.py's procedure -> uint8 [`tiled_geometry`'s
        output, 3]. Every patch draws the same (the script reseeds per patch): from
        key(seed) or, with key_id, fold_in(key(seed), key_id); or the one image's
        explicit `noises` ({"start": [h', w', c], "steps": [N, h', w', c]})."""
        h, w = image.shape[:2]
        lr = jnp.asarray(image[None].astype(np.float32) / 255.0)
        adapter = self._adapter_fn(self.params, lr)                  # E of the whole LR
        geometry = tiled_geometry(h, w, options)
        im_lq = np.asarray(self._enlarge_fn(lr, geometry.enlarged))[0]
        (big_h, big_w), (ph, pw) = geometry.enlarged, geometry.padded
        if (ph, pw) != (big_h, big_w):
            im_lq = np.pad(im_lq, ((0, ph - big_h), (0, pw - big_w), (0, 0)), mode="reflect")
        ys = patch_starts(ph, options.patch_size, options.patch_stride)
        xs = patch_starts(pw, options.patch_size, options.patch_stride)
        boxes = [(y, x) for x in xs for y in ys]          # ImageSpliterTh's order
        th, tw = min(ph, options.patch_size), min(pw, options.patch_size)
        total = np.zeros((ph, pw, 3), np.float32)
        count = np.zeros((ph, pw, 1), np.float32)
        program = self._program("tiled", self._nets_for(options), self._settings(options))
        step = max(1, batch_size)
        for start in range(0, len(boxes), step):
            chunk = boxes[start:start + step]
            m = _round_up(len(chunk), self.num_devices)
            patches = np.stack([im_lq[y:y + th, x:x + tw] for y, x in chunk])
            prompt, negative = self._text_batch(options, m)
            ids = None if key_id is None else [key_id] * m
            out, _ = program(self.params, self._schedule(options.steps),
                             jax.device_put(pad_rows(patches, m), self._batch),
                             jax.device_put(jnp.broadcast_to(adapter, (m, *adapter.shape[1:])),
                                            self._batch),
                             prompt, negative,
                             jax.device_put(self._keys(m, seed, ids), self._batch),
                             self._put_noises(_patch_noises(noises, m), m))
            for (y, x), patch in zip(chunk, np.asarray(out)[:len(chunk)]):
                total[y:y + th, x:x + tw] += patch
                count[y:y + th, x:x + tw] += 1.0
        sr = np.clip((total / count)[:big_h, :big_w] / 2.0 + 0.5, 0.0, 1.0)
        if geometry.scale > options.upscale:
            sr = np.asarray(torch_resize_bicubic(jnp.asarray(sr[None]), geometry.output))[0]
            sr = np.clip(sr, 0.0, 1.0)
        return (sr * 255.0).astype(np.uint8)

    # ---------------------------------------------------------------------- API
    def upscale(self, images, *, options: CoSeROptions | None = None, seed: int = 2887,
                ids=None, noises=None, batch_size: int | None = None,
                return_references: bool = False):
        """Super-resolve images of any sizes; returns uint8 [nh, nw, 3] arrays in input
        order (n = options.upscale; tiled mode with tiled_padding "script": the size
        `tiled_geometry` gives), and with `return_references` also the generated
        reference images (uint8 [nh, nw, 3]; None for images done in tiled mode, which
        generates none).

        images: uint8 arrays [h, w, 3] (or [h, w]) or PIL images of any mode.
        ids: None (default): every image draws from key(seed), as the scripts, which
          reseed before every image; else per-image integers folded into key(seed)
          (fold_in(key(seed), ids[k]), SeeSR's rule), so equal images draw differently.
        noises: explicit draws for all images at once, in `draw_noises`'s layout
          {"start": [B, h', w', c], "reference_steps": [N, B, h', w', c], "steps":
          [N, B, h', w', c]} with (h', w', c) = `noise_shape(image, options)` (tiled
          mode: one patch's, used by every patch of the image; "reference_steps"
          unused). The images must then share one size bucket; they run as one batch.
        batch_size: images (or tiled-mode patches) per compiled call (default: the
          device count); padded to a multiple of the device count.
        """
        options = options or CoSeROptions()
        arrays = [as_rgb_array(im) for im in images]
        if ids is not None and len(ids) != len(arrays):
            raise ValueError(f"{len(ids)} ids for {len(arrays)} images")
        batch_size = batch_size or self.num_devices
        outputs: list = [None] * len(arrays)
        references: list = [None] * len(arrays)
        buckets: dict[tuple, list[int]] = {}
        for k, im in enumerate(arrays):
            buckets.setdefault(self.bucket_key(im, options), []).append(k)
        if noises is not None:
            self._check_noises(noises, arrays, buckets, options)
            batch_size = max(batch_size, len(arrays))
        pick = lambda chunk: None if ids is None else [int(ids[k]) for k in chunk]
        for (mode, _, _), members in buckets.items():
            if mode == "tiled":
                for k in members:
                    key_id = None if ids is None else int(ids[k])
                    outputs[k] = self._run_tiled(arrays[k], options, seed, batch_size,
                                                 key_id, _image_noises(noises, k))
                continue
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                sr, ref = self._run_reference([arrays[k] for k in chunk], options, seed,
                                              pick(chunk), noises)
                for k, a, b in zip(chunk, sr, ref):
                    outputs[k], references[k] = a, b
        return (outputs, references) if return_references else outputs

    def _check_noises(self, noises, arrays, buckets, options: CoSeROptions) -> None:
        """ValueError unless `noises` fits `upscale`'s images: one bucket, and every
        draw of the shape `noise_shape` gives, for every image and step."""
        if len(buckets) != 1:
            raise ValueError("explicit noises need all images in one size bucket")
        [(mode, _, _)] = buckets
        lat = self.noise_shape(arrays[0], options)
        n, steps = len(arrays), options.steps
        want = {"start": (n, *lat), "steps": (steps, n, *lat)}
        if mode == "reference":
            want["reference_steps"] = (steps, n, *lat)
        got = {name: tuple(np.shape(noises[name])) if name in noises else None
               for name in want}
        if got != want:
            raise ValueError(f"noises: need shapes {want}, got {got}")


def _image_noises(noises, k: int):
    """Image k's draws out of `upscale`'s noises: {"start": [h', w', c], "steps": [N, ...]}."""
    if noises is None:
        return None
    return {"start": np.asarray(noises["start"])[k], "steps": np.asarray(noises["steps"])[:, k]}


def _patch_noises(noises, m: int):
    """One image's draws repeated for a chunk of m patches (batch axis added)."""
    if noises is None:
        return None
    return {"start": np.broadcast_to(noises["start"], (m, *noises["start"].shape)),
            "steps": np.repeat(noises["steps"][:, None], m, axis=1)}


def _placement(devices, dt, vdt) -> Placement:
    """Replicated over the pipeline's data mesh, each network in its compute dtype (the
    cognitive encoder in float32)."""
    rep = NamedSharding(make_mesh((("data", -1),), devices), P())
    return Placement({**{m: dt for m in _COMPUTE_DTYPE_MODULES}, "vae": vdt, "cfw": vdt,
                      "cognitive": jnp.float32}, rep)


def _enlarge(lr, size: tuple[int, int]):
    """im_lq = clamp(bicubic(2·lr − 1, size), −1, 1) with PyTorch's bicubic (a = −0.75)."""
    return jnp.clip(torch_resize_bicubic(2.0 * lr - 1.0, size), -1.0, 1.0)
