"""Second-order degradations (jaxsr/data/degrade): each stage against an independent computation.

References: numpy formulas for the kernels and USM, a numerical integral for J1,
PyTorch `F.conv2d`/`F.interpolate` for blur and resize, PIL (libjpeg) for JPEG,
sample statistics for the noise. The pipeline is checked for its invariants.
"""

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jaxsr.data.degrade import REALESRGAN, SEESR, degrade
from jaxsr.data.degrade.blur import blur
from jaxsr.data.degrade.canvas import reflect_index, replicate_edges
from jaxsr.data.degrade.jpeg import jpeg, quality_tables
from jaxsr.data.degrade.kernels import (
    _choose,
    _odd_size,
    bessel_j1,
    gaussian_kernel,
    generalized_gaussian_kernel,
    plateau_kernel,
    random_final_sinc,
    random_kernel,
    sinc_kernel,
)
from jaxsr.data.degrade.noise import gaussian_noise, poisson_noise
from jaxsr.data.degrade.resize import AREA, BICUBIC, BILINEAR, resize
from jaxsr.data.degrade.usm import usm_sharpen
from tests.parity import nhwc_to_nchw, rel_err

MODES = {"area": AREA, "bilinear": BILINEAR, "bicubic": BICUBIC}


def natural_image(h=64, w=64):
    """Smooth gradients, a sinusoid, hard-edged patches and mild texture: [h, w, 3] in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w], np.float64)[:, None, None]
    img = np.stack([0.2 + 0.6 * xx, 0.5 + 0.3 * np.sin(6 * yy), 0.8 - 0.5 * xx * yy], -1)
    img[h // 4: h // 2, w // 3: 2 * w // 3] = [0.9, 0.2, 0.1]
    img[(xx + yy > 1.2) & (xx - yy < 0.1)] = [0.1, 0.1, 0.6]
    img += 0.03 * np.sin(40 * xx + 25 * yy)[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- kernels


def j1_integral(x):
    """J1(x) = (1/2π) ∫_{−π}^{π} cos(τ − x sin τ) dτ; the trapezoid rule on a full period
    of a smooth periodic integrand converges exponentially (float64, 4096 points)."""
    tau = np.linspace(-np.pi, np.pi, 4096, endpoint=False)
    return np.mean(np.cos(tau[None, :] - np.asarray(x, np.float64)[:, None] * np.sin(tau)), axis=1)


def test_bessel_j1_matches_integral():
    # The sinc kernel evaluates J1 at ω·r ≤ π·10·√2 ≈ 44.4.
    x = np.concatenate([np.linspace(-5, 0, 101), np.linspace(0, 46, 2001)])
    err = np.abs(np.asarray(bessel_j1(x), np.float64) - j1_integral(x)).max()
    assert err < 1e-6, err


def grid(size):
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    return np.meshgrid(ax, ax)  # x: column offset, y: row offset


def pad21(kernel):
    p = (21 - kernel.shape[0]) // 2
    return np.pad(kernel, p)


def numpy_quadratic(size, sx, sy, theta):
    """[x y] Σ⁻¹ [x y]ᵀ with Σ built and inverted as matrices."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inv = np.linalg.inv(rot @ np.diag([sx * sx, sy * sy]) @ rot.T)
    x, y = grid(size)
    xy = np.stack([x, y], -1)
    return np.einsum("...i,ij,...j->...", xy, inv, xy)


@pytest.mark.parametrize("sigma,size", [(0.2, 7), (1.3, 13), (3.0, 21)])
def test_isotropic_kernel_equals_numpy_gaussian(sigma, size):
    x, y = grid(size)
    ref = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    ref = pad21(ref / ref.sum())
    ours = np.asarray(gaussian_kernel(sigma, sigma, 0.0, size))
    assert ours.shape == (21, 21) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.parametrize("shape", ["aniso", "generalized", "plateau"])
