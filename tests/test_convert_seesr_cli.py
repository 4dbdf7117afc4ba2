"""`jaxsr convert --sd --seesr --ram --dape` on a tiny release with the real key names:
every part converts into one folder that loads back exactly; a missing, extra or
misshaped tensor in any file fails with its name."""

import json

import numpy as np
import pytest
import torch
from flax import traverse_util

from jaxsr.cli import main as cli_main
from jaxsr.convert.ram import load_ram
from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.safetensors_io import write_safetensors
from jaxsr.convert.seesr import load_seesr
from jaxsr.convert.seesr_weights import load_seesr_folder
from jaxsr.models.tags import load_tag_list, load_thresholds
from tests import seesr_reference as ref_lib
from tests.sd2_fixtures import build_tiny_sd2, save_diffusers_folder
from tests.test_clip_text import write_tiny_tokenizer
from tests.test_ram_convert import LORA_LISTING, RAM_LISTING, random_state
from tests.test_unet import TINY, randomize_

DAPE_WIDTH = 16          # the shrunk RAM's label/image-embedding width (512 -> 16)
TEXT_WIDTH = 32          # tests/sd2_fixtures' text encoder


def save_seesr_module(model, folder, dape_width=DAPE_WIDTH):
    """A diffusers folder as SeeSR releases it: the RCA flag and width in config.json."""
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(use_image_cross_attention=True, image_cross_attention_dim=dape_width)
    (folder / "config.json").write_text(json.dumps(config))


def _torch_dict(state):
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def write_tiny_release(root):
    """A tiny SeeSR release with the real key names under `root`: sd2/ (diffusers
    folder with a tiny tokenizer), seesr/{unet,controlnet}/, ram_swin_large_14m.pth and DAPE.pth."""
    save_diffusers_folder(root / "sd2", *build_tiny_sd2())
    write_tiny_tokenizer(root / "sd2" / "tokenizer", sd2_special_tokens=True)
    torch.manual_seed(0)
    unet = ref_lib.seesr_unet({**TINY, "cross_attention_dim": TEXT_WIDTH}, DAPE_WIDTH).eval()
    randomize_(unet, seed=1)
    cn = ref_lib.seesr_controlnet_from_unet(unet, DAPE_WIDTH).eval()
    randomize_(cn, seed=2)
    save_seesr_module(unet, root / "seesr" / "unet")
    save_seesr_module(cn, root / "seesr" / "controlnet")
    rng = np.random.default_rng(0)
    ram = random_state(RAM_LISTING, rng)
    for k in list(ram):          # tied in the released file
        if k.startswith("tagging_head."):
            ram[k.replace("tagging_head.", "tag_encoder.")] = ram[k]
    torch.save({"model": _torch_dict(ram)}, root / "ram_swin_large_14m.pth")
    torch.save(_torch_dict(random_state(LORA_LISTING, rng)), root / "DAPE.pth")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("release"))


def _convert(release, out, **replace):
    paths = {"sd": release / "sd2", "seesr": release / "seesr",
             "ram": release / "ram_swin_large_14m.pth", "dape": release / "DAPE.pth", **replace}
    argv = ["convert", "--output", str(out)]
    for flag, path in paths.items():
        argv += [f"--{flag}", str(path)]
    return cli_main(argv)


def _same(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_seesr_release_converts_into_one_folder(release, tmp_path, capsys):
    out = tmp_path / "weights"
    assert _convert(release, out) == 0
    printed = capsys.readouterr().out
    for name in ("unet", "controlnet", "vae", "text_encoder", "dape"):
        assert name in printed
    assert "shipped with jaxsr" in printed        # no tag files beside the RAM checkpoint
    w = load_seesr_folder(out)
    unet_cfg, unet, cn_cfg, cn = load_seesr(release / "seesr")
    _same(w.unet[1], unet)
    _same(w.controlnet[1], cn)
    assert w.unet[0] == unet_cfg and w.controlnet[0] == cn_cfg
    ram = read_state_dict(release / "ram_swin_large_14m.pth")
    dape_cfg, dape = load_ram(ram, read_state_dict(release / "DAPE.pth"))
    assert w.dape[0] == dape_cfg and dape_cfg.lora_rank == 0      # merged for inference
    _same(w.dape[1], dape)
    assert w.tags == load_tag_list() and len(w.tags) == 4585
    np.testing.assert_array_equal(w.thresholds, load_thresholds())


def test_tag_files_beside_the_ram_checkpoint_are_used(release, tmp_path):
    tags = [f"tag{i}" for i in range(4585)]
    side = tmp_path / "side"
    side.mkdir()
    ram = side / "ram_swin_large_14m.pth"
    ram.write_bytes((release / "ram_swin_large_14m.pth").read_bytes())
    (side / "ram_tag_list.txt").write_text("\n".join(tags))
    (side / "ram_tag_list_threshold.txt").write_text("\n".join(["0.7"] * 4585))
    assert _convert(release, tmp_path / "w", ram=ram) == 0
    w = load_seesr_folder(tmp_path / "w")
    assert w.tags == tags and np.all(w.thresholds == np.float32(0.7))


def _edit_safetensors(src, dst, edit):
    state = {k: np.array(v) for k, v in read_state_dict(src).items()}
    edit(state)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst, state)


