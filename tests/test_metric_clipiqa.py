"""CLIPIQA against a PyTorch reference, and its converter.

Reference: `tests/clipiqa_reference.py`, OpenAI CLIP's RN50 towers in plain torch with
pyiqa's CLIPIQA head, random (seeded) weights saved as the released checkpoint's state
dict and converted from that file like a user's download. The tokenizer is the real
one: CLIP's BPE vocabulary from the open_clip_torch wheel (installed `--no-deps`, only
its files are read), with OpenAI's SimpleTokenizer from the same wheel as the
reference for the ids.

Images: four 64x96 crops of scikit-image's photos (two clean, one noisy, one blurred).
Image features, logits and per-image scores within 1e-5 relative of the reference at
the real RN50 sizes; the structure checks (strictness, TorchScript archive, storing)
use a narrow model with the same key names.
"""

import copy
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from jaxsr.convert import metric_clipiqa
from jaxsr.convert.cache import load_converted, save_converted
from jaxsr.convert.tree import ConversionError
from jaxsr.metrics.clipiqa import (
    PROMPT_PAIRS,
    clipiqa,
    image_features,
    pair_logits,
    scores_from_features,
)
from tests import clipiqa_reference as R
from tests.parity import FAST_COMPILE, nhwc_to_nchw, rel_err

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) ships "
                                   "the photos these tests score")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 64, 96     # not square, so a height/width mix-up cannot pass
REL_TOL = 1e-5
SMALL = R.CLIPSizes(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1),
                    vision_width=8, transformer_width=64, transformer_layers=2)