def test_anisotropic_kernels_match_numpy(shape):
    size, sx, sy, theta, beta = 15, 2.7, 0.6, 0.9, 0.7
    q = numpy_quadratic(size, sx, sy, theta)
    if shape == "aniso":
        ref, ours = np.exp(-0.5 * q), gaussian_kernel(sx, sy, theta, size)
    elif shape == "generalized":
        ref, ours = np.exp(-0.5 * q ** beta), generalized_gaussian_kernel(sx, sy, theta, beta, size)
    else:
        ref, ours = 1 / (q ** 1.6 + 1), plateau_kernel(sx, sy, theta, 1.6, size)
    ref = pad21(ref / ref.sum())
    assert rel_err(ours, ref) < 1e-5
    # Anisotropy is not symmetric under transposition unless θ is a multiple of π/2.
    assert np.abs(np.asarray(ours) - np.asarray(ours).T).max() > 1e-3


@pytest.mark.parametrize("omega,size", [(math.pi / 3, 7), (2.0, 15), (math.pi, 21)])
def test_sinc_kernel_matches_numpy(omega, size):
    x, y = grid(size)
    r = np.sqrt(x * x + y * y)
    safe = np.where(r == 0, 1, r)
    ref = omega * j1_integral((omega * safe).ravel()).reshape(r.shape) / (2 * np.pi * safe)
    ref = np.where(r == 0, omega ** 2 / (4 * np.pi), ref)
    ref = pad21(ref / ref.sum())
    assert rel_err(sinc_kernel(omega, size), ref) < 1e-5


def _support_size(kernel):
    """Side of the centred square holding the nonzero values."""
    rows = np.flatnonzero(np.abs(kernel).sum(axis=1) > 0)
    cols = np.flatnonzero(np.abs(kernel).sum(axis=0) > 0)
    return 2 * max(10 - rows[0], rows[-1] - 10, 10 - cols[0], cols[-1] - 10) + 1


@pytest.mark.parametrize("which", ["kernel1", "kernel2", "final"])
def test_random_kernels_sum_to_one_with_odd_sizes(which):
    n = 4000
    keys = jax.random.split(jax.random.key(3), n)
    if which == "final":
        # The probability is traced so that the pulse case below reuses the compile.
        sample = jax.jit(jax.vmap(random_final_sinc, in_axes=(0, None)))
        kernels = np.asarray(sample(keys, 1.0))
        pulse = np.zeros((21, 21), np.float32)
        pulse[10, 10] = 1
        assert np.array_equal(np.asarray(sample(keys[:8], 0.0)), np.stack([pulse] * 8))
    else:
        sample = lambda k: random_kernel(k, getattr(SEESR, which))
        kernels = np.asarray(jax.jit(jax.vmap(sample))(keys))
    assert kernels.shape == (n, 21, 21) and np.isfinite(kernels).all()
    np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 1.0, atol=1e-5)
    # Every type is point-symmetric: k(x, y) = k(−x, −y).
    np.testing.assert_allclose(kernels, kernels[:, ::-1, ::-1], atol=1e-7)
    if which == "final":
        # A sinc has no zeros on the grid inside its support: the support is the drawn
        # size, uniform over 7, 9, ..., 21 (500 expected each, σ ≈ 21).
        sizes = np.array([_support_size(k) for k in kernels])
        counts = np.array([(sizes == s).sum() for s in range(7, 22, 2)])
        assert counts.sum() == n
        assert np.all(np.abs(counts - n / 8) < 100), counts


def test_odd_sizes_are_uniform():
    n = 8000
    u = jnp.asarray((np.arange(n) + 0.5) / n, jnp.float32)
    sizes = np.asarray(jax.vmap(lambda v: _odd_size(v, (7, 21)))(u))
    counts = np.array([(sizes == s).sum() for s in range(7, 22, 2)])
    assert counts.sum() == n and np.all(np.abs(counts - n / 8) <= 1), counts


def test_kernel_type_choice_follows_probabilities():
    # Evenly spaced u in [0, 1): the fraction of each index is its probability up to 1/n.
    n = 10000
    u = (np.arange(n) + 0.5) / n
    probs = SEESR.kernel1.type_probs
    idx = np.asarray(jax.vmap(lambda v: _choose(v, probs))(jnp.asarray(u, jnp.float32)))
    freq = np.bincount(idx, minlength=len(probs)) / n
    np.testing.assert_allclose(freq, probs, atol=2 / n)


