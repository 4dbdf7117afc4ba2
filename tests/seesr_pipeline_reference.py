"""A PyTorch reference of SeeSR's whole inference (test_seesr.py + pipeline_seesr.py),
composed from diffusers/transformers modules and written from the published
description of the released scripts, in their torch/PIL idiom:

DAPE on the original LR -> tag prompt -> PIL bicubic resize chain -> CLIP text
embeddings (CFG batch [neg, pos]) -> VAE posterior sample of the LR -> DDPM add_noise
at t=999 -> leading-spaced DDPMScheduler steps with ControlNet+UNet (optionally over
Gaussian-weighted latent tiles) -> VAE decode -> uint8 -> AdaIN / wavelet colour fix ->
truncation -> final PIL resize.

Every random draw is injected: the posterior noise, the start noise and one noise
per scheduler step, so the result is a deterministic function of the inputs.
`DDPMScheduler.step` is run unchanged; only its `randn_tensor` is fed the injected
draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers import scheduling_ddpm
from PIL import Image

from tests import seesr_reference

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# SD2-base's scheduler/scheduler_config.json (a PNDMScheduler config; the released
# scripts read it into a DDPMScheduler, which ignores the PNDM-only fields and, having no
# set_alpha_to_one, takes alpha_prod_prev = 1 on the last step).
SD2_BASE_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "trained_betas": None}


def sd2_ddpm_scheduler() -> diffusers.DDPMScheduler:
    """DDPMScheduler from SD2-base's config: scaled_linear 0.00085..0.012 over 1000 steps,
    leading spacing (the default) with steps_offset 1, epsilon, no x̂0 clipping."""
    sched = diffusers.DDPMScheduler.from_config(SD2_BASE_SCHEDULER_CONFIG)
    c = sched.config
    assert (c.timestep_spacing, c.variance_type, c.clip_sample) == ("leading", "fixed_small",
                                                                    False)
    return sched


@dataclasses.dataclass(frozen=True)
class RefOptions:
    """test_seesr.py's arguments that matter for one image (defaults are the script's)."""
    steps: int = 50
    guidance_scale: float = 5.5
    conditioning_scale: float = 1.0
    prompt: str = ""
    added_prompt: str = "clean, high-resolution, 8k"
    negative_prompt: str = "dotted, noise, blur, lowres, smooth"
    latent_tile: int = 96
    latent_tile_overlap: int = 4
    color_fix: str = "adain"          # adain | wavelet | none
    upscale: int = 4
    process_size: int = 512
    start_timestep: int = 999


@dataclasses.dataclass
class RefNoises:
    """Injected draws, NCHW float32: posterior/initial [1,4,h,w], steps: one [1,4,h,w] per step."""
    posterior: torch.Tensor
    initial: torch.Tensor
    steps: list


# ------------------------------------------------------------------------- DAPE
def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision ToTensor: uint8 HWC -> float [1,3,H,W] in [0,1]."""
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]