@pytest.mark.parametrize("edit, key", [
    (lambda s: s.pop("down_blocks.1.image_attentions.0.proj_in.weight"),
     "down_blocks.1.image_attentions.0.proj_in.weight"),
    (lambda s: s.update({"mid_block.image_attentions.1.norm.weight": np.ones(64, np.float32)}),
     "mid_block.image_attentions.1.norm.weight"),
    (lambda s: s.update({"controlnet_down_blocks.3.bias": np.ones(7, np.float32)}),
     "controlnet_down_blocks.3.bias"),
])
def test_broken_controlnet_file_is_named(release, tmp_path, capsys, edit, key):
    broken = tmp_path / "seesr"
    (broken / "unet").mkdir(parents=True)
    for f in (release / "seesr" / "unet").iterdir():
        (broken / "unet" / f.name).write_bytes(f.read_bytes())
    cfg = release / "seesr" / "controlnet" / "config.json"
    (broken / "controlnet").mkdir()
    (broken / "controlnet" / "config.json").write_text(cfg.read_text())
    _edit_safetensors(release / "seesr" / "controlnet" / "diffusion_pytorch_model.safetensors",
                      broken / "controlnet" / "diffusion_pytorch_model.safetensors", edit)
    assert _convert(release, tmp_path / "out", seesr=broken) == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("which, edit, key", [
    ("ram", lambda s: s.pop("visual_encoder.layers.1.blocks.0.norm1.weight"),
     "visual_encoder.layers.1.blocks.0.norm1.weight"),
    ("ram", lambda s: s.update({"fc.extra": torch.ones(1)}), "fc.extra"),
    ("dape", lambda s: s.update({"visual_encoder.layers.0.blocks.1.attn.qkv.lora_A":
                                 torch.ones(3, 3)}),
     "visual_encoder.layers.0.blocks.1.attn.qkv.lora_A"),
])
def test_broken_ram_or_dape_file_is_named(release, tmp_path, capsys, which, edit, key):
    name = {"ram": "ram_swin_large_14m.pth", "dape": "DAPE.pth"}[which]
    obj = torch.load(release / name, weights_only=True)
    edit(obj["model"] if which == "ram" else obj)
    torch.save(obj, tmp_path / name)
    assert _convert(release, tmp_path / "out", **{which: tmp_path / name}) == 2
    assert key in capsys.readouterr().err


def test_seesr_needs_ram(release, tmp_path, capsys):
    argv = ["convert", "--sd", str(release / "sd2"), "--seesr", str(release / "seesr"),
            "--output", str(tmp_path / "o")]
    assert cli_main(argv) == 2
    assert "--ram" in capsys.readouterr().err


def test_unet_from_sd_takes_everything_but_rca_from_sd(release, tmp_path):
    """sd-turbo mode: SD's UNet weights plus only SeeSR's image_attentions."""
    out = tmp_path / "turbo"
    argv = ["convert", "--sd", str(release / "sd2"), "--seesr", str(release / "seesr"),
            "--ram", str(release / "ram_swin_large_14m.pth"), "--unet-from-sd",
            "--output", str(out)]
    assert cli_main(argv) == 0
    got = traverse_util.flatten_dict(load_seesr_folder(out).unet[1])
    seesr = traverse_util.flatten_dict(load_seesr(release / "seesr")[1])
    from jaxsr.convert.sd2 import load_sd2

    sd = traverse_util.flatten_dict(load_sd2(release / "sd2").unet[1])
    rca = [k for k in got if any(p.startswith("image_attentions") for p in k)]
    assert rca and got.keys() == seesr.keys()
    for k, v in got.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(seesr[k] if k in rca else sd[k]),
                                      err_msg=str(k))
    assert not all(np.array_equal(np.asarray(seesr[k]), np.asarray(sd[k]))
                   for k in sd)   # the two UNets really differ outside RCA
