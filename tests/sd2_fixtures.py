"""A tiny random SD2 pipeline saved in the diffusers layout, and the same weights
as an original single-file checkpoint built from the recorded key maps."""

import json

import diffusers
import numpy as np
import torch
import transformers

from tests.keylists import read_map
from tests.test_unet import TINY as UNET_TINY
from tests.test_unet import randomize_
from tests.test_vae import TINY as VAE_TINY

# 23 layers, as SD2's text encoder, so the single-file key maps apply unchanged.
TEXT_TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=23,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
             "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False}


def build_tiny_sd2(seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**{**UNET_TINY, "cross_attention_dim": 32}).eval()
    vae = diffusers.AutoencoderKL(**VAE_TINY).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_TINY)).eval()
    for i, m in enumerate((unet, vae, text)):
        randomize_(m, seed=seed + i)
    return unet, vae, text


def save_diffusers_folder(root, unet, vae, text, safe: bool = True):
    unet.save_pretrained(root / "unet", safe_serialization=safe)
    vae.save_pretrained(root / "vae", safe_serialization=safe)
    text.save_pretrained(root / "text_encoder", safe_serialization=safe)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"],
         "text_encoder": ["transformers", "CLIPTextModel"]}))
    return root


def single_file_state(unet, vae, text, seed: int = 0) -> dict:
    """The LDM single-file state dict of the same weights, built by inverting the
    recorded LDM->diffusers maps row by row (independent of jaxsr's rename rules)."""
    rng = np.random.default_rng(seed)
    sources = {"unet": {k: v.numpy() for k, v in unet.state_dict().items()},
               "vae": {k: v.numpy() for k, v in vae.state_dict().items()},
               "text": {"text_model." + k: v.numpy() for k, v in text.state_dict().items()}}
    out = {}
    for ldm, name in (r[:2] for r in read_map("ldm_to_diffusers_unet_map.tsv")):
        out[ldm] = sources["unet"][name]
    for ldm, name, how in read_map("ldm_to_diffusers_vae_map.tsv"):
        v = sources["vae"][name]
        out[ldm] = v[:, :, None, None] if how.startswith("squeeze") else v
    qkv = {}
    for ldm, name, how in read_map("ldm_to_diffusers_text_encoder_map.tsv"):
        v = sources["text"][name]
        if how.startswith("rows"):
            qkv.setdefault(ldm, []).append((int(how.split("[")[1].split(":")[0]), v))
        else:
            out[ldm] = v
    for ldm, parts in qkv.items():
        out[ldm] = np.concatenate([v for _, v in sorted(parts, key=lambda p: p[0])], axis=0)
    # What the single file also holds: the unused last OpenCLIP block, the CLIP head,
    # the schedule buffers.
    for k in [k for k in out if ".resblocks.22." in k]:
        out[k.replace(".resblocks.22.", ".resblocks.23.")] = rng.standard_normal(
            out[k].shape).astype(np.float32)
    width = TEXT_TINY["hidden_size"]
    out["cond_stage_model.model.text_projection"] = rng.standard_normal((width, width)).astype(
        np.float32)
    out["cond_stage_model.model.logit_scale"] = np.float32(4.6)
    for buf in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "posterior_variance", "posterior_mean_coef1"):
        out[buf] = rng.uniform(0, 1, 1000).astype(np.float32)
    return out
