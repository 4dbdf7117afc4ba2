"""SD2 text encoder parity with transformers' PyTorch CLIPTextModel, strict
conversion, and the tokenizer wrapper against CLIPTokenizer."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from jaxsr.convert.networks import load_clip_text
from jaxsr.convert.tree import ConversionError
from jaxsr.models.clip_text import SD2_TEXT_ENCODER, CLIPTextConfig, CLIPTextModel
from jaxsr.models.tokenizer import load_tokenizer, tokenize
from tests.keylists import read_listing
from tests.parity import rel_err, torch_state

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _reference(act: str, seed: int = 0):
    """A tiny transformers CLIPTextModel with every weight perturbed away from its
    init (unit norm scales, zero biases), so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**{**TINY, "hidden_act": act})
    ref = transformers.CLIPTextModel._from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref


@functools.cache
def _encoder(cfg: CLIPTextConfig, dtype=jnp.float32, attention="xla"):
    """One compiled forward per (config, dtype, backend), shared by the tests."""
    return jax.jit(CLIPTextModel(cfg, dtype=dtype, attention=attention).apply)


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (2, 77)).astype(np.int32)


@pytest.fixture(scope="module")
def gelu_case():
    """(reference, config, params from its transformers-5 state dict, ids, reference output)."""
    ref = _reference("gelu")
    cfg = CLIPTextConfig.from_hf_config(ref.config.to_dict())
    params = load_clip_text(torch_state(ref), cfg)
    ids = _ids()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    return ref, cfg, params, ids, want


def test_text_encoder_matches_transformers_gelu(gelu_case):
    _, cfg, params, ids, want = gelu_case
    assert cfg.hidden_act == "gelu"
    got = _encoder(cfg)({"params": params}, ids)
    assert got.dtype == jnp.float32 and got.shape == (2, 77, 64)
    assert rel_err(got, want) <= 1e-5


def test_text_encoder_matches_transformers_quick_gelu():
    ref = _reference("quick_gelu", seed=1)
    cfg = CLIPTextConfig.from_hf_config(ref.config.to_dict())
    assert cfg.hidden_act == "quick_gelu"
    params = load_clip_text(torch_state(ref), cfg)
    ids = _ids(1)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_err(_encoder(cfg)({"params": params}, ids), want) <= 1e-5


def _released_layout(ref) -> dict:
    """The state dict as the released SD2 files hold it: `text_model.` prefix and
    the position_ids buffer; plus the projection head a CLIPTextModelWithProjection
    / CLIPModel export carries."""
    state = {"text_model." + k: v for k, v in torch_state(ref).items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    state["text_projection.weight"] = np.ones((512, 64), np.float32)
    state["logit_scale"] = np.array(2.6592, np.float32)
    return state


def test_released_layout_gives_the_same_params(gelu_case):
    ref, cfg, params, _, _ = gelu_case
    released = traverse_util.flatten_dict(load_clip_text(_released_layout(ref), cfg))
    plain = traverse_util.flatten_dict(params)
    assert released.keys() == plain.keys()
    for path, value in plain.items():
        np.testing.assert_array_equal(released[path], value, err_msg="/".join(path))


def test_conversion_is_strict(gelu_case):
    ref, cfg, _, _, _ = gelu_case
    state = _released_layout(ref)
    missing = dict(state)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_clip_text(missing, cfg)
    extra = {**state, "text_model.encoder.layers.3.mlp.fc2.bias": np.zeros(64, np.float32)}
    with pytest.raises(ConversionError, match=r"text_model\.encoder\.layers\.3\.mlp\.fc2\.bias"):
        load_clip_text(extra, cfg)
    bad = {**state, "text_model.final_layer_norm.weight": np.zeros(63, np.float32)}
    with pytest.raises(ConversionError, match=r"final_layer_norm\.weight: \[63\] vs \[64\]"):
        load_clip_text(bad, cfg)
    linear = {**state, "text_model.encoder.layers.0.self_attn.q_proj.weight":
              np.zeros((64, 32), np.float32)}
    with pytest.raises(ConversionError, match=r"q_proj\.weight: \[64, 32\] vs \[64, 64\]"):
        load_clip_text(linear, cfg)

    # transformers-5 layout (no prefix): errors name the keys as the file has them.
    plain = torch_state(ref)
    with pytest.raises(ConversionError) as err:
        load_clip_text({**plain, "encoder.layers.3.mlp.fc2.bias": np.zeros(64, np.float32)},
                       cfg)
    assert "encoder.layers.3.mlp.fc2.bias" in str(err.value)
    assert "text_model.encoder.layers.3" not in str(err.value)
    del plain["embeddings.token_embedding.weight"]
    with pytest.raises(ConversionError, match=r"(?m)^ +embeddings\.token_embedding\.weight$"):
        load_clip_text(plain, cfg)


def test_bfloat16_and_backends_close_to_float32(gelu_case):
    _, cfg, params, ids, want = gelu_case
    f32 = np.asarray(_encoder(cfg)({"params": params}, ids))
    bf16 = _encoder(cfg, jnp.bfloat16)({"params": params}, ids)
    assert bf16.dtype == jnp.float32            # the output is float32 whatever the compute
    err = rel_err(bf16, f32)
    assert 0 < err <= 2e-2                       # 0 would mean bf16 was never used
    # jax.nn.dot_product_attention with the boolean causal mask: same numbers.
    assert rel_err(_encoder(cfg, attention="dpa")({"params": params}, ids), want) <= 1e-5


def test_longer_input_than_positions_rejected(gelu_case):
    _, cfg, params, _, _ = gelu_case
    with pytest.raises(ValueError, match="max_position_embeddings 77"):
        CLIPTextModel(cfg).apply({"params": params}, np.zeros((1, 78), np.int32))


def test_config_round_trip(gelu_case):
    ref, cfg, _, _, _ = gelu_case
    assert CLIPTextConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hf = transformers.CLIPTextConfig(**cfg.to_hf_config())
    for name in ("hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                 "pad_token_id", "projection_dim"):
        assert getattr(hf, name) == getattr(ref.config, name), name
    rebuilt = transformers.CLIPTextModel(hf)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}


def test_sd2_config_converts_the_released_key_listing():
    """SD2's real sizes against the key/shape listing of the released text encoder
    (zero-stride arrays: nothing of the 340M parameters is allocated)."""
    listing = read_listing("sd2_base_text_encoder_transformers.tsv")
    assert "text_model.embeddings.position_ids" in listing
    state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in listing.items()}
    params = load_clip_text(state, SD2_TEXT_ENCODER)
    leaves = jax.tree.leaves(params)
    assert len(leaves) == len(listing) - 1
    assert sum(x.size for x in leaves) == 340_387_840
    assert CLIPTextConfig() == SD2_TEXT_ENCODER


