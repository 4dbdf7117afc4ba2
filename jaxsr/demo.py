"""Built-in sample data for a first run without the released weights.

`write_random_seesr(folder, config)` writes a SeeSR weights folder in exactly the
format `jaxsr convert` writes (manifest, per-module configs and params, tokenizer,
RAM tag files), with randomly initialised networks of the config's sizes; the tiny
config (configs/seesr.py "tiny") takes seconds. `sample_images()` draws a few
synthetic low-resolution test pictures (shapes, gradients, stripes and text-like
detail at different sizes) and `write_sample_images(folder)` saves them as PNGs.
This module is the one home of both: `jaxsr demo` runs `jaxsr sr` on them, and
`jaxsr app --demo` serves the weights with the pictures as the page's examples.

The outputs of random weights are of course not sharp pictures; the demo shows the
whole path (files in, tags, prompts, sampling, colour fix, files out) runs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxsr.convert.cache import save_converted
from jaxsr.convert.seesr_weights import dape_config_to_dict
from jaxsr.models import clip_text, controlnet, dape, unet, vae
from jaxsr.models.ram_head import TagHeadConfig
from jaxsr.models.swin import SwinConfig
from jaxsr.models.tags import load_tag_list, load_thresholds

SD2_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "clip_sample": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def dape_config(d) -> dape.DAPEConfig:
    """configs/seesr.py's `dape` entry -> DAPEConfig (LoRA merged: lora_rank 0)."""
    return dape.DAPEConfig(
        swin=SwinConfig(img_size=d.img_size, patch_size=d.patch_size, embed_dim=d.embed_dim,
                        depths=tuple(d.depths), num_heads=tuple(d.num_heads),
                        window_size=d.window_size),
        head=TagHeadConfig(hidden_size=d.head_width, num_hidden_layers=d.head_layers,
                           num_attention_heads=d.head_heads,
                           intermediate_size=d.head_intermediate, encoder_width=d.embed_width),
        num_classes=d.num_classes, embed_width=d.embed_width)


def model_configs(config):
    """configs/seesr.py's ConfigDict -> the networks' dataclass configs."""
    u = dict(config.unet)
    unet_cfg = unet.UNetConfig(**u)
    shared = ("block_out_channels", "attention_head_dim", "cross_attention_dim",
              "layers_per_block", "norm_num_groups", "use_linear_projection", "in_channels",
              "use_image_cross_attention", "image_cross_attention_dim")
    cn_cfg = controlnet.ControlNetConfig(
        **{k: u[k] for k in shared},
        conditioning_embedding_out_channels=tuple(
            config.controlnet.conditioning_embedding_out_channels))
    dape_cfg = dape_config(config.dape)
    return (unet_cfg, cn_cfg, vae.VAEConfig(**dict(config.vae)),
            clip_text.CLIPTextConfig(**dict(config.text_encoder)), dape_cfg)


def random_params(model, *inputs, seed: int):
    """Random params of `model`'s shapes, drawn in numpy (shapes from eval_shape: no
    compilation, so the tiny set is written in seconds). Kernels ~ N(0, 1/fan_in),
    norm scales ~ 1, everything else (biases, embeddings, tables) ~ N(0, 0.02²); no
    tensor is left at zero, so every path, ControlNet's zero convs included, does work."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return noise / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        if name == "scale":
            return 1 + np.float32(0.02) * noise
        return np.float32(0.02) * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def demo_tokenizer():
    """The tokenizer `write_tokenizer` describes, loaded (through a temporary folder):
    for programs whose shapes depend on a tokenizer but not on its vocabulary."""
    import tempfile

    from jaxsr.models.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        return load_tokenizer(tmp)          # read now, before the folder goes away


def write_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary (letters, digits, punctuation; no merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.-'":
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True,
         "tokenizer_class": "CLIPTokenizer"}))


def write_random_seesr(folder, config, *, seed: int = 0, log=print) -> Path:
    """Random SeeSR weights of `config`'s sizes, as a `jaxsr convert` folder."""
    unet_cfg, cn_cfg, vae_cfg, text_cfg, dape_cfg = model_configs(config)
    params = {
        "unet": random_params(unet.UNet2DConditionModel(unet_cfg), *unet.dummy_inputs(unet_cfg),
                      seed=seed),
        "controlnet": random_params(controlnet.ControlNetModel(cn_cfg),
                            *controlnet.dummy_inputs(cn_cfg), seed=seed + 1),
        "vae": random_params(vae.AutoencoderKL(vae_cfg), vae.dummy_image(vae_cfg), seed=seed + 2),
        "text_encoder": random_params(clip_text.CLIPTextModel(text_cfg),
                              np.zeros((1, 77), np.int32), seed=seed + 3),
        "dape": random_params(dape.DAPE(dape_cfg), np.zeros(
            (1, dape_cfg.swin.img_size, dape_cfg.swin.img_size, 3), np.float32), seed=seed + 4),
    }
    modules = {"unet": (unet_cfg.to_diffusers_config(), params["unet"]),
               "controlnet": (cn_cfg.to_diffusers_config(), params["controlnet"]),
               "vae": (vae_cfg.to_diffusers_config(), params["vae"]),
               "text_encoder": (text_cfg.to_hf_config(), params["text_encoder"]),
               "dape": (dape_config_to_dict(dape_cfg), params["dape"])}
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "tokenizer")
        out = save_converted(folder, modules, sources=[], dtype="float32",
                             tokenizer_dir=Path(tmp) / "tokenizer",
                             extra={"model": "seesr", "scheduler_config": SD2_SCHEDULER_CONFIG,
                                    "random_init": True})
    (out / "ram").mkdir(exist_ok=True)
    (out / "ram" / "ram_tag_list.txt").write_text("\n".join(load_tag_list()))
    # Random logits would rarely pass RAM's thresholds; 0.5 makes about half the
    # classes fire, so the demo's prompts carry tags.
    n = len(load_thresholds())
    (out / "ram" / "ram_tag_list_threshold.txt").write_text("\n".join(["0.5"] * n))
    log(f"wrote random {config.get('variant', '')} SeeSR weights to {out}")
    return out


def sample_images(seed: int = 0) -> dict[str, np.ndarray]:
    """A few synthetic LR pictures (uint8 RGB) of different sizes and content."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (h, w) in {"shapes": (48, 64), "stripes": (40, 40), "portrait": (56, 36)}.items():
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([x / w, y / h, 1 - x / w], -1) * 200 + 30
        if name == "shapes":
            for _ in range(5):
                cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
                img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        elif name == "stripes":
            img *= (0.6 + 0.4 * (np.sin(x * 0.8 + y * 0.3) > 0))[..., None]
        else:
            img[(np.abs(x - w / 2) < w / 4) & (y > h / 3)] = (180, 120, 90)
        img += rng.normal(0, 6, img.shape)            # sensor-like noise
        out[name] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_sample_images(folder, seed: int = 0) -> list[Path]:
    """`sample_images(seed)` saved as folder/<name>.png; returns the paths."""
    from jaxsr.data.image_io import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in sample_images(seed).items():
        save_image(folder / f"{name}.png", image)
        paths.append(folder / f"{name}.png")
    return paths
