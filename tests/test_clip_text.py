"""SD2 text encoder parity with transformers' PyTorch CLIPTextModel, and the tokenizer."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsr.convert.tree import ConversionError
from jaxsr.models.clip_text import CLIPTextConfig, CLIPTextModel, load_clip_text
from jaxsr.models.tokenizer import load_tokenizer, tokenize
from tests.parity import rel_err, torch_state
from tests.test_unet import randomize_

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _reference(act="gelu", seed=0):
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TINY, "hidden_act": act}))
    ref.eval()
    randomize_(ref, seed=seed)
    return ref


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_text_encoder_matches_transformers(act):
    ref = _reference(act)
    cfg = CLIPTextConfig.from_hf_config(ref.config.to_dict())
    assert cfg.hidden_act == act
    params = load_clip_text(torch_state(ref), cfg)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 77))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = CLIPTextModel(cfg).apply({"params": params}, ids)
    assert rel_err(got, want) <= 1e-5


def test_text_encoder_accepts_released_layout_and_is_strict():
    ref = _reference()
    cfg = CLIPTextConfig.from_hf_config(ref.config.to_dict())
    state = {"text_model." + k: v for k, v in torch_state(ref).items()}
    # Released SD2 checkpoints carry the prefix and the position_ids buffer.
    state["text_model.embeddings.position_ids"] = np.arange(77)[None]
    params = load_clip_text(state, cfg)
    ids = np.arange(77)[None] % 1000
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert rel_err(CLIPTextModel(cfg).apply({"params": params}, ids), want) <= 1e-5

    missing = dict(state)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_clip_text(missing, cfg)
    extra = {**state, "text_model.encoder.layers.3.mlp.fc2.bias": np.zeros(64, np.float32)}
    with pytest.raises(ConversionError, match=r"layers\.3\.mlp\.fc2\.bias"):
        load_clip_text(extra, cfg)
    bad = {**state, "text_model.final_layer_norm.weight": np.zeros(63, np.float32)}
    with pytest.raises(ConversionError, match=r"final_layer_norm\.weight: \[63\] vs \[64\]"):
        load_clip_text(bad, cfg)


def test_text_encoder_bfloat16_close_to_float32():
    ref = _reference()
    cfg = CLIPTextConfig.from_hf_config(ref.config.to_dict())
    params = load_clip_text(torch_state(ref), cfg)
    ids = np.random.default_rng(1).integers(0, 1000, (2, 77))
    f32 = CLIPTextModel(cfg).apply({"params": params}, ids)
    bf16 = CLIPTextModel(cfg, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert rel_err(bf16, f32) <= 2e-2


def test_text_config_round_trip():
    ref = _reference()
    cfg = CLIPTextConfig.from_hf_config(ref.config.to_dict())
    rebuilt = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_hf_config()))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}


def write_tiny_tokenizer(folder):
    """A byte-level BPE vocabulary small enough to write by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {}
    for ch in letters + ",.":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def test_tokenizer_pads_and_truncates_like_clip(tmp_path):
    vocab = write_tiny_tokenizer(tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path / "tokenizer")
    prompts = ["a cat, a dog", "dog " * 100]
    ids = tokenize(tok, prompts)
    want = transformers.CLIPTokenizer(str(tmp_path / "tokenizer/vocab.json"),
                                      str(tmp_path / "tokenizer/merges.txt"))(
        prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    np.testing.assert_array_equal(ids, np.array(want))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids[0, 0] == bos and ids[1, -1] == eos            # truncated keeps the end token
    assert ids[0, 1] == vocab["a</w>"] and ids[0, 2] == vocab["cat</w>"]


def test_tokenizer_missing_files_named(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path / "tok")
