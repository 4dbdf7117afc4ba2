"""End-to-end parity of `SeeSRPipeline.upscale` with a PyTorch reference pipeline
(tests/seesr_pipeline_reference.py) on one tiny random SeeSR release converted by
`jaxsr convert`, with the same injected noises on both sides.

The release: the tiny SD2 of tests/sd2_fixtures (VAE, text encoder, tokenizer),
SeeSR's RCA UNet/ControlNet (tests/seesr_reference.py), and the 20-class RAM of
tests/test_dape.py with a DAPE LoRA, plus a 20-line tag list whose thresholds make
some but not all tags fire on the test image.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from jaxsr.cli import main as cli_main
from jaxsr.pipelines.seesr import Noises, SeeSROptions, SeeSRPipeline
from tests import seesr_pipeline_reference as ref
from tests import seesr_reference as rca
from tests.parity import nchw_to_nhwc, psnr_uint8
from tests.ram_reference import (
    CLASSES,
    IMG,
    WIDTH,
    apply_lora_explicitly,
    build_reference,
    lora_dict,
    ram_state,
)
from tests.sd2_fixtures import build_tiny_sd2, save_diffusers_folder
from tests.test_clip_text import write_tiny_tokenizer
from tests.test_convert_seesr_cli import save_seesr_module
from tests.test_unet import TINY, randomize_

TEXT_WIDTH = 32            # tests/sd2_fixtures' text encoder
# Letters only: the tiny tokenizer's vocabulary.
TAGS = ["cat", "dog", "tree", "house", "car", "boat", "bird", "sky", "road", "river", "flower",
        "grass", "chair", "table", "lamp", "book", "cloud", "field", "horse", "bridge"]
# 19×26 LR: odd height, so the //8 crop and the final resize run when not enlarged.
LR = np.random.default_rng(7).integers(0, 256, (19, 26, 3), dtype=np.uint8)
MARGIN = 0.05              # probability margin of every threshold from the LR's probability


def _thresholds(probs):
    """Even classes fire (threshold below p), odd ones do not (threshold above p)."""
    th = np.where(np.arange(CLASSES) % 2 == 0, probs - MARGIN, probs + MARGIN)
    return np.clip(th, 0.0, 1.0)


@dataclasses.dataclass
class Release:
    weights: object          # the converted folder
    torch_modules: dict      # the reference's keyword arguments for the same release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("seesr_parity")
    sd_unet, vae, text = build_tiny_sd2()
    save_diffusers_folder(root / "sd2", sd_unet, vae, text)
    write_tiny_tokenizer(root / "sd2" / "tokenizer", sd2_special_tokens=True)
    # The real SD2-base scheduler config (clip_sample false): the fixtures' shorter one
    # leaves clip_sample to DDPMScheduler's default, True, which SeeSR never runs with.
    (root / "sd2" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(ref.SD2_BASE_SCHEDULER_CONFIG))
    torch.manual_seed(0)
    unet = rca.seesr_unet({**TINY, "cross_attention_dim": TEXT_WIDTH}, WIDTH).eval()
    randomize_(unet, seed=11)
    cn = rca.seesr_controlnet_from_unet(unet, WIDTH).eval()
    randomize_(cn, seed=12)          # non-zero zero-convs, so the residuals matter
    save_seesr_module(unet, root / "seesr" / "unet", WIDTH)
    save_seesr_module(cn, root / "seesr" / "controlnet", WIDTH)

    ram = build_reference(seed=5)
    lora = lora_dict(ram, seed=6)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in ram_state(ram).items()}},
               root / "ram_swin_large_14m.pth")
    torch.save({k: torch.from_numpy(v) for k, v in lora.items()}, root / "DAPE.pth")
    apply_lora_explicitly(ram, lora)

    # Thresholds from the reference's own tag probabilities on the test LR.
    logits = ref.dape_outputs(Image.fromarray(LR), ram, IMG)[1]
    thresholds = _thresholds(torch.sigmoid(logits)[0].numpy().astype(np.float64))
    (root / "tags.txt").write_text("\n".join(TAGS))
    (root / "thresholds.txt").write_text("\n".join(f"{t:.6f}" for t in thresholds))

    argv = ["convert", "--sd", str(root / "sd2"), "--seesr", str(root / "seesr"),
            "--ram", str(root / "ram_swin_large_14m.pth"), "--dape", str(root / "DAPE.pth"),
            "--tags", str(root / "tags.txt"), "--thresholds", str(root / "thresholds.txt"),
            "--output", str(root / "weights")]
    assert cli_main(argv) == 0
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "sd2" / "tokenizer"))
    modules = dict(tokenizer=tokenizer, text_encoder=text, vae=vae, unet=unet, controlnet=cn,
                   ram=ram, ram_size=IMG, tag_list=TAGS,
                   thresholds=np.loadtxt(root / "thresholds.txt", dtype=np.float32))
    return Release(root / "weights", modules)


@pytest.fixture(scope="module")
def pipe(release):
    return SeeSRPipeline.from_pretrained(release.weights, dtype="float32", vae_dtype="float32",
                                         devices=jax.devices()[:1])


def _noises(latent_hw, steps, seed):
    rng = np.random.default_rng(seed)
    draw = lambda: rng.standard_normal((1, 4) + latent_hw).astype(np.float32)   # NCHW
    return draw(), draw(), [draw() for _ in range(steps)]


# Case a: untiled, enlargement path (min side 19 < 128//4), AdaIN.
# Case b: latent tiling (13×9 latent > 8²: tiles of 8, overlap 4, at x 0, 4, 5 and y 0, 1),
#         no enlargement (32//4 = 8), //8 crop of the 76-px height and the final resize
#         back, wavelet fix, a user prompt, another guidance scale.
CASES = {
    "untiled_enlarged_adain": SeeSROptions(steps=3, process_size=128, color_fix="adain"),
    "tiled_wavelet": SeeSROptions(steps=4, process_size=32, color_fix="wavelet",
                                  latent_tile=8, latent_tile_overlap=4, prompt="sharp",
                                  guidance_scale=4.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_torch_reference(release, pipe, name):
    opts = CASES[name]
    ref_opts = ref.RefOptions(
        steps=opts.steps, guidance_scale=opts.guidance_scale,
        conditioning_scale=opts.conditioning_scale, start_timestep=opts.start_timestep,
        prompt=opts.prompt,
        added_prompt=opts.added_prompt, negative_prompt=opts.negative_prompt,
        latent_tile=opts.latent_tile, latent_tile_overlap=opts.latent_tile_overlap,
        color_fix=opts.color_fix, upscale=opts.upscale, process_size=opts.process_size)
    control = ref.resize_chain(Image.fromarray(LR), opts.upscale, opts.process_size)
    assert pipe.bucket_key(LR, opts) == (control.size[1], control.size[0])
    latent_hw = (control.size[1] // 8, control.size[0] // 8)
    post, init, steps = _noises(latent_hw, opts.steps, seed=len(name))

    want, trace = ref.reference_seesr(
        LR, **release.torch_modules, scheduler=ref.sd2_ddpm_scheduler(),
        noises=ref.RefNoises(torch.from_numpy(post), torch.from_numpy(init),
                             [torch.from_numpy(s) for s in steps]),
        options=ref_opts)
    noises = Noises(posterior=nchw_to_nhwc(post), initial=nchw_to_nhwc(init),
                    steps=np.stack([nchw_to_nhwc(s) for s in steps]))
    got, prompts = pipe.upscale([LR], options=opts, noises=noises, return_prompts=True)

    tags = trace["tags"].split(", ")
    assert 0 < len(tags) < CLASSES, tags            # some but not all tags fire
    assert tags == TAGS[::2]                        # exactly the classes set to fire
    assert prompts == [trace["prompt"]]
    assert want.shape == (LR.shape[0] * 4, LR.shape[1] * 4, 3) == got[0].shape
    value = psnr_uint8(got[0], want)
    diff = np.abs(got[0].astype(int) - want)
    print(f"\n{name}: latent {latent_hw}, timesteps {trace['timesteps']}, "
          f"prompt {trace['prompt']!r}: PSNR vs torch reference {value:.2f} dB "
          f"({np.count_nonzero(diff)} of {diff.size} values differ, by at most {diff.max()})")
    assert value >= 40.0
