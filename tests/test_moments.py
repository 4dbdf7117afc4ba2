"""Norm statistics on flat and offset inputs: jaxsr's float32 GroupNorm, LayerNorm and
VAE encoder against float64, within PyTorch's float32 error on the same inputs.

A flat map is what the VAE sees of CoSeR's gray tiled-mode reference or of a
constant border: there a float32 mean's summation error is all GroupNorm returns
(error / √eps), so jaxsr must sum at least as accurately as PyTorch does.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsr.convert.networks import load_vae
from jaxsr.models.vae import AutoencoderKL, VAEConfig
from jaxsr.nn.layers import GroupNorm, LayerNorm
from jaxsr.nn.moments import moments
from tests.parity import nchw_to_nhwc, torch_state
from tests.test_unet import randomize_
from tests.test_vae import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(shape):
    rng = np.random.default_rng(0)
    return {
        "flat": np.full(shape, 0.7, np.float32),
        "flat-negative": np.full(shape, -0.31372549, np.float32),
        "offset": (10.0 + 1e-3 * rng.standard_normal(shape)).astype(np.float32),
        "activations": (3.0 + rng.standard_normal(shape)).astype(np.float32),
    }


def _max_err(x, ref):
    return float(np.abs(np.asarray(x, np.float64) - ref).max())


@pytest.mark.parametrize("case", ["flat", "flat-negative", "offset", "activations"])
def test_group_norm_is_as_accurate_as_pytorch(case):
    """[1, 128, 128, 64] in 32 groups: 32,768 values per group."""
    x = _inputs((1, 128, 128, 64))[case]
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    want = torch.nn.functional.group_norm(xt.double(), 32, eps=1e-6).numpy()
    torch_err = _max_err(torch.nn.functional.group_norm(xt, 32, eps=1e-6).numpy(), want)
    norm = GroupNorm(32, 1e-6)
    ours = norm.apply(norm.init(jax.random.key(0), x[:, :1, :1]), jnp.asarray(x))
    err = _max_err(np.asarray(ours).transpose(0, 3, 1, 2), want)
    # Flat inputs normalise to exactly 0 in float64; PyTorch's float32 gives ~1e-5.
    assert err <= max(torch_err, 1e-6), (err, torch_err)


@pytest.mark.parametrize("case", ["flat", "offset", "activations"])
def test_layer_norm_is_as_accurate_as_pytorch(case):
    """[4, 77, 4096]: a wide feature axis, where a sequential sum drifts most."""
    x = _inputs((4, 77, 4096))[case]
    want = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (4096,),
                                          eps=1e-5).numpy()
    torch_err = _max_err(torch.nn.functional.layer_norm(torch.from_numpy(x), (4096,),
                                                        eps=1e-5).numpy(), want)
    norm = LayerNorm(1e-5)
    ours = norm.apply(norm.init(jax.random.key(0), x[:1, :1]), jnp.asarray(x))
    err = _max_err(ours, want)
    assert err <= max(torch_err, 1e-6), (err, torch_err)


def test_moments_gradients_are_the_plain_formulas():
    """The shift is a constant to autodiff: d(mean)/dx = 1/N, d(var)/dx = 2(x − μ)/N."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32))
    g_mean = jax.grad(lambda v: moments(v, (1,))[0].sum())(x)
    g_var = jax.grad(lambda v: moments(v, (1,))[1].sum())(x)
    np.testing.assert_allclose(g_mean, np.full((3, 50), 1 / 50), rtol=1e-6)
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(g_var, 2 * (xn - xn.mean(1, keepdims=True)) / 50,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [0.0, 0.37], ids=["gray", "constant"])
def test_vae_encoder_on_a_flat_image(value):
    """A constant 256² image through the tiny SD-layout VAE encoder (18 GroupNorms over
    up to 131,072 values per group) vs diffusers in float64.

    Every GroupNorm here sees a nearly flat map (constant inside, a band at the
    border from the zero padding), the case a float32 running sum gets wrong. Each
    norm alone is now within a rounding of PyTorch's float32 result, so what is
    left is float32 noise of the convolutions, of PyTorch's size: the bound is twice
    PyTorch's own error. (With plain float32 means the gray case measured 7.1e-5,
    61× PyTorch's 1.2e-6.)"""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    randomize_(ref, seed=1)
    cfg = VAEConfig.from_diffusers_config(dict(ref.config))
    params = load_vae(torch_state(ref), cfg)
    image = np.full((1, 3, 256, 256), value, np.float32)
    with torch.no_grad():
        torch32 = ref.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
        want = ref.double().encode(torch.from_numpy(image).double()).latent_dist.mean.numpy()
    ours = AutoencoderKL(cfg).apply({"params": params}, jnp.asarray(nchw_to_nhwc(image)),
                                    method="encode").mean
    scale = float(np.abs(want).max())
    err = _max_err(np.asarray(ours).transpose(0, 3, 1, 2), want) / scale
    torch_err = _max_err(torch32, want) / scale
    assert err <= 2 * torch_err, (err, torch_err)
