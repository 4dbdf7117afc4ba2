"""MUSIQ against pyiqa's computation, restated in plain torch (`tests/musiq_reference.py`),
with seeded random weights saved to a .pth and converted by `jaxsr.convert.metric_musiq`.

Images are crops of scikit-image's photos at non-square sizes. The token sequences
(resizes, patches, hashed positions, scale ids, masks) are compared at pyiqa's sizes
(longer sides 224 and 384) for 75x110 (both scales upsample; no side a multiple of 32,
so patches and sequences are padded), 390x420 (both shrink) and 224x100 (one scale
keeps the size). Scores are compared for a shrunk model (width 48, two blocks, longer
sides 64 and 128: one scale shrinks, one grows, 32 tokens) with a one-output and a
ten-output head, and once for the release sizes (14 blocks of width 384, sides 224 and
384, 205 tokens) end to end.

Cost: the patch stem (64 and 256 channels on every 32x32 patch) dominates both sides;
the shrunk sides keep the token count, and so the stem's work, low.
"""

import jax
import numpy as np
import pytest
import skimage.data
import torch
from flax import traverse_util

from jaxsr.convert.cache import load_converted, save_converted
from jaxsr.convert.metric_musiq import convert
from jaxsr.convert.tree import ConversionError
from jaxsr.metrics.musiq import MusiqConfig, multiscale_patches, musiq, musiq_program
from tests.musiq_reference import MUSIQ as TorchMUSIQ
from tests.parity import FAST_COMPILE, nhwc_to_nchw, rel_err

RELEASE_NAME = "musiq_koniq_ckpt-e95806b9.pth"
TINY = dict(hidden_size=48, mlp_dim=96, num_heads=6, num_layers=2)
TINY_SIDES = (64, 128)


def _randomize(model, seed):
    """Norm scales/shifts, biases and the cls token moved off their init (ones/zeros
    would hide a swapped or dropped tensor); head weights widened so scores are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith(".cls"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            if name.startswith("head") and name.endswith("weight"):
                p.mul_(5.0)


def _reference(tmp_path_factory, name, seed, **sizes):
    torch.manual_seed(seed)
    model = TorchMUSIQ(**sizes).eval()
    _randomize(model, seed + 1)
    path = tmp_path_factory.mktemp("musiq") / name
    torch.save(model.state_dict(), path)
    return model, path


def _photos(size):
    """(3, h, w, 3) float32 in [0, 1]: crops of three photos."""
    h, w = size
    crops = [skimage.data.astronaut()[:h, 40:40 + w], skimage.data.rocket()[:h, 100:100 + w],
             skimage.data.coffee()[:h, 150:150 + w]]
    return np.stack(crops).astype(np.float32) / 255.0


SMALL, LARGE = (75, 110), (390, 420)


def _fast_musiq(params, images, config):
    """`musiq`'s program compiled with the parity tests' XLA options (half the compile
    time; `test_scores_match_reference` runs `musiq` itself)."""
    cfg = MusiqConfig.from_dict(config)
    program = musiq_program.lower(params, images, cfg=cfg).compile(compiler_options=FAST_COMPILE)
    return np.asarray(program(params, images))


def _torch_scores(model, images):
    with torch.no_grad():
        return model(torch.from_numpy(nhwc_to_nchw(images))).numpy()


def _check_scores(got, want):
    # Scores near 0 would make a relative bound meaningless: the seeds give |score| > 0.1.
    assert np.min(np.abs(want)) > 0.1, want
    assert got.shape == want.shape and got.dtype == np.float32
    errors = np.abs(np.asarray(got, np.float64) - want) / np.abs(want)
    assert errors.max() <= 1e-5, (errors, got, want)
    # Different photos get different scores: the input reaches the score.
    assert np.ptp(want) > 0.05, want


# (image size, max_seq_len_from_original_res): all full-size patches, or padded to 20,
# cut to 5 (a 224 side resizes to itself), or none.
TOKEN_CASES = [(SMALL, -1), (SMALL, 20), ((224, 100), 5), (LARGE, None)]


@pytest.mark.parametrize("size,original", TOKEN_CASES,
                         ids=["up-all", "up-pad-20", "exact-224-cut-5", "down-no-original"])
def test_tokens_match_reference(size, original):
    """Patches, hashed positions, scale ids and masks equal pyiqa's packed token layout."""
    ref = TorchMUSIQ(**TINY, max_seq_len_from_original_res=original)
    images = _photos(size)[:2]
    x = (images - 0.5) * 2
    with torch.no_grad():
        want = ref.multiscale_tokens(torch.from_numpy(nhwc_to_nchw(x))).numpy()
    cfg = MusiqConfig(max_seq_len_from_original_res=original)
    # One compiled program per case: op-by-op dispatch would compile each op per shape.
    tokens = jax.jit(multiscale_patches, static_argnums=1).lower(x, cfg).compile(
        compiler_options=FAST_COMPILE)(x)
    patches, positions, scales, mask = (np.asarray(a) for a in tokens)
    b, n = patches.shape[:2]
    assert want.shape[:2] == (b, n)
    np.testing.assert_array_equal(positions, want[..., -3])
    np.testing.assert_array_equal(scales, want[..., -2])
    np.testing.assert_array_equal(mask, want[..., -1] == 1)
    pixels = patches.transpose(0, 1, 4, 2, 3).reshape(b, n, -1)
    assert rel_err(pixels, want[..., :-3]) <= 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, path = _reference(tmp_path_factory, RELEASE_NAME, 0, **TINY,
                             longer_side_lengths=TINY_SIDES)
    return model, path, convert([path], longer_side_lengths=TINY_SIDES)


