"""A tiny CoSeR release with the real key names, written as the released files are:

    sd21.ckpt       SD 2.1-base single file (Lightning-free: a flat state dict under
                    "state_dict"): model.diffusion_model.*, first_stage_model.*,
                    cond_stage_model.model.* (24 text blocks, the CLIP head), schedule buffers
    qformer.ckpt    stage 1: cond_stage_model.model.* (text + visual), pre_sr_model.*,
                    global_adapter.* (+ schedule buffers)
    coser.ckpt      stage 2: everything (AiA UNet, ControlNet, VAE, OpenCLIP, SRResNet,
                    Q-Former, buffers)
    cfw.ckpt        StableSR's CFW autoencoder (+ a Lightning `loss.*` entry)
    tokenizer/      a tiny CLIP BPE tokenizer

Sizes are configs/coser.py "tiny". Each file holds its own random values for the parts
it shares with the others, so a test can tell which file a network came from.
The torch modules behind coser.ckpt are returned too (for parity checks).
"""

import diffusers
import numpy as np
import torch
import transformers

from configs import coser as coser_config
from jaxsr.convert.coser_cognitive import PRE_SR_PREFIX, VISUAL_PREFIX
from jaxsr.convert.coser_unet import CONTROLNET_PREFIX, UNET_PREFIX
from jaxsr.convert.coser_weights import CoSeRArchitecture
from tests import coser_reference as aia_ref
from tests.cfw_reference import TorchCFW
from tests.coser_cognitive_reference import (
    TorchMSRResNet,
    TorchVisionTower,
    blip2_qformer,
    blip2_to_coser,
    perturb_,
)
from tests.parity import torch_state
from tests.sd2_fixtures import single_file_state
from tests.test_clip_text import write_tiny_tokenizer
from tests.test_unet import randomize_

CONFIG = coser_config.get_config("tiny")
ARCH = CoSeRArchitecture.from_config(CONFIG)
UNET_KW = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(CONFIG.unet).items()}
TEXT_KW = dict(CONFIG.text_encoder)
VAE_KW = dict(CONFIG.vae)
BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "posterior_variance", "posterior_mean_coef1")


def _sd_modules(seed: int):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET_KW).eval()
    vae = diffusers.AutoencoderKL(**_vae_kwargs()).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_KW)).eval()
    for i, m in enumerate((unet, vae, text)):
        randomize_(m, seed=seed + i)
    return unet, vae, text


def _cognitive_modules(seed: int):
    cog = ARCH.cognitive
    sr = perturb_(TorchMSRResNet(cog.srresnet), seed, 0.01).eval()
    tower = perturb_(TorchVisionTower(cog.vision), seed + 1).eval()
    qf = perturb_(blip2_qformer(cog.qformer), seed + 2).eval()
    rng = np.random.default_rng(seed)
    query_tokens = rng.normal(size=(1, cog.qformer.num_query_tokens,
                                    cog.qformer.hidden_size)).astype(np.float32)
    state = {**{PRE_SR_PREFIX + k: v for k, v in torch_state(sr).items()},
             **{VISUAL_PREFIX + k: v for k, v in torch_state(tower).items()},
             **blip2_to_coser(torch_state(qf), cog.qformer, query_tokens, rng)}
    return state, dict(sr=sr, tower=tower, qformer=qf, query_tokens=query_tokens)


def _without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _save(path, state: dict) -> None:
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                "global_step": 1}, path)


def write_tiny_coser_release(root):
    """Write the files above under `root`; returns (paths, states, torch modules).

    states: {"sd", "qformer", "coser"}: the flat numpy state dicts written."""
    root.mkdir(parents=True, exist_ok=True)
    sd_state = single_file_state(*_sd_modules(0), seed=0)

    qf_cog, _ = _cognitive_modules(10)
    qf_text_state = {k: v for k, v in single_file_state(*_sd_modules(20), seed=1).items()
                     if k.startswith("cond_stage_model.")}
    qformer_state = {**qf_cog, **qf_text_state, **{b: sd_state[b] for b in BUFFERS}}

    torch.manual_seed(30)
    unet = aia_ref.aia_unet(UNET_KW).eval()
    cn = aia_ref.CoSeRControlNetRef(UNET_KW).eval()
    randomize_(unet, seed=31)
    randomize_(cn, seed=32)
    cog_state, cog_modules = _cognitive_modules(40)
    coser_sd = _sd_modules(50)
    sd_like = single_file_state(*coser_sd, seed=2)        # VAE + text of this file
    coser_state = {
        **aia_ref.ldm_state(torch_state(unet), UNET_PREFIX),
        **aia_ref.ldm_state(torch_state(cn), CONTROLNET_PREFIX),
        **{k: v for k, v in sd_like.items() if k.startswith(("first_stage_model.",
                                                             "cond_stage_model."))},
        **cog_state, **{b: sd_state[b] for b in BUFFERS}}

    torch.manual_seed(60)
    cfw = TorchCFW(diffusers.AutoencoderKL(**_vae_kwargs()), rrdb_blocks=1, grow=8).eval()
    randomize_(cfw, seed=61)
    cfw_state = {**cfw.ldm_state_dict(), "loss.logvar": np.zeros((), np.float32)}

    paths = {name: root / f"{name}.ckpt" for name in ("sd21", "qformer", "coser", "cfw")}
    _save(paths["sd21"], sd_state)
    _save(paths["qformer"], qformer_state)
    _save(paths["coser"], coser_state)
    _save(paths["cfw"], cfw_state)
    paths["tokenizer"] = root / "tokenizer"
    write_tiny_tokenizer(paths["tokenizer"], sd2_special_tokens=True)
    modules = dict(unet=unet, controlnet=cn, vae=coser_sd[1], text=coser_sd[2], cfw=cfw,
                   **cog_modules)
    states = {"sd": sd_state, "qformer": qformer_state, "coser": coser_state}
    return paths, states, modules


def _vae_kwargs() -> dict:
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in VAE_KW.items()}
    levels = len(kw["block_out_channels"])
    return {**kw, "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels}
