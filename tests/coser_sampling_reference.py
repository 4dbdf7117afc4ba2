"""A PyTorch reference of CoSeR's per-image inference (docs/coser_reference.md §4, §7),
written as a plain loop from the description and independent of jaxsr's code:

cognitive E -> bicubic ×4 LR latent (posterior mode) -> x_T from the 1000-step tables ->
respaced DDPM reference generation (gen-mode UNet, CFG with the negative prompt alone
as context) -> respaced DDPM SR (ControlNet on the LR and reference latents, AiA UNet,
CFG) -> VAE decode -> optional AdaIN colour fix -> uint8.

The respaced tables follow LDM's `register_schedule` on StableSR's respaced betas,
computed here in float64 and rounded once to float32. Every random draw is injected
(NCHW tensors), so the result is a deterministic function of the inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tests import coser_reference as aia
from tests.coser_cognitive_reference import torch_clip_preprocess

LINEAR_START, LINEAR_END, T = 0.00085, 0.012, 1000
SCALE = 0.18215


def base_alphas_cumprod() -> torch.Tensor:
    """[1000] float64 ᾱ of LDM's linear schedule: β = linspace(√β0, √β1)²."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def kept_timesteps(n: int) -> list[int]:
    """StableSR's space_timesteps(1000, [n]): a float stride accumulated, Python round."""
    stride = (T - 1) / (n - 1)
    out, pos = [], 0.0
    for _ in range(n):
        out.append(round(pos))
        pos += stride
    return out


def respaced(n: int) -> dict:
    """Ascending-k tables of the respaced DDPM (float32 tensors) and the kept t_k."""
    ac_base = base_alphas_cumprod()
    ts = kept_timesteps(n)
    ac = ac_base[ts]
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1.0 - ac / ac_prev
    var = betas * (1.0 - ac_prev) / (1.0 - ac)
    f32 = lambda x: x.to(torch.float32)
    return dict(
        t=ts,
        recip=f32(torch.sqrt(1.0 / ac)), recipm1=f32(torch.sqrt(1.0 / ac - 1.0)),
        coef1=f32(betas * torch.sqrt(ac_prev) / (1.0 - ac)),
        coef2=f32((1.0 - ac_prev) * torch.sqrt(1.0 - betas) / (1.0 - ac)),
        logvar=f32(torch.log(torch.clamp(var, min=1e-20))))


def ddpm_step(tab: dict, k: int, x, eps, noise):
    """LDM p_sample at respaced index k: x̂0 (no clipping), posterior mean, noise unless k = 0."""
    x0 = tab["recip"][k] * x - tab["recipm1"][k] * eps
    mean = tab["coef1"][k] * x0 + tab["coef2"][k] * x
    if k == 0:
        return mean
    return mean + torch.exp(0.5 * tab["logvar"][k]) * noise


def adain(x, ref, eps=1e-5):
    """Per image/channel mean and unbiased std (+eps inside the root) of ref given to x."""
    def stats(a):
        flat = a.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]
    xm, xs = stats(x)
    rm, rs = stats(ref)
    return (x - xm) / xs * rs + rm


def to_uint8(x):
    """[-1, 1] NCHW -> NHWC uint8, clamp((x + 1)/2)·255 truncated."""
    y = torch.clamp((x + 1.0) / 2.0, 0.0, 1.0) * 255.0
    return y.permute(0, 2, 3, 1).numpy().astype(np.uint8)