def test_scores_match_reference(tiny):
    model, _, (config, params) = tiny
    assert config == MusiqConfig(**TINY, longer_side_lengths=TINY_SIDES).to_dict()
    images = _photos(SMALL)
    _check_scores(np.asarray(musiq(params, images, config=config)), _torch_scores(model, images))


def test_ten_class_head_matches_reference(tmp_path_factory):
    """The AVA checkpoints' head: Linear to 10, softmax, mean opinion sum_i i p_i."""
    model, path = _reference(tmp_path_factory, "musiq_ava_ckpt-e8d3f067.pth", 2, **TINY,
                             longer_side_lengths=TINY_SIDES, num_class=10)
    config, params = convert([path], longer_side_lengths=TINY_SIDES)
    assert config["num_class"] == 10
    images = _photos(SMALL)
    got, want = _fast_musiq(params, images, config), _torch_scores(model, images)
    assert np.all((want > 1) & (want < 10))
    _check_scores(got, want)


def test_release_sizes_match_reference(tmp_path_factory):
    """pyiqa's MUSIQ() sizes end to end: 14 blocks of width 384, MLP 1152, 6 heads."""
    model, path = _reference(tmp_path_factory, RELEASE_NAME, 4)
    config, params = convert([path])
    assert config == MusiqConfig().to_dict()
    assert sum(np.size(v) for v in _leaves(params)) == sum(
        p.numel() for p in model.parameters())
    images = _photos(SMALL)[:2]
    _check_scores(_fast_musiq(params, images, config), _torch_scores(model, images))


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_conversion_is_strict(tiny, tmp_path):
    _, path, _ = tiny
    state = torch.load(path, weights_only=True)
    norm = "transformer_encoder.transformer.encoderblock_1.norm2.weight"
    del state[norm]
    state["block1.conv4.weight"] = torch.zeros(1)
    state["block1.gn2.bias"] = torch.zeros(65)
    broken = tmp_path / RELEASE_NAME
    torch.save(state, broken)
    with pytest.raises(ConversionError) as e:
        convert([broken])
    assert norm in e.value.missing
    assert e.value.unexpected == ["block1.conv4.weight"]
    assert e.value.mismatched == ["block1.gn2.bias: [65] vs [64]"]
    assert RELEASE_NAME in str(e.value)


def test_conversion_names_a_misshaped_size_key(tiny, tmp_path):
    """A shape the sizes are read from cannot pass as another model size."""
    _, path, _ = tiny
    state = torch.load(path, weights_only=True)
    state["embedding.weight"] = torch.zeros(48, 1000)
    broken = tmp_path / RELEASE_NAME
    torch.save(state, broken)
    with pytest.raises(ConversionError, match="embedding.weight") as e:
        convert([broken])
    assert [m.split(":")[0] for m in e.value.mismatched] == ["embedding.weight"]


def test_converted_weights_survive_the_cache(tiny, tmp_path):
    """What `jaxsr eval` stores and reloads: the config as JSON, every array unchanged."""
    _, path, (config, params) = tiny
    save_converted(tmp_path / "musiq", {"musiq": (config, params)}, sources=[path])
    loaded_config, loaded = load_converted(tmp_path / "musiq")["musiq"]
    assert loaded_config == config
    assert MusiqConfig.from_dict(loaded_config) == MusiqConfig(**TINY,
                                                               longer_side_lengths=TINY_SIDES)
    flat, back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(loaded)
    assert flat.keys() == back.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(back[key], value, err_msg="/".join(key))
