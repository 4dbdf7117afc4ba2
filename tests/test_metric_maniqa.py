"""MANIQA against pyiqa's computation, restated in plain torch (`tests/maniqa_reference.py`),
with seeded random weights saved to a .pth and converted by `jaxsr.convert.metric_maniqa`.

Images are crops of scikit-image's photos. Scores are compared for a shrunk model (width
32, crop side 64: an 8 x 8 token map, so the 4 x 4 Swin windows shift and mask; pyiqa's
20 crops) on a 100 x 130 image (crop grid with steps 9 and 16) and on one of exactly the
crop side (upscaled to 65 x 65 first, all crops at the origin), and for the release
sizes (ViT-B/8 trunk, 784-wide TABlocks, 28 x 28 Swin maps) with one crop. The crop step
alone (normalisation, pyiqa's scale-factor upscale, the grid) is compared on a 50 x 97
image whose long side's output size is floored, and with explicit offsets.

Cost: the full-size model (about 110M parameters: init, save, convert, one 224-pixel
crop through both frameworks) takes about half of the file's time; the shrunk model
compiles two programs (one per image size).
"""

import numpy as np
import pytest
import skimage.data
import torch
from flax import traverse_util

from jaxsr.convert.cache import load_converted, save_converted
from jaxsr.convert.metric_maniqa import convert
from jaxsr.convert.tree import ConversionError
from jaxsr.metrics.maniqa import (
    ManiqaConfig,
    crops,
    images_per_step,
    maniqa,
    maniqa_program,
    uniform_offsets,
)
from tests.maniqa_reference import MANIQA as TorchMANIQA
from tests.maniqa_reference import uniform_crop
from tests.parity import FAST_COMPILE, nchw_to_nhwc, nhwc_to_nchw, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RELEASE_NAME = "ckpt_koniq10k.pt"
# Taps 1-4 of 6 ViT blocks (pyiqa's are 6-9 of 12): one block after the last tap, as in
# the release, and fewer blocks to compile.
TINY = dict(embed_dim=32, vit_depth=6, vit_heads=2, vit_classes=10, taps=(1, 2, 3, 4),
            img_size=64, num_heads=(2, 2), dim_mlp=48)


def _randomize(model, seed, score_gain=3.0):
    """Norm scales/shifts and biases moved off their init (ones/zeros would hide a swapped
    or dropped tensor). The score head's last layer is shifted and widened so most
    per-token scores pass its ReLU and images score O(0.1) apart from zero; the weight
    head is widened so the weights differ between tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.fc_score[3].bias.fill_(0.8)
        model.fc_score[3].weight.mul_(score_gain)
        model.fc_weight[3].weight.mul_(10.0)


def _photos(h, w):
    """(3, h, w, 3) float32 in [0, 1]: crops of three photos."""
    crops_ = [skimage.data.astronaut()[:h, 100:100 + w], skimage.data.chelsea()[:h, :w],
              skimage.data.coffee()[:h, 200:200 + w]]
    return np.stack(crops_).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchMANIQA(**TINY).eval()
    _randomize(model, 1)
    path = tmp_path_factory.mktemp("maniqa") / RELEASE_NAME
    torch.save(model.state_dict(), path)
    return model, path, convert([path], vit_heads=TINY["vit_heads"], taps=TINY["taps"])


def _torch_scores(model, images):
    with torch.no_grad():
        return model(torch.from_numpy(nhwc_to_nchw(images))).numpy()[:, 0]


def _fast_maniqa(params, images, config):
    """`maniqa`'s program compiled with the parity tests' XLA options (half the compile
    time; `test_scores_match_reference` runs `maniqa` itself)."""
    cfg = ManiqaConfig.from_dict(config)
    program = maniqa_program.lower(params, images, cfg=cfg).compile(compiler_options=FAST_COMPILE)
    return np.asarray(program(params, images))


def _check_scores(got, want, distinct=True):
    # Scores near 0 would make a relative bound meaningless: the seeds give scores > 0.05.
    assert np.min(np.abs(want)) > 0.05, want
    assert got.shape == want.shape and got.dtype == np.float32
    errors = np.abs(np.asarray(got, np.float64) - want) / np.abs(want)
    assert errors.max() <= 1e-5, (errors, got, want)
    # Different photos get different scores: the input reaches the score.
    assert not distinct or np.ptp(want) > 0.01, want


def test_scores_match_reference(tiny):
    model, _, (config, params) = tiny
    assert config == ManiqaConfig(**TINY).to_dict()
    images = _photos(100, 130)
    _check_scores(np.asarray(maniqa(params, images, config=config)),
                  _torch_scores(model, images))


def test_crop_sized_image_matches_reference(tiny):
    """An image of exactly the crop side: pyiqa upscales it to side + 1, crops at (0, 0)."""
    model, _, (config, params) = tiny
    images = _photos(64, 64)
    _check_scores(_fast_maniqa(params, images, config), _torch_scores(model, images))


def test_images_share_a_step_when_their_crops_are_few(tiny):
    """With 3 crops per image, two images go through the network together
    (`images_per_step`: at most CROPS_PER_STEP = 8 crops a step); each image's score is
    still its own crops' weighted mean. Four images: two steps of two."""
    model, _, (config, params) = tiny
    assert [images_per_step(4, k) for k in (1, 3, 5, 20)] == [4, 2, 1, 1]
    assert images_per_step(6, 3) == 2 and images_per_step(3, 2) == 3
    images = np.concatenate([_photos(100, 130), _photos(100, 130)[:1, :, ::-1]])
    few = dict(config, test_sample=3)
    model.test_sample = 3
    try:
        want = _torch_scores(model, images)
    finally:
        model.test_sample = TINY.get("test_sample", 20)
    _check_scores(_fast_maniqa(params, images, few), want)