@torch.no_grad()
def reference_coser(lr, *, sr, tower, qformer, query_tokens, vision_size, vae, unet, cn,
                    prompt, negative, noises, steps, cfg=3.0, cfg_ref=3.0, fix="none"):
    """lr: [B, 3, h, w] in [0, 1]; prompt [B, 77, D], negative [B, 77, D];
    noises: {"start": [B,4,h',w'], "reference_steps"/"steps": lists of [B,4,h',w'] in
    loop order}. Returns a dict of NCHW latents and NHWC uint8 images."""
    b = lr.shape[0]
    # 1. E = QF(CLIP(clipT(SRResNet(lr))))
    tokens = tower.coser_tokens(torch_clip_preprocess(sr(lr), vision_size))
    queries = query_tokens.expand(b, -1, -1)
    e = qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
    # 2. im_lq and its latent (posterior mode)
    h, w = lr.shape[2:]
    im_lq = torch.clamp(F.interpolate(2.0 * lr - 1.0, size=(4 * h, 4 * w), mode="bicubic",
                                      align_corners=False), -1.0, 1.0)
    z_lr = SCALE * vae.encode(im_lq).latent_dist.mode()
    # 4. x_T with the base tables
    ac = base_alphas_cumprod()
    x_t = (torch.sqrt(ac[-1]).float() * z_lr
           + torch.sqrt(1.0 - ac[-1]).float() * noises["start"])
    pos = torch.cat([prompt, e], dim=1)          # 127-token context
    neg = negative                               # the negative prompt alone, in E's slot
    tab = respaced(steps)
    n = len(tab["t"])

    # 5. reference generation (gen mode)
    x = x_t
    for i, k in enumerate(range(n - 1, -1, -1)):
        t = torch.full((b,), tab["t"][k], dtype=torch.long)
        ep = aia.aia_unet_forward(unet, x, t, pos)
        en = aia.aia_unet_forward(unet, x, t, neg)
        x = ddpm_step(tab, k, x, en + cfg_ref * (ep - en), noises["reference_steps"][i])
    z_ref = x

    # 6. SR pass from the same x_T
    x = x_t
    for i, k in enumerate(range(n - 1, -1, -1)):
        t = torch.full((b,), tab["t"][k], dtype=torch.long)
        feats_lr = cn(x, z_lr, t, pos)
        feats_ref = cn(x, z_ref, t, pos)
        ep = aia.aia_unet_forward(unet, x, t, pos, feats_lr, feats_ref)
        en = aia.aia_unet_forward(unet, x, t, neg, feats_lr, feats_ref)
        x = ddpm_step(tab, k, x, en + cfg * (ep - en), noises["steps"][i])
    z = x

    # 7. decode, colour fix, uint8
    image = vae.decode(z / SCALE).sample
    if fix == "adain":
        image = adain(image, im_lq)
    ref_image = vae.decode(z_ref / SCALE).sample
    return dict(latent=z, reference_latent=z_ref, image=to_uint8(image),
                reference_image=to_uint8(ref_image), timesteps=tab["t"])


def stablesr_tile_weights(tile: int) -> torch.Tensor:
    """StableSR's `_gaussian_weights` for a square tile: outer(y, x) of Gaussians with
    variance 0.01 in units of the tile, midpoints (T−1)/2 along x and T/2 along y."""
    var = 0.01

    def probs(mid):
        return [np.exp(-(i - mid) * (i - mid) / (tile * tile) / (2 * var))
                / np.sqrt(2 * np.pi * var) for i in range(tile)]

    return torch.tensor(np.outer(probs(tile / 2), probs((tile - 1) / 2)))


def _grid_count(size: int, tile: int, overlap: int) -> int:
    n, cur = 0, 0
    while cur < size:
        cur = max(n * tile - overlap * n, 0) + tile
        n += 1
    return n


def tiled_eps(x, z_lr, z_ref, t, pos, neg, unet, cn, cfg, tile, overlap):
    """`p_mean_variance_canvas`'s ε: per tile (rows over x outer, columns over y inner,
    the last flush to the edge) the ControlNet on both hints and the guided AiA UNet,
    blended with the Gaussian weights."""
    _, _, h, w = x.shape
    rows, cols = _grid_count(w, tile, overlap), _grid_count(h, tile, overlap)
    weights = stablesr_tile_weights(tile)
    acc = torch.zeros(x.shape)
    contributors = torch.zeros(x.shape)
    for row in range(rows):
        for col in range(cols):
            ox = w - tile if row == rows - 1 else row * (tile - overlap)
            oy = h - tile if col == cols - 1 else col * (tile - overlap)
            box = (slice(None), slice(None), slice(oy, oy + tile), slice(ox, ox + tile))
            xt = x[box]
            feats_lr, feats_ref = cn(xt, z_lr[box], t, pos), cn(xt, z_ref[box], t, pos)
            ep = aia.aia_unet_forward(unet, xt, t, pos, feats_lr, feats_ref)
            en = aia.aia_unet_forward(unet, xt, t, neg, feats_lr, feats_ref)
            acc[box] += (en + cfg * (ep - en)) * weights
            contributors[box] += weights
    return acc / contributors


def patch_starts(length: int, size: int, stride: int) -> list[int]:
    """ImageSpliterTh.extract_starts."""
    if length <= size:
        return [0]
    starts = list(range(0, length, stride))
    for i in range(len(starts)):
        if starts[i] + size > length:
            starts[i] = length - size
    return sorted(set(starts), key=starts.index)


