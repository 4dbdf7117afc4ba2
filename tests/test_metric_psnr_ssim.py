"""PSNR / SSIM against a float64 numpy port of BasicSR (tests/basicsr_reference.py) on
real photos and degraded copies of them."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

from jaxsr.metrics.psnr_ssim import psnr, ssim
from tests import basicsr_reference as ref

# One crop size for every photo so they batch together; not square, so a height/width
# mix-up in the cropping or the window cannot pass.
H, W = 128, 160


def _photo(name: str) -> np.ndarray:
    img = getattr(skimage.data, name)()
    return np.ascontiguousarray(img[:H, :W, :3])


def _bicubic_x4(img):
    small = Image.fromarray(img).resize((W // 4, H // 4), Image.BICUBIC)
    return np.asarray(small.resize((W, H), Image.BICUBIC))


def _jpeg(img, quality=20):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _noisy(img, seed=0):
    noise = np.random.default_rng(seed).normal(0, 8, img.shape)
    return np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pairs():
    """(sr, hr) uint8 batches: three photos, each under three degradations."""
    hr, sr = [], []
    for name in ("astronaut", "chelsea", "coffee"):
        img = _photo(name)
        for degrade in (_bicubic_x4, _jpeg, _noisy):
            hr.append(img)
            sr.append(degrade(img))
    return np.stack(sr), np.stack(hr)


def _reference(fn, sr, hr, crop_border, y_channel):
    # BasicSR reads images with cv2.imread, i.e. in BGR order.
    return np.array([fn(s[..., ::-1], h[..., ::-1], crop_border, test_y_channel=y_channel)
                     for s, h in zip(sr, hr)])


@pytest.mark.parametrize("crop_border,y_channel", [(4, True), (4, False), (0, False)])
def test_psnr_ssim_match_basicsr(pairs, crop_border, y_channel):
    sr, hr = pairs
    got_psnr = np.asarray(psnr(sr, hr, crop_border=crop_border, y_channel=y_channel))
    got_ssim = np.asarray(ssim(sr, hr, crop_border=crop_border, y_channel=y_channel))
    want_psnr = _reference(ref.calculate_psnr, sr, hr, crop_border, y_channel)
    want_ssim = _reference(ref.calculate_ssim, sr, hr, crop_border, y_channel)
    assert got_psnr.shape == got_ssim.shape == (len(sr),)
    assert got_psnr.dtype == got_ssim.dtype == np.float32
    # The scores are float32: PSNR is compared relatively (one float32 step at 30 dB is
    # 1.9e-6 dB), SSIM absolutely.
    np.testing.assert_allclose(got_psnr, want_psnr, rtol=2e-7, atol=0)
    np.testing.assert_allclose(got_ssim, want_ssim, rtol=0, atol=1e-6)
    # The degradations span a useful range, so agreement is not agreement on a constant.
    assert np.ptp(want_psnr) > 2 and np.ptp(want_ssim) > 0.05


def test_float_input_is_rounded_to_8_bit_levels(pairs):
    """Float [0, 1] images score as the uint8 images they round to (BasicSR's tensor2img)."""
    sr, hr = pairs[0][:2], pairs[1][:2]
    jitter = np.random.default_rng(1).uniform(-0.4, 0.4, sr.shape) / 255.0
    sr_float = (sr / 255.0 + jitter).astype(np.float32)
    hr_float = (hr / 255.0).astype(np.float32)
    for fn in (psnr, ssim):
        np.testing.assert_array_equal(
            np.asarray(fn(sr_float, hr_float, crop_border=4, y_channel=True)),
            np.asarray(fn(sr, hr, crop_border=4, y_channel=True)))


def test_identical_images():
    img = _photo("astronaut")[None]
    assert np.isinf(np.asarray(psnr(img, img, crop_border=4, y_channel=True))[0])
    np.testing.assert_allclose(np.asarray(ssim(img, img, crop_border=4, y_channel=True)),
                               [1.0], atol=1e-6)


def test_bad_shapes_are_refused():
    a = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, jnp.zeros((1, 32, 30, 3), jnp.uint8), crop_border=0, y_channel=False)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(a, a, crop_border=16, y_channel=False)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a, crop_border=11, y_channel=False)


def test_held_out_metrics_for_training(pairs):
    """The training loop's evaluator: batch means of the same functions; a metric that
    needs weights is left out (with a note) when no weights folder is set."""
    from jaxsr.metrics.registry import HeldOutMetrics

    notes = []
    metrics = HeldOutMetrics(["psnr", "ssim", "lpips"], None, crop_border=4, y_channel=True,
                             note=notes.append)
    assert metrics.names == ["psnr", "ssim"]
    assert len(notes) == 1 and "lpips" in notes[0] and "jaxsr convert --metric lpips" in notes[0]
    sr, hr = pairs
    got = metrics(sr, hr)
    for fn in (psnr, ssim):
        want = np.mean(np.asarray(fn(sr, hr, crop_border=4, y_channel=True), np.float64))
        assert got[fn.__name__] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="fid compares whole folders"):
        HeldOutMetrics(["fid"])
