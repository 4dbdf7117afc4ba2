"""Users' mistakes with checkpoints give one clear error naming the file or key."""

import json
import pickle

import numpy as np
import pytest
import safetensors
import torch

from jaxsr.convert import ldm
from jaxsr.convert.ldm import split_single_file
from jaxsr.convert.networks import load_unet
from jaxsr.convert.readers import CheckpointReadError, read_state_dict
from jaxsr.convert.safetensors_io import write_safetensors
from jaxsr.convert.sd2 import load_sd2, rename_legacy_vae
from jaxsr.convert.tree import ConversionError
from jaxsr.models.unet import UNetConfig
from tests.keylists import read_listing
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
        pickle.dump({"weight": _Payload(str(victim))}, f, protocol=2)
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
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: .*truncated"):
        read_state_dict(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: not a readable"):
        read_state_dict(path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_pickle_is_named(tmp_path, zip_format):
    path = tmp_path / "unet.bin"
    torch.save({"w": torch.ones(4096)}, path, _use_new_zipfile_serialization=zip_format)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(CheckpointReadError, match=r"unet\.bin: .*damaged"):
        read_state_dict(path)


def test_pickle_without_tensors_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointReadError, match=r"list\.pt: expected a dict of tensors"):
        read_state_dict(path)


def test_sharded_index_names_a_missing_shard(tmp_path):
    write_safetensors(tmp_path / "m-1.safetensors", {"a": np.ones(2, np.float32)})
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"m-2\.safetensors .*is missing"):
        read_state_dict(index)
    write_safetensors(tmp_path / "m-2.safetensors", {"c": np.ones(2, np.float32)})
    with pytest.raises(CheckpointReadError, match=r"shards lack 1 indexed tensors.*'b'"):
        read_state_dict(index)
    write_safetensors(tmp_path / "m-2.safetensors", {"b": np.zeros(3, np.float16)})
    state = read_state_dict(index)
    assert set(state) == {"a", "b"} and state["b"].dtype == np.float16


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
    # The library's own reader agrees on every tensor (bfloat16 included: it names
    # numpy's "bfloat16" dtype once ml_dtypes is imported).
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), framework="np") as f:
        for k, v in arrays.items():
            assert f.get_tensor(k).dtype == v.dtype
            np.testing.assert_array_equal(f.get_tensor(k), v)
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
    with pytest.raises(ConversionError) as e:
        split_single_file(state, what="v2.ckpt")
    assert e.value.unexpected == ["model.diffusion_model.weird.0.weight",
                                  "some_other_model.weight"]
    assert str(e.value).startswith("v2.ckpt (SD 2.x single-file layout) does not match")


def test_surplus_text_blocks_are_refused():
    """Only the block right after the used ones is the documented unused one; a text
    config with fewer layers than the file leaves the rest as unexpected keys."""
    from jaxsr.convert.networks import load_clip_text
    from jaxsr.models.clip_text import CLIPTextConfig

    state = {k: np.broadcast_to(np.float32(0), s)
             for k, s in read_listing("sd21_ldm_single_file.tsv").items()}
    assert len(split_single_file(state, text_layers=23)["text_encoder"]) == 372
    text = split_single_file(state, text_layers=22)["text_encoder"]
    with pytest.raises(ConversionError) as e:
        load_clip_text(text, CLIPTextConfig(num_hidden_layers=22))
    assert len(e.value.unexpected) == 16 and not e.value.missing
    assert "text_model.encoder.layers.23.self_attn.q_proj.weight" in e.value.unexpected


def test_single_file_keys_that_collide_are_refused(monkeypatch):
    state = {"model.diffusion_model.input_blocks.1.0.in_layers.0.weight": np.zeros(3),
             "model.diffusion_model.input_blocks.2.0.in_layers.0.weight": np.zeros(3)}
    assert len(split_single_file(state)["unet"]) == 2
    monkeypatch.setattr(ldm, "unet_key", lambda key, lpb: "conv_in.weight")
    with pytest.raises(ValueError, match="input_blocks.1.0.in_layers.0.weight and "
                                         "model.diffusion_model.input_blocks.2.0"):
        split_single_file(state)


def test_legacy_and_current_vae_names_together_are_refused():
    state = {"encoder.mid_block.attentions.0.to_q.bias": np.zeros(2),
             "encoder.mid_block.attentions.0.query.bias": np.zeros(2)}
    with pytest.raises(ValueError, match="encoder.mid_block.attentions.0.to_q.bias"):
        rename_legacy_vae(state)


def test_diffusers_file_passed_as_single_file_is_explained(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_safetensors(path, {"conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: not an SD 2.x "
                                         r"single-file .*pipeline folder"):
        load_sd2(path)


def test_lazy_reads_and_streamed_writes(tmp_path):
    """Transposed views are written in C order; a safetensors checkpoint reads lazily:
    names, dtypes and shapes from the header, each tensor read from disk when looked
    up (a file changed after opening shows the new bytes); renamed views read through."""
    from jaxsr.convert.readers import KeyView, LazyStateDict, stored_info

    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(tmp_path / "v.safetensors", {"t": base.T, "s": np.float32(2.5)},
                      metadata={"format": "pt"})
    state = read_state_dict(tmp_path / "v.safetensors")
    assert isinstance(state, LazyStateDict) and set(state) == {"t", "s"}
    assert stored_info(state, "t") == (np.dtype(np.float32), (4, 3))
    np.testing.assert_array_equal(state["t"], base.T)
    assert state["s"].shape == () and float(state["s"]) == 2.5
    with safetensors.safe_open(str(tmp_path / "v.safetensors"), framework="np") as f:
        np.testing.assert_array_equal(f.get_tensor("t"), base.T)
        assert f.metadata() == {"format": "pt"}
    # Nothing was read up front: overwrite the data bytes in place, then look up again.
    raw = bytearray((tmp_path / "v.safetensors").read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:start + 4] = np.float32(-1).tobytes()
    (tmp_path / "v.safetensors").write_bytes(bytes(raw))
    assert state["t"][0, 0] == -1
    view = KeyView(state, {"renamed": "t"})
    assert list(view) == ["renamed"] and stored_info(view, "renamed")[1] == (4, 3)
    assert view["renamed"][0, 0] == -1


def test_pickles_of_both_formats_read(tmp_path):
    """Zip-format saves are memory-mapped, legacy saves (which torch cannot map) fall
    back to a whole read: both give the tensors."""
    for zip_format in (True, False):
        path = tmp_path / f"m{zip_format}.pth"
        torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}}, path,
                   _use_new_zipfile_serialization=zip_format)
        np.testing.assert_array_equal(read_state_dict(path)["w"], np.arange(6.0).reshape(2, 3))
