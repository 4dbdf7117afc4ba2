"""SeeSR's released unet/ and controlnet/ folders convert: full-size parameter counts
and key sets (from the checkpoint listings, no weights needed), and a tiny random
SeeSR folder saved by diffusers through `load_seesr`, strictness included."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jaxsr.convert.seesr import load_seesr
from jaxsr.convert.tree import ConversionError, flax_to_torch, torch_to_flax
from jaxsr.models import controlnet as cn_lib
from jaxsr.models import unet as unet_lib
from tests import seesr_reference as ref_lib
from tests.keylists import read_listing
from tests.parity import torch_state
from tests.test_unet import TINY, randomize_

SEESR_UNET = unet_lib.UNetConfig(use_image_cross_attention=True)
IMG_DIM = 12
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# (a) + (b) --------------------------------------------------------------------
def _listing_state(name):
    """The listing as a state dict of zero-strided arrays: full shapes, no memory."""
    zero = np.zeros((), np.float32)
    return {k: np.broadcast_to(zero, s) for k, s in read_listing(name).items()}


@pytest.mark.parametrize("listing, shapes, expected", [
    ("seesr_unet.tsv", lambda: unet_lib.param_shapes(SEESR_UNET), 1_126_760_324),
    ("seesr_controlnet.tsv", lambda: cn_lib.param_shapes(cn_lib.SEESR_CONTROLNET), 489_031_440),
], ids=["unet", "controlnet"])
def test_full_size_counts_and_released_key_sets(listing, shapes, expected):
    """Parameter count as measured on the original modules, and every listed tensor
    lands on a Flax leaf of the right (transformed) shape with every leaf filled
    (the loaders are `torch_to_flax` onto `param_shapes`, strict both ways)."""
    target = shapes()
    assert _count(target) == expected
    state = _listing_state(listing)
    params = traverse_util.flatten_dict(torch_to_flax(state, target))
    assert len(params) == len(state)
    assert sum(int(np.prod(s.shape)) for s in state.values()) == expected
    # the converter really checks: one RCA tensor less is reported by name
    key = next(k for k in state if ".image_attentions." in k)
    del state[key]
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        torch_to_flax(state, target)


def test_full_size_sd2_unet_count():
    assert _count(unet_lib.param_shapes(unet_lib.SD2_BASE_UNET)) == 865_910_724


def test_seesr_unet_listing_is_sd2_plus_rca():
    """The listing facts the loader relies on: RCA-free part = SD2's keys, and the
    ControlNet's encoder keys equal the UNet's."""
    unet, sd2 = read_listing("seesr_unet.tsv"), read_listing("sd2_base_unet_diffusers.tsv")
    assert {k: s for k, s in unet.items() if ".image_attentions." not in k} == sd2
    cn = read_listing("seesr_controlnet.tsv")
    encoder = {k: s for k, s in cn.items() if k.startswith(
        ("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))}
    assert encoder == {k: s for k, s in unet.items() if k in encoder}


# (c) ---------------------------------------------------------------------------
def _save(model, folder):
    """diffusers' own save, then the config line SeeSR's modules write."""
    model.save_pretrained(folder, safe_serialization=True)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.update(use_image_cross_attention=True, image_cross_attention_dim=IMG_DIM)
    config_file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def seesr_folder(tmp_path_factory):
    torch.manual_seed(0)
    unet = ref_lib.seesr_unet(TINY, IMG_DIM).eval()
    randomize_(unet, seed=1)
    cn = ref_lib.seesr_controlnet_from_unet(unet, IMG_DIM).eval()
    randomize_(cn, seed=2)
    root = tmp_path_factory.mktemp("seesr") / "seesr"
    _save(unet, root / "unet")
    _save(cn, root / "controlnet")
    return root, torch_state(unet), torch_state(cn)


def _assert_same(params, state):
    """Converted params, mapped back to torch names and layouts, equal the saved tensors."""
    back = flax_to_torch(params)
    assert back.keys() == state.keys()
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_load_seesr_folder(seesr_folder):
    root, unet_state, cn_state = seesr_folder
    assert any(".image_attentions." in k for k in load_file(root / "controlnet" / WEIGHTS))
    unet_cfg, unet_params, cn_cfg, cn_params = load_seesr(root)
    assert unet_cfg.use_image_cross_attention and cn_cfg.use_image_cross_attention
    assert cn_cfg.image_cross_attention_dim == IMG_DIM
    _assert_same(unet_params, unet_state)
    _assert_same(cn_params, cn_state)


def test_load_seesr_reads_pickled_weights(seesr_folder, tmp_path):
    root, unet_state, cn_state = seesr_folder
    copy = shutil.copytree(root, tmp_path / "seesr")
    (copy / "controlnet" / WEIGHTS).unlink()
    torch.save({k: torch.from_numpy(v) for k, v in cn_state.items()},
               copy / "controlnet" / "diffusion_pytorch_model.bin")
    _, _, _, cn_params = load_seesr(copy)
    _assert_same(cn_params, cn_state)


# One removed, one added and one reshaped tensor per module; the error names each
# in its own section (torch_to_flax reports every offender, so each edit alone fails too).
_EDITS = {
    "unet": [
        ("down_blocks.1.image_attentions.0.transformer_blocks.0.attn2.to_k.weight", "missing"),
        ("mid_block.image_attentions.1.proj_in.weight", "unexpected"),
        ("up_blocks.2.image_attentions.2.proj_out.weight", "shape mismatches"),
    ],
    "controlnet": [
        ("mid_block.image_attentions.0.norm.bias", "missing"),
        ("controlnet_down_blocks.12.weight", "unexpected"),
        ("controlnet_down_blocks.3.weight", "shape mismatches"),
    ],
}


def _apply_edits(state, edits):
    (removed, _), (added, _), (reshaped, _) = edits
    del state[removed]
    state[added] = np.zeros((8, 8), np.float32)
    state[reshaped] = np.ascontiguousarray(state[reshaped].reshape(-1)[:-1])


@pytest.mark.parametrize("module", ["unet", "controlnet"])
def test_load_seesr_is_strict(seesr_folder, tmp_path, module):
    copy = shutil.copytree(seesr_folder[0], tmp_path / "seesr")
    path = copy / module / WEIGHTS
    state = load_file(path)
    _apply_edits(state, _EDITS[module])
    save_file(state, path)
    with pytest.raises(ConversionError) as info:
        load_seesr(copy)
    message = str(info.value)
    assert str(path) in message
    sections = _sections(message)
    for key, kind in _EDITS[module]:
        assert any(key in line for line in sections[kind]), (key, kind, message)


def _sections(message: str) -> dict[str, list[str]]:
    """ConversionError text -> {section kind: its entry lines}."""
    out, current = {}, None
    for line in message.splitlines()[1:]:
        if line.startswith("    "):
            out[current].append(line.strip())
        else:
            current = next(k for k in ("missing", "unexpected", "shape mismatches")
                           if line.strip().startswith(k))
            out[current] = []
    return out


def test_load_seesr_config_without_rca_flag(seesr_folder, tmp_path):
    copy = shutil.copytree(seesr_folder[0], tmp_path / "seesr")
    config_file = copy / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    del config["use_image_cross_attention"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_image_cross_attention") as info:
        load_seesr(copy)
    assert str(config_file) in str(info.value)


def test_load_seesr_missing_folder(seesr_folder, tmp_path):
    copy = shutil.copytree(seesr_folder[0], tmp_path / "seesr")
    shutil.rmtree(copy / "unet")
    with pytest.raises(FileNotFoundError, match="unet"):
        load_seesr(copy)


def test_load_seesr_flag_without_rca_weights(seesr_folder, tmp_path):
    copy = shutil.copytree(seesr_folder[0], tmp_path / "seesr")
    path = copy / "controlnet" / WEIGHTS
    save_file({k: v for k, v in load_file(path).items() if ".image_attentions." not in k}, path)
    with pytest.raises(ValueError, match="no \\*\\.image_attentions") as info:
        load_seesr(copy)
    assert str(copy / "controlnet" / "config.json") in str(info.value)


def test_load_seesr_refuses_mismatched_encoders(seesr_folder, tmp_path):
    copy = shutil.copytree(seesr_folder[0], tmp_path / "seesr")
    config_file = copy / "controlnet" / "config.json"
    config = json.loads(config_file.read_text())
    config["layers_per_block"] = 1
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="disagree on layers_per_block"):
        load_seesr(copy)