# ------------------------------------------------------------------------ blur, resize


def test_reflect_index_matches_numpy_pad():
    for n in (2, 3, 9, 20):
        idx = np.arange(-25, n + 25)
        ref = np.pad(np.arange(n), 25, mode="reflect")
        assert np.array_equal(np.asarray(reflect_index(idx, n)), ref), n


def test_blur_matches_torch_reflect_conv():
    rng = np.random.default_rng(0)
    kernel = np.array(gaussian_kernel(2.5, 0.8, 0.6, 17))
    canvas = rng.uniform(0, 1, (48, 56, 3)).astype(np.float32)
    canvas[33:] = 1e3  # beyond the valid region: must not leak into it
    canvas[:, 37:] = -1e3
    valid = canvas[:33, :37]
    t = torch.from_numpy(nhwc_to_nchw(valid[None]).copy())
    padded = F.pad(t, (10, 10, 10, 10), mode="reflect")
    ref = F.conv2d(padded, torch.from_numpy(kernel)[None, None].repeat(3, 1, 1, 1), groups=3)
    ref = ref.numpy()[0].transpose(1, 2, 0)
    ours = np.asarray(blur(jnp.asarray(canvas), jnp.asarray(kernel), (33, 37)))
    assert rel_err(ours[:33, :37], ref) < 1e-6
    # The whole image as the valid region (the first blur of the pipeline).
    full = np.asarray(blur(jnp.asarray(valid), jnp.asarray(kernel)))
    assert rel_err(full, ref) < 1e-6


def _garbage_canvas(image, canvas_hw):
    out = np.full(canvas_hw + (3,), 7.0, np.float32)
    out[: image.shape[0], : image.shape[1]] = image
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("factor", [0.3, 0.5, 0.75, 1.0, 1.25, 1.5])
def test_resize_with_scale_factor_matches_torch(mode, factor):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (40, 44, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(nhwc_to_nchw(image[None]).copy()),
                        scale_factor=factor, mode=mode)
    ref = ref.numpy()[0].transpose(1, 2, 0)
    out_hw = ref.shape[:2]
    assert out_hw == (math.floor(40 * factor), math.floor(44 * factor))
    canvas = _garbage_canvas(image, (48, 48))
    step = np.float32(1.0 / factor)
    ours = np.asarray(resize(jnp.asarray(canvas), MODES[mode], (40, 44), out_hw, (step, step),
                             (64, 80)))
    assert ours.shape == (64, 80, 3)
    assert rel_err(ours[: out_hw[0], : out_hw[1]], ref) < 2e-6
    # Beyond the output's valid region: copies of the last valid row / column.
    assert np.array_equal(ours, ours[np.minimum(np.arange(64), out_hw[0] - 1)]
                          [:, np.minimum(np.arange(80), out_hw[1] - 1)])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("out_hw", [(16, 16), (19, 23), (57, 50)])
def test_resize_to_size_matches_torch(mode, out_hw):
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 1, (37, 41, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(nhwc_to_nchw(image[None]).copy()), size=out_hw,
                        mode=mode)
    ref = ref.numpy()[0].transpose(1, 2, 0)
    step = (np.float32(37) / np.float32(out_hw[0]), np.float32(41) / np.float32(out_hw[1]))
    ours = np.asarray(resize(jnp.asarray(_garbage_canvas(image, (48, 48))), MODES[mode],
                             (37, 41), out_hw, step, (64, 64)))
    assert rel_err(ours[: out_hw[0], : out_hw[1]], ref) < 2e-6


def test_replicate_edges():
    x = np.arange(5 * 6 * 1, dtype=np.float32).reshape(5, 6, 1)
    out = np.asarray(replicate_edges(jnp.asarray(x), (3, 4)))
    ref = np.pad(x[:3, :4], ((0, 2), (0, 2), (0, 0)), mode="edge")
    assert np.array_equal(out, ref)