# ---------------------------------------------------------------- tokenizer

def write_tiny_tokenizer(folder, sd2_special_tokens=False):
    """A byte-level BPE vocabulary small enough to write by hand. With
    `sd2_special_tokens`, the special-token files SD2's tokenizer folder has
    (padding with "!" instead of <|endoftext|>)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0}
    for ch in "abcdefghijklmnopqrstuvwxyz,.":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if sd2_special_tokens:
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}
        (folder / "special_tokens_map.json").write_text(json.dumps({**special,
                                                                    "pad_token": "!"}))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {**special, "pad_token": "<|endoftext|>", "model_max_length": 77,
             "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    return vocab


def _direct(folder, prompts):
    """What the SD pipelines compute: the tokenizer called with max_length padding
    (their max_length is the released tokenizer_config's model_max_length, 77)."""
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return np.array(tok(prompts, padding="max_length", max_length=77,
                        truncation=True)["input_ids"])


def test_tokenizer_pads_and_truncates_like_clip(tmp_path):
    folder = tmp_path / "tokenizer"
    vocab = write_tiny_tokenizer(folder)
    tok = load_tokenizer(folder)
    prompts = ["a cat, a dog", "dog " * 100, ""]
    ids = tokenize(tok, prompts)
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    np.testing.assert_array_equal(ids, _direct(folder, prompts))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert list(ids[0, :7]) == [bos, vocab["a</w>"], vocab["cat</w>"], vocab[",</w>"],
                                vocab["a</w>"], vocab["dog</w>"], eos]
    assert ids[1, 0] == bos and ids[1, -1] == eos and ids[1, 1] == vocab["dog</w>"]
    assert list(ids[2, :2]) == [bos, eos]
    np.testing.assert_array_equal(tokenize(tok, "a cat"), tokenize(tok, ["a cat"]))


def test_tokenizer_honours_the_folders_pad_token(tmp_path):
    folder = tmp_path / "tokenizer"
    vocab = write_tiny_tokenizer(folder, sd2_special_tokens=True)
    ids = tokenize(load_tokenizer(folder), ["a dog", "cat"])
    np.testing.assert_array_equal(ids, _direct(folder, ["a dog", "cat"]))
    assert list(ids[0, :4]) == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["dog</w>"],
                                vocab["<|endoftext|>"]]
    assert (ids[0, 4:] == vocab["!"]).all() and (ids[1, 3:] == vocab["!"]).all()


def test_tokenizer_missing_files_named(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tok lacks merges\.txt"):
        load_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_tokenizer_saved_by_transformers_loads_back(tmp_path):
    """What `save_pretrained` writes (transformers 5: tokenizer.json only; older: vocab
    and merges) is a folder load_tokenizer accepts, with the same ids (trained CoSeR
    weights carry their tokenizer this way)."""
    write_tiny_tokenizer(tmp_path / "tok", sd2_special_tokens=True)
    tok = load_tokenizer(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    prompts = ["a photo of a cat, sharp", "", "x" * 200]
    np.testing.assert_array_equal(tokenize(again, prompts), tokenize(tok, prompts))