def tile_sizes(h: int, w: int, input_size: int, upscale: int, padding: str):
    """inference_tile.py's sizes for an h×w LR: (s, (big_h, big_w), (pad_h, pad_w), the
    final (height, width)). "script": as the script's code (float upscale): pad nothing
    when both enlarged sides are multiples of 32, else pad each to the next multiple
    strictly above it; when s > upscale, resize the cropped result to the padded size
    times upscale / s. "exact": the smallest padding, and a final size of upscale·(h, w)."""
    s = max(input_size / min(h, w), float(upscale))
    big_h, big_w = int(h * s), int(w * s)
    if padding == "exact":
        return s, (big_h, big_w), ((-big_h) % 32, (-big_w) % 32), (upscale * h, upscale * w)
    if big_h % 32 == 0 and big_w % 32 == 0:
        pad_h = pad_w = 0
    else:
        pad_h, pad_w = (big_h // 32 + 1) * 32 - big_h, (big_w // 32 + 1) * 32 - big_w
    final = (int((big_h + pad_h) * float(upscale) / s), int((big_w + pad_w) * float(upscale) / s))
    return s, (big_h, big_w), (pad_h, pad_w), final if s > upscale else (big_h, big_w)


@torch.no_grad()
def reference_coser_tiled(lr, *, sr, tower, qformer, query_tokens, vision_size, vae, unet, cn,
                          prompt, negative, noises, steps, cfg=3.0, fix="none", input_size=512,
                          tile=64, overlap=32, patch=1280, stride=1000, upscale=4,
                          padding="exact"):
    """scripts/inference_tile.py for one image (batch 1): lr [1, 3, h, w] in [0, 1];
    prompt/negative [1, 77, D]; noises {"start", "steps"} for one patch (the script
    reseeds before every patch, so every patch draws the same); padding: "script" (the
    script's own padding and final size) or "exact" (see `tile_sizes`). Returns uint8 NHWC."""
    tokens = tower.coser_tokens(torch_clip_preprocess(sr(lr), vision_size))
    e = qformer(query_embeds=query_tokens, encoder_hidden_states=tokens).last_hidden_state
    pos, neg = torch.cat([prompt, e], dim=1), negative
    h, w = lr.shape[2:]
    s, (big_h, big_w), (pad_h, pad_w), final = tile_sizes(h, w, input_size, upscale, padding)
    im_lq = torch.clamp(F.interpolate(2.0 * lr - 1.0, size=(big_h, big_w), mode="bicubic",
                                      align_corners=False), -1.0, 1.0)
    im_lq = F.pad(im_lq, (0, pad_w, 0, pad_h), mode="reflect")
    ys = patch_starts(im_lq.shape[2], patch, stride)
    xs = patch_starts(im_lq.shape[3], patch, stride)
    total, count = torch.zeros(im_lq.shape), torch.zeros(im_lq.shape)
    ac = base_alphas_cumprod()
    tab = respaced(steps)
    n = len(tab["t"])
    for x0 in xs:
        for y0 in ys:
            box = (slice(None), slice(None), slice(y0, y0 + patch), slice(x0, x0 + patch))
            p = im_lq[box]
            z_lr = SCALE * vae.encode(p).latent_dist.mode()
            z_ref = SCALE * vae.encode(torch.zeros_like(p)).latent_dist.mode()
            x = (torch.sqrt(ac[-1]).float() * z_lr
                 + torch.sqrt(1.0 - ac[-1]).float() * noises["start"])
            for i, k in enumerate(range(n - 1, -1, -1)):
                t = torch.full((1,), tab["t"][k], dtype=torch.long)
                eps = tiled_eps(x, z_lr, z_ref, t, pos, neg, unet, cn, cfg, tile, overlap)
                x = ddpm_step(tab, k, x, eps, noises["steps"][i])
            image = vae.decode(x / SCALE).sample
            if fix == "adain":
                image = adain(image, p)
            total[box] += image
            count[box] += 1.0
    out = torch.clamp(((total / count)[:, :, :big_h, :big_w] + 1.0) / 2.0, 0.0, 1.0)
    if s > upscale:
        out = torch.clamp(F.interpolate(out, size=final, mode="bicubic", align_corners=False),
                          0.0, 1.0)
    return (out * 255.0).permute(0, 2, 3, 1).numpy().astype(np.uint8)
