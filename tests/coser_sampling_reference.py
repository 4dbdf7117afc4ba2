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