@torch.no_grad()
def dape_outputs(lr: Image.Image, ram, ram_size: int):
    """(soft prompt [1,L,C], logits [1,classes]) of the original-size LR: tensor
    Resize((S,S)) without antialias, then ImageNet normalisation. `ram(images)` returns
    (..., soft prompt, logits) as its last two outputs."""
    x = F.interpolate(pil_to_tensor(lr), size=(ram_size, ram_size), mode="bilinear",
                      align_corners=False, antialias=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = ram((x - mean) / std)
    return out[-2], out[-1]


def dape(lr: Image.Image, ram, ram_size: int, tag_list, thresholds):
    """(tag string, soft prompt): tags with sigmoid(logit) > per-class threshold, in
    tag-list order, joined with ", "."""
    embeds, logits = dape_outputs(lr, ram, ram_size)
    fired = torch.sigmoid(logits) > torch.as_tensor(np.asarray(thresholds, np.float32))
    names = [tag_list[i] for i in torch.nonzero(fired[0]).flatten().tolist()]
    return ", ".join(names), embeds


# ------------------------------------------------------------------- resize chain
def resize_chain(lr: Image.Image, upscale: int, process_size: int) -> Image.Image:
    """test_seesr.py: enlarge small inputs so the short side is process_size//upscale,
    then ×upscale, then crop the size down to multiples of 8 (all PIL bicubic)."""
    w, h = lr.size
    side = process_size // upscale
    if w < side or h < side:
        scale = side / min(w, h)
        lr = lr.resize((int(scale * w), int(scale * h)), Image.BICUBIC)
    lr = lr.resize((lr.size[0] * upscale, lr.size[1] * upscale), Image.BICUBIC)
    return lr.resize((lr.size[0] // 8 * 8, lr.size[1] // 8 * 8), Image.BICUBIC)


# ------------------------------------------------------------------- text
def encode_text(tokenizer, text_encoder, text: str) -> torch.Tensor:
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ------------------------------------------------------------------- tiling
def gaussian_tile_weights(t: int) -> torch.Tensor:
    """[t, t] float64; note the x midpoint (t-1)/2 but the y midpoint t/2."""
    var = 0.01
    xs = [math.exp(-(x - (t - 1) / 2) ** 2 / (t * t) / (2 * var)) / math.sqrt(2 * math.pi * var)
          for x in range(t)]
    ys = [math.exp(-(y - t / 2) ** 2 / (t * t) / (2 * var)) / math.sqrt(2 * math.pi * var)
          for y in range(t)]
    return torch.outer(torch.tensor(ys, dtype=torch.float64), torch.tensor(xs, dtype=torch.float64))


def tile_starts(size: int, t: int, overlap: int) -> list:
    """Tile offsets along one axis: the fewest tiles of stride t-overlap reaching `size`,
    the last one moved back flush with the end."""
    n, reach = 0, 0
    while reach < size:
        reach = n * (t - overlap) + t
        n += 1
    starts = [i * (t - overlap) for i in range(n)]
    starts[-1] = size - t
    return starts


def _eps(unet, controlnet, x, t, text, image, ram, scale):
    """ControlNet residuals into the UNet on one (CFG-batched) latent [B,4,h,w]."""
    seesr_reference.RCA_CONTEXT["image"] = ram
    down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=image,
                           conditioning_scale=scale, return_dict=False)
    return unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


def predict_noise(unet, controlnet, x, t, text, image, ram, opts: RefOptions):
    """ε for the whole latent, over Gaussian-blended tiles when h·w > latent_tile²."""
    h, w = x.shape[-2:]
    if h * w <= opts.latent_tile ** 2:
        return _eps(unet, controlnet, x, t, text, image, ram, opts.conditioning_scale)
    size = min(opts.latent_tile, h, w)
    weight = gaussian_tile_weights(size)
    total = torch.zeros(x.shape, dtype=torch.float64)
    norm = torch.zeros(x.shape, dtype=torch.float64)
    for y0 in tile_starts(h, size, opts.latent_tile_overlap):
        for x0 in tile_starts(w, size, opts.latent_tile_overlap):
            ys, xs = slice(y0, y0 + size), slice(x0, x0 + size)
            crop = image[:, :, y0 * 8:(y0 + size) * 8, x0 * 8:(x0 + size) * 8]
            eps = _eps(unet, controlnet, x[:, :, ys, xs], t, text, crop, ram,
                       opts.conditioning_scale)
            total[:, :, ys, xs] += eps.double() * weight
            norm[:, :, ys, xs] += weight
    return (total / norm).to(x.dtype)


@contextlib.contextmanager
def injected_step_noise(draws):
    """DDPMScheduler.step draws its variance noise through the module's randn_tensor:
    hand it the injected draws, in order, for the duration of the loop."""
    queue = list(draws)
    original = scheduling_ddpm.randn_tensor

    def take(shape, **_):
        z = queue.pop(0)
        assert tuple(z.shape) == tuple(shape), (z.shape, shape)
        return z

    scheduling_ddpm.randn_tensor = take
    try:
        yield queue
    finally:
        scheduling_ddpm.randn_tensor = original


# ------------------------------------------------------------------- colour fix
def adain_fix(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-channel mean/std transfer; var unbiased + 1e-5. [1,3,H,W] in [0,1]."""
    def stats(t):
        flat = t.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + 1e-5).sqrt()[..., None, None]

    mx, sx = stats(x)
    mr, sr = stats(ref)
    return (x - mx) / sx * sr + mr


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    k = k[None, None].repeat(3, 1, 1, 1)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), k, groups=3, dilation=radius)


def _split_wavelet(x: torch.Tensor, levels: int = 5):
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_fix(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """High frequencies of x plus the 5-level low frequencies of ref."""
    return _split_wavelet(x)[0] + _split_wavelet(ref)[1]


# ------------------------------------------------------------------- pipeline
@torch.no_grad()
def reference_seesr(lr: np.ndarray, *, tokenizer, text_encoder, vae, unet, controlnet, ram,
                    ram_size: int, tag_list, thresholds, scheduler, noises: RefNoises,
                    options: RefOptions = RefOptions()):
    """SeeSR on one uint8 LR [h,w,3] -> (uint8 [4h,4w,3], trace dict of intermediates:
    tags, prompt, negative, text [2,77,D], ram [1,L,C], control [1,3,H,W], z_lr, x_init,
    timesteps, first_eps, latent (final), decoded (uint8 before the colour fix))."""
    opts = options
    image = Image.fromarray(lr).convert("RGB")
    tags, ram_embeds = dape(image, ram, ram_size, tag_list, thresholds)
    prompt = f"{tags}, {opts.prompt}," + opts.added_prompt
    ori_w, ori_h = image.size
    control_pil = resize_chain(image, opts.upscale, opts.process_size)
    control = pil_to_tensor(control_pil)                                   # [1,3,H,W] in [0,1]

    cfg = opts.guidance_scale > 1.0
    text = encode_text(tokenizer, text_encoder, prompt)
    if cfg:
        neg = encode_text(tokenizer, text_encoder, opts.negative_prompt)
        text = torch.cat([neg, text])
    batch = text.shape[0]
    ram_b = ram_embeds.repeat(batch, 1, 1)
    control_b = control.repeat(batch, 1, 1, 1)

    scheduler.set_timesteps(opts.steps)
    posterior = vae.encode(control * 2 - 1).latent_dist
    z_lr = (posterior.mean + posterior.std * noises.posterior) * vae.config.scaling_factor
    x = scheduler.add_noise(z_lr, noises.initial, torch.tensor([opts.start_timestep]))
    trace = dict(tags=tags, prompt=prompt, negative=opts.negative_prompt, text=text,
                 ram=ram_embeds, control=control, z_lr=z_lr, x_init=x,
                 timesteps=scheduler.timesteps.tolist())
    with injected_step_noise(noises.steps) as left:
        for t in scheduler.timesteps:
            xin = scheduler.scale_model_input(torch.cat([x] * batch), t)
            eps = predict_noise(unet, controlnet, xin, t, text, control_b, ram_b, opts)
            if cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + opts.guidance_scale * (cond - uncond)
            trace.setdefault("first_eps", eps)
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        assert not left, "one step noise per step"
    trace["latent"] = x

    decoded = vae.decode(x / vae.config.scaling_factor, return_dict=False)[0]
    decoded = (decoded / 2 + 0.5).clamp(0, 1)
    decoded = (decoded[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    trace["decoded"] = decoded
    out = pil_to_tensor(Image.fromarray(decoded))
    if opts.color_fix == "adain":
        out = adain_fix(out, control)
    elif opts.color_fix == "wavelet":
        out = wavelet_fix(out, control)
    out = (out.clamp(0, 1) * 255).to(torch.uint8)          # ToPILImage truncates
    result = Image.fromarray(out[0].permute(1, 2, 0).numpy())
    if result.size != (ori_w * opts.upscale, ori_h * opts.upscale):
        result = result.resize((ori_w * opts.upscale, ori_h * opts.upscale), Image.BICUBIC)
    return np.asarray(result), trace
