"""Resize kernels against PyTorch's F.interpolate and PIL."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jaxsr.data.resize import pil_bicubic, seesr_upscale_input, seesr_upscale_sizes
from jaxsr.nn.resize import torch_resize_bicubic, torch_resize_bilinear
from tests.parity import nchw_to_nhwc

# (in_h, in_w) -> (out_h, out_w): up, down, odd, mixed, identity, to/from 1 pixel
CASES = [
    ((17, 23), (40, 61)),
    ((64, 48), (23, 17)),
    ((33, 35), (384, 384)),
    ((101, 7), (13, 29)),
    ((9, 9), (9, 9)),
    ((1, 5), (3, 1)),
    ((250, 130), (384, 384)),
]


def _torch_ref(x_nhwc, size, mode):
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))
    y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=False)
    return nchw_to_nhwc(y.numpy())


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("in_hw,out_hw", CASES)
def test_matches_torch_interpolate(mode, in_hw, out_hw):
    rng = np.random.default_rng(sum(in_hw) * 31 + sum(out_hw))
    x = rng.uniform(-1, 2, (2, *in_hw, 3)).astype(np.float32)
    fn = torch_resize_bilinear if mode == "bilinear" else torch_resize_bicubic
    got = np.asarray(jax.jit(fn, static_argnums=1)(x, out_hw))
    want = _torch_ref(x, out_hw, mode)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5


def test_bicubic_is_not_jax_image_resize():
    """Guards the reason this module exists: jax's cubic is a different kernel."""
    x = np.random.default_rng(0).uniform(0, 1, (1, 16, 16, 1)).astype(np.float32)
    ours = np.asarray(torch_resize_bicubic(x, (40, 40)))
    theirs = np.asarray(jax.image.resize(x, (1, 40, 40, 1), "cubic"))
    assert np.max(np.abs(ours - theirs)) > 1e-3


def test_bfloat16_keeps_dtype():
    x = np.random.default_rng(1).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    y = torch_resize_bilinear(jax.numpy.asarray(x, jax.numpy.bfloat16), (5, 12))
    assert y.dtype == jax.numpy.bfloat16 and y.shape == (1, 5, 12, 3)


@pytest.mark.parametrize("size", [(64, 52), (9, 31), (13, 13)])
def test_pil_bicubic_is_pil_default_resize(size):
    arr = np.random.default_rng(2).integers(0, 256, (13, 16, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(arr).resize(size))  # the reference's call, default filter
    got = pil_bicubic(arr, size)
    assert got.dtype == np.uint8 and got.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pil_bicubic(Image.fromarray(arr), size), want)


def test_pil_bicubic_rejects_float_arrays():
    with pytest.raises(TypeError):
        pil_bicubic(np.zeros((4, 4, 3), np.float32), (8, 8))


def _reference_sizes(w, h, rscale=4, process_size=512):
    """Direct transcription of test_seesr.py's size arithmetic."""
    out = []
    if w < process_size // rscale or h < process_size // rscale:
        scale = (process_size // rscale) / min(w, h)
        w, h = int(scale * w), int(scale * h)
        out.append((w, h))
    w, h = w * rscale, h * rscale
    out.append((w, h))
    out.append((w // 8 * 8, h // 8 * 8))
    return out


@pytest.mark.parametrize("wh", [(128, 128), (100, 300), (301, 97), (513, 257), (127, 1000)])
def test_seesr_upscale_sizes(wh):
    assert seesr_upscale_sizes(*wh) == _reference_sizes(*wh)


def test_seesr_upscale_input_small_image():
    arr = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.resize((128 * 70 // 50, 128))  # 128/50 scale, int() truncation -> (179, 128)
    img = img.resize((img.width * 4, img.height * 4))
    img = img.resize((img.width // 8 * 8, img.height // 8 * 8))
    got = seesr_upscale_input(arr)
    assert got.shape == (512, 712, 3)
    np.testing.assert_array_equal(got, np.asarray(img))
