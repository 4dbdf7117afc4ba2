"""Colour fixes against a PyTorch transcription of SeeSR's description (NCHW, F.conv2d)."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxsr.diffusion.colorfix import (
    adain_color_fix,
    color_fix,
    to_uint8_round,
    to_uint8_truncate,
    wavelet_color_fix,
)
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err

# ---- PyTorch reference, written from the description --------------------------------


def torch_adain(content, style):
    def stats(t):
        b, c = t.shape[:2]
        flat = t.reshape(b, c, -1)
        std = (flat.var(dim=2, unbiased=True) + 1e-5).sqrt().reshape(b, c, 1, 1)
        return flat.mean(dim=2).reshape(b, c, 1, 1), std

    s_mean, s_std = stats(style)
    c_mean, c_std = stats(content)
    return (content - c_mean) / c_std * s_std + s_mean


def torch_blur(img, radius):
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    c = img.shape[1]
    k = k[None, None].repeat(c, 1, 1, 1)
    img = F.pad(img, (radius,) * 4, mode="replicate")
    return F.conv2d(img, k, groups=c, dilation=radius)


def torch_wavelet(content, style, levels=5):
    def decompose(img):
        high = torch.zeros_like(img)
        for i in range(levels):
            low = torch_blur(img, 2**i)
            high += img - low
            img = low
        return high, low

    return decompose(content)[0] + decompose(style)[1]


def _images(shape, seed, quantised=True):
    rng = np.random.default_rng(seed)
    if quantised:  # what the reference feeds: PIL uint8 / 255
        return (rng.integers(0, 256, shape).astype(np.float32) / 255).astype(np.float32)
    return rng.uniform(-0.2, 1.2, shape).astype(np.float32)


@pytest.mark.parametrize("shape,quantised", [((2, 37, 53, 3), True), ((1, 20, 70, 3), False)])
def test_wavelet_matches_torch(shape, quantised):
    sr, lr = _images(shape, 0, quantised), _images(shape, 1, quantised)
    lr = 0.7 * lr + 0.2  # a different colour cast, so the fix does something
    got = np.asarray(jax.jit(wavelet_color_fix)(sr, lr))
    want = nchw_to_nhwc(torch_wavelet(torch.from_numpy(nhwc_to_nchw(sr).copy()),
                                      torch.from_numpy(nhwc_to_nchw(lr).copy())).numpy())
    assert np.max(np.abs(got - want)) <= 1e-5
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("shape,quantised", [((2, 37, 53, 3), True), ((1, 64, 48, 3), False)])
def test_adain_matches_torch(shape, quantised):
    sr, lr = _images(shape, 2, quantised), _images(shape, 3, quantised)
    lr = 0.5 * lr + 0.3
    got = np.asarray(jax.jit(adain_color_fix)(sr, lr))
    want = nchw_to_nhwc(torch_adain(torch.from_numpy(nhwc_to_nchw(sr).copy()),
                                    torch.from_numpy(nhwc_to_nchw(lr).copy())).numpy())
    assert np.max(np.abs(got - want)) <= 1e-5
    assert rel_err(got, want) <= 1e-5


def test_adain_on_flat_channel_stays_finite():
    sr = np.full((1, 8, 8, 3), 0.5, np.float32)  # zero variance: the 1e-5 keeps it finite
    lr = _images((1, 8, 8, 3), 4)
    assert np.isfinite(np.asarray(adain_color_fix(sr, lr))).all()


def test_wavelet_of_identical_images_is_identity():
    x = _images((1, 40, 40, 3), 5)
    np.testing.assert_allclose(np.asarray(wavelet_color_fix(x, x)), x, atol=2e-6)


def test_color_fix_dispatch():
    sr, lr = _images((1, 16, 16, 3), 6), _images((1, 16, 16, 3), 7)
    np.testing.assert_array_equal(np.asarray(color_fix(sr, lr, "nofix")), sr)
    np.testing.assert_array_equal(np.asarray(color_fix(sr, lr, "adain")),
                                  np.asarray(adain_color_fix(sr, lr)))
    with pytest.raises(ValueError):
        color_fix(sr, lr, "histogram")


def test_uint8_conversions_match_torch():
    x = np.concatenate([np.random.default_rng(8).uniform(-0.3, 1.3, 4000),
                        np.arange(256) / 255, [0.5 / 255, 1.5 / 255, 254.5 / 255]]
                       ).astype(np.float32)
    t = torch.from_numpy(x)
    # torchvision ToPILImage on a float tensor: pic.mul(255).byte(), after the reference's clamp_
    truncated = t.clamp(0.0, 1.0).mul(255).byte().numpy()
    np.testing.assert_array_equal(np.asarray(to_uint8_truncate(x)), truncated)
    # diffusers numpy_to_pil: (images * 255).round().astype("uint8") after clamp
    rounded = (np.clip(x, 0, 1) * np.float32(255)).round().astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_uint8_round(x)), rounded)
    assert (truncated != rounded).any()