# ------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("sigma", [1.0, 10.0, 30.0])
def test_gaussian_noise_std_matches_sigma(sigma):
    shape = (192, 192, 3)
    color = np.asarray(gaussian_noise(jax.random.key(0), shape, sigma / 255, False))
    gray = np.asarray(gaussian_noise(jax.random.key(1), shape, sigma / 255, True))
    for noise in (color, gray):
        # 110592 samples: the sample std is within ~0.2 % of σ (1σ).
        assert abs(noise.std() / (sigma / 255) - 1) < 0.02
        assert abs(noise.mean()) < 0.02 * sigma / 255
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    assert abs(np.corrcoef(color[..., 0].ravel(), color[..., 1].ravel())[0, 1]) < 0.02


def test_poisson_noise_levels_and_variance():
    # Three 8-bit levels in the valid region → v = 2^⌈log2 3⌉ = 4; other levels outside it.
    levels = np.array([51, 128, 204])
    image = np.zeros((96, 96, 3), np.float32)
    for i, level in enumerate(levels):
        image[:, 32 * i: 32 * (i + 1)] = level / 255
    image[90:, :] = 0.333  # beyond the valid region (90, 96): not counted
    scale = 1.7
    noise = np.asarray(poisson_noise(jax.random.key(0), jnp.asarray(image), scale, False, (90, 96)))
    quantised = np.round(image * 255) / 255
    counts = (noise / scale + quantised) * 4  # Poisson(4·x_q) samples
    valid = counts[:90]
    assert np.abs(valid - np.round(valid)).max() < 1e-3
    assert valid.min() > -1e-3
    for i, level in enumerate(levels):
        region = noise[:90, 32 * i: 32 * (i + 1)] / scale
        lam = 4 * level / 255
        # Mean 0 and variance x_q/v (Poisson: variance = mean); 8640 samples each.
        assert abs(region.mean()) < math.sqrt(lam / region.size)  # 4σ of counts/4
        assert abs(region.var() / (lam / 16) - 1) < 0.08


def test_poisson_noise_many_levels_uses_256():
    ramp = np.linspace(0, 1, 96 * 96 * 3, dtype=np.float32).reshape(96, 96, 3)
    quantised = np.round(ramp * 255) / 255
    noise = np.asarray(poisson_noise(jax.random.key(2), jnp.asarray(ramp), 1.0, False))
    counts = (noise + quantised) * 256
    assert np.abs(counts - np.round(counts)).max() < 2e-3
    # E[noise²] = E[x_q] / 256.
    assert abs(np.mean(noise ** 2) / (quantised.mean() / 256) - 1) < 0.03


def test_gray_poisson_noise_is_shared_and_uses_luminance():
    image = natural_image(96, 96)
    noise = np.asarray(poisson_noise(jax.random.key(4), jnp.asarray(image), 2.0, True))
    assert np.array_equal(noise[..., 0], noise[..., 1]) and np.array_equal(noise[..., 1],
                                                                          noise[..., 2])
    luma = np.round((image @ np.array([0.2989, 0.587, 0.114], np.float32)) * 255) / 255
    vals = 2 ** math.ceil(math.log2(len(np.unique(np.round(luma * 255)))))
    counts = (noise[..., 0] / 2.0 + luma) * vals
    assert np.abs(counts - np.round(counts)).max() < 2e-3


# -------------------------------------------------------------------------------- JPEG


def pil_jpeg(image_u8, quality):
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    decoded = Image.open(buf)
    return np.asarray(decoded.convert("RGB")).astype(np.float64) / 255, decoded.quantization


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


@pytest.mark.parametrize("quality", [30, 50, 75, 95, 100])
def test_jpeg_tables_equal_libjpeg(quality):
    _, tables = pil_jpeg(np.zeros((16, 16, 3), np.uint8), quality)
    luma, chroma = quality_tables(quality)
    assert np.array_equal(np.asarray(luma), np.array(tables[0]).reshape(8, 8))
    assert np.array_equal(np.asarray(chroma), np.array(tables[1]).reshape(8, 8))


