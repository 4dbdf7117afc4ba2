"""Full-size SeeSR and CoSeR releases with random values, in the released files' layouts
and key names, written one tensor at a time (a few hundred MB of memory whatever
the release's size).

    write_seesr_release(ROOT)  ROOT/sd2/{unet,vae,text_encoder,tokenizer,scheduler}/
                               ROOT/seesr/{unet,controlnet}/  (diffusers folders, RCA flag)
                               ROOT/ram_swin_large_14m.pth, ROOT/DAPE.pth
    write_coser_release(ROOT)  ROOT/sd21.safetensors, ROOT/qformer.safetensors,
                               ROOT/coser.safetensors, ROOT/tokenizer/

Keys and shapes come from the listings in tests/data/keys (the released checkpoints'
state dicts) and, for CoSeR's SRResNet and ViT-H vision tower, which have no listing,
from the PyTorch references built on the meta device. The CoSeR files are
safetensors rather than Lightning pickles so that they too stream to disk (the
converter reads both; the networks are the same). The tokenizer is a tiny BPE
vocabulary: its ids are valid rows of the real 49,408-row embedding.

Used by benchmarks/sr_memory.py and the slow memory test; run as a script to write one:
    python -m tests.full_release seesr|coser ROOT
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from tests.keylists import read_listing

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64",
              np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


# ---------------------------------------------------------------- streaming writers


def write_safetensors_stream(path: Path, entries: list[tuple[str, tuple, np.dtype]],
                             produce: Callable[[str, tuple, np.dtype], np.ndarray],
                             metadata: dict | None = None) -> None:
    """A .safetensors file whose tensors are made one at a time by `produce(name, shape,
    dtype)`: the header (offsets from the shapes) is written first, then each tensor."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype in entries:
            array = np.asarray(produce(name, shape, dtype), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced {array.shape}, header says {shape}")
            f.write(np.ascontiguousarray(array).tobytes())


class RandomTensors:
    """Deterministic random values per key: N(0, 0.02²) floats (unit scale for norm
    weights, so activations stay finite), and the integer buffers the models carry."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, name: str, shape: tuple, dtype) -> np.ndarray:
        if np.dtype(dtype) == np.int64:
            return np.broadcast_to(np.arange(shape[-1], dtype=np.int64), shape).copy()
        rng = np.random.default_rng([self.seed, _crc(name)])
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(0.02)
        if len(shape) == 1 and _is_norm_weight(name):
            values += np.float32(1.0)
        return values


def _crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def _is_norm_weight(name: str) -> bool:
    parts = name.split(".")
    return (len(parts) > 1 and parts[-1] == "weight"
            and any(t in parts[-2].lower() for t in ("norm", "ln_")))


def _entries(shapes: dict[str, tuple], int_keys: Iterable[str] = ()) -> list:
    ints = set(int_keys)
    return [(k, tuple(s), np.int64 if k in ints else np.float32) for k, s in shapes.items()]


def _int_buffers(shapes: dict[str, tuple]) -> list[str]:
    return [k for k in shapes if k.endswith(("position_ids", "relative_position_index"))]


def _save_pickle(path: Path, state: dict, wrap: str | None = None) -> None:
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    torch.save({wrap: tensors} if wrap else tensors, path)


# -------------------------------------------------------------------------------- SeeSR


def _write_diffusers_module(folder: Path, config: dict, listing: str, weights_name: str,
                            produce) -> int:
    shapes = read_listing(listing)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors_stream(folder / weights_name, _entries(shapes, _int_buffers(shapes)),
                             produce, metadata={"format": "pt"})
    return sum(math.prod(s) for s in shapes.values())


def write_seesr_release(root, seed: int = 0) -> dict[str, int]:
    """SD2-base + SeeSR + RAM + DAPE at the released sizes under root; returns the
    number of values written per file group."""
    from jaxsr.convert.sd2 import SD2_SCHEDULER_CONFIG
    from jaxsr.models.clip_text import SD2_TEXT_ENCODER
    from jaxsr.models.controlnet import SEESR_CONTROLNET
    from jaxsr.models.unet import UNetConfig
    from jaxsr.models.vae import SD2_VAE
    from tests.test_clip_text import write_tiny_tokenizer

    root = Path(root)
    produce = RandomTensors(seed)
    counts = {}
    sd2 = root / "sd2"
    counts["sd2/unet"] = _write_diffusers_module(
        sd2 / "unet", UNetConfig().to_diffusers_config(), "sd2_base_unet_diffusers.tsv",
        "diffusion_pytorch_model.safetensors", produce)
    counts["sd2/vae"] = _write_diffusers_module(
        sd2 / "vae", SD2_VAE.to_diffusers_config(), "sd2_base_vae_diffusers.tsv",
        "diffusion_pytorch_model.safetensors", produce)
    counts["sd2/text_encoder"] = _write_diffusers_module(
        sd2 / "text_encoder", SD2_TEXT_ENCODER.to_hf_config(),
        "sd2_base_text_encoder_transformers.tsv", "model.safetensors", produce)
    write_tiny_tokenizer(sd2 / "tokenizer", sd2_special_tokens=True)
    (sd2 / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    (sd2 / "scheduler").mkdir(exist_ok=True)
    (sd2 / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", **SD2_SCHEDULER_CONFIG}))

    seesr_unet = {**UNetConfig(use_image_cross_attention=True,
                               image_cross_attention_dim=512).to_diffusers_config(),
                  "use_image_cross_attention": True, "image_cross_attention_dim": 512}
    counts["seesr/unet"] = _write_diffusers_module(
        root / "seesr" / "unet", seesr_unet, "seesr_unet.tsv",
        "diffusion_pytorch_model.safetensors", produce)
    seesr_cn = {**SEESR_CONTROLNET.to_diffusers_config(), "use_image_cross_attention": True,
                "image_cross_attention_dim": 512}
    counts["seesr/controlnet"] = _write_diffusers_module(
        root / "seesr" / "controlnet", seesr_cn, "seesr_controlnet.tsv",
        "diffusion_pytorch_model.safetensors", produce)

    ram_shapes = read_listing("ram_swin_large_14m.tsv")
    ints = set(_int_buffers(ram_shapes))
    ram = {k: produce(k, shape, np.int64 if k in ints else np.float32)
           for k, shape in ram_shapes.items()}
    for key in ram_shapes:                 # one tensor under two names, as released
        twin = key.replace("tagging_head.", "tag_encoder.", 1)
        if key.startswith("tagging_head.") and twin in ram:
            ram[twin] = ram[key]
    ram["text_decoder.cls.predictions.decoder.weight"] = \
        ram["text_decoder.bert.embeddings.word_embeddings.weight"]
    _save_pickle(root / "ram_swin_large_14m.pth", ram, wrap="model")
    counts["ram"] = sum(v.size for v in ram.values())
    del ram
    lora = {k: produce(k, s, np.float32) for k, s in read_listing("dape_lora.tsv").items()}
    _save_pickle(root / "DAPE.pth", lora)
    counts["dape"] = sum(v.size for v in lora.values())
    return counts


# -------------------------------------------------------------------------------- CoSeR


def coser_shapes() -> dict[str, tuple]:
    """Every tensor of CoSeR's stage-2 checkpoint: the AiA UNet, ControlNet and Q-Former
    listings, the SRResNet and ViT-H vision tower from the references (meta device),
    and SD 2.1's VAE, text tower and schedule buffers."""
    import torch

    from jaxsr.convert.coser_cognitive import PRE_SR_PREFIX, VISUAL_PREFIX
    from jaxsr.convert.coser_weights import RELEASED
    from tests.coser_cognitive_reference import TorchMSRResNet, TorchVisionTower

    shapes = {}
    for name in ("coser_unet.tsv", "coser_cn.tsv", "coser_qformer.tsv"):
        shapes.update(read_listing(name))
    with torch.device("meta"):
        sr = TorchMSRResNet(RELEASED.cognitive.srresnet)
        tower = TorchVisionTower(RELEASED.cognitive.vision)
    shapes.update({PRE_SR_PREFIX + k: tuple(v.shape) for k, v in sr.state_dict().items()})
    shapes.update({VISUAL_PREFIX + k: tuple(v.shape) for k, v in tower.state_dict().items()})
    shapes.update({k: s for k, s in read_listing("sd21_ldm_single_file.tsv").items()
                   if not k.startswith("model.diffusion_model.")})
    return shapes


def write_coser_release(root, seed: int = 0) -> dict[str, int]:
    """sd21 (SD 2.1 single file), qformer (stage 1: OpenCLIP text + vision, SRResNet,
    Q-Former) and coser (stage 2: everything) under root, plus a tiny tokenizer."""
    from jaxsr.convert.coser_cognitive import PRE_SR_PREFIX, QFORMER_PREFIX
    from jaxsr.convert.ldm import TEXT_PREFIX
    from tests.test_clip_text import write_tiny_tokenizer

    root = Path(root)
    counts = {}
    sd = read_listing("sd21_ldm_single_file.tsv")
    coser = coser_shapes()
    stage1 = {k: s for k, s in coser.items()
              if k.startswith((TEXT_PREFIX, PRE_SR_PREFIX, QFORMER_PREFIX))}
    # Each file its own values, as the released files' shared parts differ.
    for name, shapes, file_seed in (("sd21", sd, seed), ("qformer", stage1, seed + 1),
                                    ("coser", coser, seed + 2)):
        write_safetensors_stream(root / f"{name}.safetensors",
                                 _entries(shapes, _int_buffers(shapes)),
                                 RandomTensors(file_seed))
        counts[name] = sum(math.prod(s) for s in shapes.values())
    write_tiny_tokenizer(root / "tokenizer", sd2_special_tokens=True)
    return counts


if __name__ == "__main__":
    which, target = sys.argv[1], Path(sys.argv[2])
    writer = {"seesr": write_seesr_release, "coser": write_coser_release}[which]
    print(json.dumps(writer(target), indent=2))