def _crop(photo: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    window = photo[top:top + size, left:left + size * W // H]
    return np.asarray(Image.fromarray(window).resize((W, H), Image.BICUBIC), np.float32) / 255


@pytest.fixture(scope="module")
def images():
    """(4, H, W, 3) float32 in [0, 1]."""
    rng = np.random.default_rng(0)
    astronaut = _crop(skimage_data.astronaut(), 0, 100, 256)
    chelsea = _crop(skimage_data.chelsea(), 20, 60, 240)
    coffee = _crop(skimage_data.coffee(), 50, 100, 300)
    noisy = np.clip(chelsea + 0.2 * rng.standard_normal(chelsea.shape), 0, 1)
    small = Image.fromarray(np.round(coffee * 255).astype(np.uint8)).resize((W // 8, H // 8))
    blurred = np.asarray(small.resize((W, H), Image.BICUBIC), np.float32) / 255
    return np.stack([astronaut, chelsea, noisy, blurred]).astype(np.float32)


@pytest.fixture(scope="module")
def ids():
    """clip.tokenize of pyiqa's prompts, by OpenAI's tokenizer: [10, 77]."""
    return R.openai_tokenizer()(R.PROMPTS)


@pytest.fixture(scope="module")
def tokenizer():
    return metric_clipiqa.load_clip_tokenizer([R.bpe_file()])


@pytest.fixture(scope="module")
def rn50(tokenizer):
    """(reference at RN50 sizes, its converted (config, params)). Converted from the
    state dict in memory: the file path is the small model's (400 MB spared)."""
    model = R.build(R.RN50, 0)
    state = {k: v.numpy() for k, v in R.released_state(model).items()}
    return model, metric_clipiqa.convert_state(state, tokenizer)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(narrow reference, checkpoint path, converted (config, params))."""
    model = R.build(SMALL, 1)
    path = tmp_path_factory.mktemp("clipiqa") / "small.pth"
    torch.save(R.released_state(model), path)
    return model, path, metric_clipiqa.convert([path, R.bpe_file()])


def _reference(model, images, ids):
    with torch.no_grad():
        feats, logits, scores = R.clipiqa_scores(model, torch.from_numpy(nhwc_to_nchw(images)),
                                                 ids)
    return R.to_numpy(feats), R.to_numpy(logits), R.to_numpy(scores)


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _check_scores(scores, want_scores):
    assert scores.dtype == np.float32 and scores.shape == want_scores.shape
    per_image = np.abs(np.asarray(scores, np.float64) - want_scores) / np.abs(want_scores)
    assert per_image.max() <= REL_TOL, per_image
    assert ((0 <= scores) & (scores <= 1)).all()
    # Scores that differ between images: a constant (e.g. all 0.5) could not tell.
    assert np.ptp(want_scores) > 1e-2, want_scores


def test_rn50_scores_match_reference(rn50, images, ids):
    model, (config, params) = rn50
    assert config["backbone"] == "RN50"
    assert config["prompts"] == [list(p) for p in PROMPT_PAIRS]
    want_feats, want_logits, want_scores = _reference(model, images, ids)
    # One compile of the tower (the expensive part); the head runs on its output.
    feats = _compile(image_features, params, images)(params, images)
    assert feats.shape == (4, 1024)
    assert rel_err(feats, want_feats) <= REL_TOL
    logits = np.asarray(pair_logits(params, feats)).reshape(len(images), -1)
    assert rel_err(logits, want_logits) <= REL_TOL
    _check_scores(scores_from_features(params, feats), want_scores)


def test_rn50_text_features_match_reference(rn50, ids):
    """The text features the converter computes with the JAX text tower."""
    model, (_, params) = rn50
    with torch.no_grad():
        want = model.encode_text(ids)
        want = R.to_numpy(want / want.norm(dim=-1, keepdim=True))
    assert params["text_features"].shape == (10, 1024)
    assert rel_err(params["text_features"], want) <= REL_TOL


def test_small_model_scores_match_reference(small, images, ids):
    """The whole `clipiqa` function, end to end, on the narrow model."""
    model, _, (config, params) = small
    assert config["backbone"] == "custom" and config["visual"]["layers"] == [1, 2, 1, 1]
    want_feats, _, want_scores = _reference(model, images, ids)
    both = lambda p, x: (image_features(p, x), clipiqa(p, x))
    feats, scores = _compile(both, params, images)(params, images)
    assert rel_err(feats, want_feats) <= REL_TOL
    _check_scores(scores, want_scores)


def test_prompt_ids_match_openai_tokenizer(tmp_path):
    texts = [p for pair in PROMPT_PAIRS for p in pair] + [
        "A photo of 3 cats, sharp & clear!", "  spaced   out  ", "naïve café"]
    want = R.openai_tokenizer()(texts).numpy()
    tok = metric_clipiqa.load_clip_tokenizer([R.bpe_file()])
    got = metric_clipiqa.prompt_ids(tok, texts)
    np.testing.assert_array_equal(got, want)
    # The transformers tokenizer-folder pair gives the same ids.
    vocab, merges = metric_clipiqa.vocab_from_bpe(R.bpe_file())
    assert len(vocab) == 49408
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pair = metric_clipiqa.load_clip_tokenizer([tmp_path / "vocab.json", tmp_path / "merges.txt"])
    np.testing.assert_array_equal(metric_clipiqa.prompt_ids(pair, texts), want)


def test_reference_matches_pyiqa_clip_model(images, ids):
    """This file's reference against pyiqa's own CLIP code (pos_embedding=False)."""
    try:
        pyiqa_file = R.installed_file("pyiqa", "archs/clip_model.py")
    except FileNotFoundError as e:
        pytest.skip(f"pyiqa is not installed ({e}): pip install --no-deps pyiqa==0.1.16")
    assert pyiqa_file.is_file()
    model = R.build(SMALL, 2)
    theirs = R.pyiqa_clip(model, SMALL)
    x = (torch.from_numpy(nhwc_to_nchw(images)) - torch.tensor(R.CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(R.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = R.to_numpy(theirs(x, ids, pos_embedding=False)[0])
        got = R.to_numpy(model(x, ids))
    assert rel_err(got, want) <= 1e-6


def _error(state: dict, tmp_path) -> ConversionError:
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(ConversionError) as err:
        metric_clipiqa.convert([path, R.bpe_file()])
    return err.value


def test_conversion_is_strict(small, tmp_path):
    model, _, _ = small
    state = R.released_state(model)

    missing = dict(state)
    del missing["visual.layer2.1.bn2.running_var"]
    del missing["transformer.resblocks.1.attn.in_proj_bias"]
    err = _error(missing, tmp_path)
    assert sorted(err.missing) == ["transformer.resblocks.1.attn.in_proj_bias",
                                   "visual.layer2.1.bn2.running_var"]
    assert not err.unexpected and not err.mismatched
    assert "visual.layer2.1.bn2.running_var" in str(err)

    extra = {**state, "visual.attnpool.o_proj.weight": torch.zeros(4),
             "transformer.resblocks.0.attn.bias_k": torch.zeros(4)}
    err = _error(extra, tmp_path)
    assert sorted(err.unexpected) == ["transformer.resblocks.0.attn.bias_k",
                                      "visual.attnpool.o_proj.weight"]
    assert not err.missing and not err.mismatched

    bad = {**state, "visual.layer3.0.conv2.weight": torch.zeros(32, 32, 1, 3),
           "transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(256, 63)}
    err = _error(bad, tmp_path)
    assert sorted(err.mismatched) == [
        "transformer.resblocks.0.mlp.c_fc.weight: [256, 63] vs [256, 64]",
        "visual.layer3.0.conv2.weight: [32, 32, 1, 3] vs [32, 32, 3, 3]"]
    assert not err.missing and not err.unexpected

    # A key the sizes are read from: named, not a KeyError.
    no_size = {k: v for k, v in state.items() if k != "ln_final.weight"}
    assert _error(no_size, tmp_path).missing == ["ln_final.weight"]


def test_torchscript_archive_converts_alike(small, images, ids, tmp_path):
    """RN50.pt is a TorchScript archive whose state dict carries the metadata scalars."""
    model, _, (config, params) = small
    scripted = copy.deepcopy(model)
    del scripted.context_length
    for key in ("input_resolution", "context_length", "vocab_size"):
        scripted.register_buffer(key, R.released_state(model)[key])
    x = torch.from_numpy(nhwc_to_nchw(images[:1]))
    traced = torch.jit.trace(scripted, (x, ids))
    traced.save(str(tmp_path / "small_jit.pt"))
    config2, params2 = metric_clipiqa.convert([tmp_path / "small_jit.pt", R.bpe_file()])
    assert config2 == config
    _leaves_equal(params, params2)


def _leaves_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in fa[0]] == [p for p, _ in fb[0]]
    for (path, x), (_, y) in zip(fa[0], fb[0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_converted_weights_store_and_load(small, tmp_path):
    _, path, (config, params) = small
    save_converted(tmp_path / "clipiqa", {"clipiqa": (config, params)},
                   sources=[path, R.bpe_file()])
    loaded_config, loaded = load_converted(tmp_path / "clipiqa")["clipiqa"]
    assert loaded_config == config
    _leaves_equal(params, loaded)


def test_too_small_images_rejected(small):
    _, _, (_, params) = small
    with pytest.raises(ValueError, match="at least 32x32"):
        clipiqa(params, np.zeros((1, 31, 64, 3), np.float32))


def test_missing_vocabulary_is_named(small):
    _, path, _ = small
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
        metric_clipiqa.convert([path])