@pytest.mark.parametrize("quality", [30, 60, 95])
@pytest.mark.parametrize("hw", [(64, 64), (40, 56)])
def test_jpeg_close_to_pil(quality, hw):
    """Stated tolerance: PSNR(ours, PIL decode) ≥ 35 dB, and ours is at least 8 dB
    closer to PIL's decode than the uncompressed input is (measured: 41-46 dB vs 24-30)."""
    image_u8 = np.round(natural_image(*hw) * 255).astype(np.uint8)
    x = image_u8.astype(np.float32) / 255
    ref, _ = pil_jpeg(image_u8, quality)
    ours = np.asarray(jax.jit(jpeg)(jnp.asarray(x), quality))
    assert ours.shape == x.shape and ours.min() >= 0 and ours.max() <= 1
    assert psnr(ours, ref) >= 35
    assert psnr(ours, ref) >= psnr(x, ref) + 8


# --------------------------------------------------------------------------------- USM


def numpy_usm(img, weight=0.5, threshold=10, ksize=51):
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    assert abs(sigma - 8.0) < 1e-12
    ax = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-ax ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    k2 = np.outer(g, g)
    p = ksize // 2

    def blur2d(x):
        padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (ksize, ksize), axis=(0, 1))
        return np.einsum("hwcij,ij->hwc", windows, k2)

    img = img.astype(np.float64)
    residual = img - blur2d(img)
    mask = (np.abs(residual) * 255 > threshold).astype(np.float64)
    soft = blur2d(mask)
    sharp = np.clip(img + weight * residual, 0, 1)
    return soft * sharp + (1 - soft) * img


def test_usm_matches_numpy():
    image = natural_image(64, 72)
    ref = numpy_usm(image)
    ours = np.asarray(usm_sharpen(jnp.asarray(image[None])))[0]
    assert rel_err(ours, ref) < 1e-5
    assert np.abs(ours - image).max() > 0.02  # it does sharpen


# ---------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def hr_batch():
    img = natural_image(64, 64)
    return jnp.asarray(np.stack([img, img[::-1, ::-1]]))


@pytest.fixture(scope="module")
def jitted():
    return jax.jit(degrade, static_argnums=2)


@pytest.mark.parametrize("preset", [SEESR, REALESRGAN], ids=["seesr", "realesrgan"])
def test_degrade_invariants(jitted, hr_batch, preset):
    outs = [jitted(jax.random.key(i), hr_batch, preset) for i in range(6)]
    for lr, target in outs:
        lr = np.asarray(lr)
        assert lr.shape == (2, 16, 16, 3) and lr.dtype == np.float32
        assert target.shape == (2, 64, 64, 3)
        assert np.isfinite(lr).all() and lr.min() >= 0 and lr.max() <= 1
        assert np.abs(lr * 255 - np.round(lr * 255)).max() < 1e-3  # round_lr: 8-bit levels
        # Degraded but still the same picture: close to the target's 4× area average.
        small = np.asarray(target).reshape(2, 16, 4, 16, 4, 3).mean(axis=(2, 4))
        assert np.abs(lr - small).mean() < 0.2
    # Deterministic for a key; different keys and the two images of a batch differ.
    again = jitted(jax.random.key(0), hr_batch, preset)
    assert np.array_equal(np.asarray(again[0]), np.asarray(outs[0][0]))
    assert not np.array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    same_images = jnp.stack([hr_batch[0], hr_batch[0]])
    lr, _ = jitted(jax.random.key(0), same_images, preset)
    assert not np.array_equal(np.asarray(lr[0]), np.asarray(lr[1]))

    target = np.asarray(outs[0][1])
    if preset.usm_sharpen:
        ref = np.round(np.asarray(usm_sharpen(hr_batch)) * 255) / 255
        assert np.abs(target - ref).max() < 1e-6
    else:
        assert np.array_equal(target, np.asarray(hr_batch))


def test_degrade_rejects_bad_shapes():
    with pytest.raises(ValueError):
        degrade(jax.random.key(0), jnp.zeros((1, 62, 64, 3)), SEESR)
    with pytest.raises(ValueError):
        degrade(jax.random.key(0), jnp.zeros((64, 64, 3)), SEESR)