@pytest.mark.parametrize("size", [(50, 97), (100, 130), (64, 64)])
def test_crops_match_reference(size):
    """Normalisation, the scale-factor upscale and the uniform grid, against pyiqa's
    `uniform_crop`. 50 x 97 becomes 65 x floor(126.1) = 126, sampled with step 1 / 1.3
    (not 97 / 126) along the width too."""
    cfg = ManiqaConfig(**TINY)
    images = _photos(*size)
    x = torch.from_numpy(nhwc_to_nchw(images))
    want = nchw_to_nhwc(uniform_crop((x - 0.5) / 0.5, cfg.img_size, cfg.test_sample).numpy())
    got = np.asarray(crops(images, cfg))
    assert got.shape == want.shape == (3 * 20, 64, 64, 3)
    assert rel_err(got, want) <= 1e-6


def test_explicit_offsets_select_those_crops():
    cfg = ManiqaConfig(**TINY)
    images = _photos(100, 130)
    offsets = ((0, 0), (36, 66), (5, 17))
    got = np.asarray(crops(images, cfg, offsets)).reshape(3, 3, 64, 64, 3)
    for k, (t, left) in enumerate(offsets):
        np.testing.assert_allclose(got[:, k], images[:, t:t + 64, left:left + 64] * 2 - 1,
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="leaves"):
        crops(images, cfg, ((37, 0),))


def test_uniform_offsets_follow_pyiqa_grid():
    """pyiqa's 20 crops of a 512 x 512 image: a 5 x 5 grid of step (512 - 224) // 4 = 72,
    cut after 4 rows; a 224 x 300 image is upscaled to 225 x 301 first."""
    grid = uniform_offsets(512, 512, 224, 20)
    assert grid == tuple((72 * i, 72 * j) for i in range(4) for j in range(5))
    assert uniform_offsets(224, 300, 224, 20)[:6] == ((0, 0), (0, 19), (0, 38), (0, 57),
                                                      (0, 76), (0, 0))


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_release_sizes_match_reference(tmp_path):
    """pyiqa's MANIQA() with the `maniqa` metric's arguments end to end, one crop: the
    ViT-B/8 trunk (12 blocks of 768, 785 tokens), 784-wide TABlocks, Swin stages of 768
    and 384 on the 28 x 28 map in 7 x 7 windows. pyiqa's 20 crops would take minutes on
    a CPU; one crop of a 240 x 260 image sits at (0, 0)."""
    torch.manual_seed(3)
    model = TorchMANIQA(test_sample=1).eval()
    # At this width a 3x score gain would push every token below the ReLU.
    _randomize(model, 4, score_gain=0.1)
    path = tmp_path / RELEASE_NAME
    torch.save(model.state_dict(), path)
    config, params = convert([path], test_sample=1)
    assert config == ManiqaConfig(test_sample=1).to_dict()
    assert sum(np.size(v) for v in _leaves(params)) == sum(
        p.numel() for p in model.parameters())
    images = _photos(240, 260)[:1]
    _check_scores(np.asarray(maniqa(params, images, config=config)),
                  _torch_scores(model, images), distinct=False)


def test_conversion_is_strict(tiny, tmp_path):
    _, path, _ = tiny
    state = torch.load(path, weights_only=True)
    bias = "tablock2.1.c_k.bias"
    mask = "swintransformer2.layers.1.blocks.1.attn_mask"
    index = "swintransformer1.layers.0.blocks.1.attn.relative_position_index"
    del state[bias], state[mask]
    state[index] = state[index].flip(0)
    state["conv3.weight"] = torch.zeros(1)
    state["conv1.bias"] = torch.zeros(33)
    broken = tmp_path / RELEASE_NAME
    torch.save({"params": state}, broken)
    with pytest.raises(ConversionError) as e:
        convert([broken], vit_heads=2, taps=TINY["taps"])
    # A misshaped tensor also leaves its leaf unfilled, so it is listed as missing too.
    assert sorted(e.value.missing) == ["conv1.bias", mask, bias]
    assert e.value.unexpected == ["conv3.weight"]
    assert e.value.mismatched == ["conv1.bias: [33] vs [32]",
                                  f"{index}: values differ from the buffer pyiqa computes"]
    assert RELEASE_NAME in str(e.value)


def test_converted_weights_survive_the_cache(tiny, tmp_path):
    """What `jaxsr eval` stores and reloads: the config as JSON, every array unchanged."""
    _, path, (config, params) = tiny
    save_converted(tmp_path / "maniqa", {"maniqa": (config, params)}, sources=[path])
    loaded_config, loaded = load_converted(tmp_path / "maniqa")["maniqa"]
    assert ManiqaConfig.from_dict(loaded_config) == ManiqaConfig(**TINY)
    flat, back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(loaded)
    assert flat.keys() == back.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(back[key], value, err_msg="/".join(key))
