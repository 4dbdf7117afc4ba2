"""Users' mistakes with checkpoints give one clear error naming the file or key."""

import json
import pickle

import numpy as np
import pytest
import torch

from jaxsr.convert.ldm import split_single_file
from jaxsr.convert.readers import CheckpointReadError, read_state_dict
from jaxsr.convert.safetensors_io import write_safetensors
from jaxsr.convert.sd2 import load_sd2
from jaxsr.convert.tree import ConversionError
from jaxsr.models.unet import UNetConfig, load_unet
from tests.test_unet import TINY


@pytest.fixture(scope="module")
def unet_state():
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**TINY)
    return UNetConfig.from_diffusers_config(dict(model.config)), {
        k: v.numpy() for k, v in model.state_dict().items()}


def test_missing_key_is_named(unet_state):
    cfg, state = unet_state
    state = dict(state)
    del state["mid_block.attentions.0.proj_in.weight"]
    with pytest.raises(ConversionError) as e:
        load_unet(state, cfg)
    assert e.value.missing == ["mid_block.attentions.0.proj_in.weight"]
    assert "mid_block.attentions.0.proj_in.weight" in str(e.value)
    assert not e.value.unexpected and not e.value.mismatched


def test_extra_key_is_named(unet_state):
    cfg, state = unet_state
    state = {**state, "down_blocks.0.attentions.0.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError) as e:
        load_unet(state, cfg)
    assert e.value.unexpected == ["down_blocks.0.attentions.0.extra.weight"]


def test_wrong_shape_is_named(unet_state):
    cfg, state = unet_state
    state = {**state, "conv_in.weight": np.zeros((16, 4, 5, 5), np.float32)}
    with pytest.raises(ConversionError) as e:
        load_unet(state, cfg)
    assert e.value.mismatched == ["conv_in.weight: [16, 4, 5, 5] vs [16, 4, 3, 3]"]


def test_all_problems_reported_at_once(unet_state):
    cfg, state = unet_state
    state = dict(state)
    del state["conv_out.bias"]
    state["stray"] = np.zeros(1, np.float32)
    state["conv_in.bias"] = np.zeros(17, np.float32)
    with pytest.raises(ConversionError) as e:
        load_unet(state, cfg)
    msg = str(e.value)
    assert "conv_out.bias" in msg and "stray" in msg and "conv_in.bias" in msg


class _Payload:
    """Would create a file if unpickled without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    victim = tmp_path / "pwned.txt"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload(str(victim))}, f)
    with pytest.raises(CheckpointReadError, match="evil.bin: refused"):
        read_state_dict(path)
    assert not victim.exists()


def test_plain_tensor_pickle_loads_with_weights_only(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"model": {"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.bfloat16)},
                "epoch": 3}, path)
    state = read_state_dict(path)
    assert set(state) == {"a", "b"}
    np.testing.assert_array_equal(state["a"], [0, 1, 2])
    assert str(state["b"].dtype) == "bfloat16"


def test_truncated_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: truncated"):
        read_state_dict(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointReadError, match="not a readable safetensors"):
        read_state_dict(path)


def test_safetensors_round_trip_with_bfloat16(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file

    arrays = {"f": np.arange(6, dtype=np.float32).reshape(2, 3),
              "h": np.ones(4, np.float16), "b": np.array([1.5, -2], ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "t.safetensors", arrays)
    back = read_state_dict(tmp_path / "t.safetensors")
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    # The reference implementation reads our file (it rejects bf16 in numpy, so
    # check the other tensors there).
    plain = {k: v for k, v in arrays.items() if k != "b"}
    write_safetensors(tmp_path / "p.safetensors", plain)
    ref = load_file(str(tmp_path / "p.safetensors"))
    for k, v in plain.items():
        np.testing.assert_array_equal(ref[k], v)


def test_unknown_file_kind(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointReadError, match="unknown checkpoint kind"):
        read_state_dict(path)


def test_folder_layout_errors_name_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_sd2(tmp_path / "empty")
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match=r"pipe/unet is missing"):
        load_sd2(root)
    (root / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of diffusion_pytorch_model"):
        load_sd2(root)


def test_single_file_with_foreign_keys_is_refused():
    state = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3)),
             "model.diffusion_model.weird.0.weight": np.zeros(3),
             "some_other_model.weight": np.zeros(3)}
    with pytest.raises(KeyError) as e:
        split_single_file(state)
    assert "model.diffusion_model.weird.0.weight" in str(e.value)
    assert "some_other_model.weight" in str(e.value)
