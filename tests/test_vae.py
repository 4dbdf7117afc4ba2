"""AutoencoderKL parity with diffusers' PyTorch module (random weights, float32), config
round trips, and the full-size SD2 key listing."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsr.convert.networks import load_vae
from jaxsr.convert.tree import ConversionError
from jaxsr.models.vae import SD2_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig
from tests.keylists import read_listing
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state
from tests.test_unet import randomize_

# Four levels with SD2's width ratios (1, 2, 4, 4), so the shortcut convs sit where
# SD2's do; also used by tests/sd2_fixtures.py.
TINY = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4,
            latent_channels=4, in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    # Every parameter moved off its init, so unit norm scales / zero biases cannot
    # hide a swapped mapping.
    randomize_(ref, seed=1)
    cfg = VAEConfig.from_diffusers_config(dict(ref.config))
    return ref, cfg, load_vae(torch_state(ref), cfg)


# One image and one latent shape for every test: eager `apply` compiles each op once
# per shape, and those compilations dominate the run time on CPU.
def _image(seed):
    """[2, 3, 64, 48] NCHW in [-1, 1]; not square, so a height/width mix-up cannot pass."""
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32)


def _latent(seed):
    """[2, 4, 8, 6] NCHW: the latent shape of `_image`."""
    return np.random.default_rng(seed).standard_normal((2, 4, 8, 6)).astype(np.float32)


def _apply(cfg, params, x, method, dtype=jnp.float32):
    return AutoencoderKL(cfg, dtype=dtype).apply({"params": params}, jnp.asarray(x),
                                                 method=method)


def test_vae_encode_matches_diffusers(tiny_vae):
    ref, cfg, params = tiny_vae
    x, noise = _image(0), _latent(1)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
        want_sample = (dist.mean + dist.std * torch.from_numpy(noise)).numpy()
    post = _apply(cfg, params, nchw_to_nhwc(x), "encode")
    assert isinstance(post, DiagonalGaussian)
    errors = {
        "mean": rel_err(nhwc_to_nchw(post.mean), dist.mean.numpy()),
        "logvar": rel_err(nhwc_to_nchw(post.logvar), dist.logvar.numpy()),
        "std": rel_err(nhwc_to_nchw(post.std), dist.std.numpy()),
        "var": rel_err(nhwc_to_nchw(post.var), dist.var.numpy()),
        "sample": rel_err(nhwc_to_nchw(post.sample_with_noise(nchw_to_nhwc(noise))),
                          want_sample),
    }
    assert max(errors.values()) <= 1e-5, errors
    key = jax.random.key(7)
    drawn = post.sample(key)
    np.testing.assert_array_equal(
        drawn, post.sample_with_noise(jax.random.normal(key, post.mean.shape)))
    assert np.asarray(post.mode()).tobytes() == np.asarray(post.mean).tobytes()


@pytest.mark.parametrize("big", [False, True], ids=["small", "chunked-attention"])
def test_vae_decode_matches_diffusers(tiny_vae, big):
    """A 33×35 latent (1155 pixels) takes the mid-block attention through the
    query-chunked path (with a partial last chunk), as every 512 px image does."""
    ref, cfg, params = tiny_vae
    if big:
        z = np.random.default_rng(2).standard_normal((1, 4, 33, 35)).astype(np.float32)
    else:
        z = _latent(2)
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z)).sample.numpy()
    got = _apply(cfg, params, nchw_to_nhwc(z), "decode")
    assert got.shape == (z.shape[0], 8 * z.shape[2], 8 * z.shape[3], 3)
    assert got.dtype == jnp.float32
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5


def test_vae_call_is_decode_of_mode(tiny_vae):
    ref, cfg, params = tiny_vae
    x = _image(3)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), sample_posterior=False).sample.numpy()
    got = AutoencoderKL(cfg).apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)))
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5


def test_vae_bfloat16_error_is_bounded(tiny_vae):
    """bf16 compute against float32, both ours, within the 2 % the UNet and text
    encoder meet. The VAE rounds only conv/matmul operands to bf16 and keeps the
    activations between convolutions in float32 (measured: decode 1.4 %, encode
    1.0 %); rounding the weights alone to bf16 already costs 1.2 % on decode."""
    _, cfg, params = tiny_vae
    z = nchw_to_nhwc(_latent(4))
    dec32 = _apply(cfg, params, z, "decode")
    dec16 = _apply(cfg, params, z, "decode", jnp.bfloat16)
    assert dec16.dtype == jnp.float32
    x = nchw_to_nhwc(_image(5))
    mean32 = _apply(cfg, params, x, "encode").mean
    mean16 = _apply(cfg, params, x, "encode", jnp.bfloat16).mean
    errors = {"decode": rel_err(dec16, dec32), "encode mean": rel_err(mean16, mean32)}
    assert max(errors.values()) <= 2e-2, errors
    # bf16 really ran: the outputs differ from float32.
    assert min(errors.values()) > 1e-3, errors


def test_vae_config_round_trip(tiny_vae):
    ref, cfg, _ = tiny_vae
    d = cfg.to_diffusers_config()
    assert VAEConfig.from_diffusers_config(d) == cfg
    rebuilt = diffusers.AutoencoderKL.from_config(d)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    assert rebuilt.config.scaling_factor == cfg.scaling_factor == 0.18215


def test_vae_config_missing_keys_mean_diffusers_defaults():
    """A partial dict means what diffusers builds from it (one 64-wide level, one
    resnet per block); the strict load proves the architectures are the same."""
    d = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "latent_channels": 4}
    ref = diffusers.AutoencoderKL.from_config(d)
    cfg = VAEConfig.from_diffusers_config(d)
    assert cfg.block_out_channels == (64,) and cfg.layers_per_block == 1
    load_vae(torch_state(ref), cfg)


def test_sd2_vae_matches_the_full_size_listing():
    """SD2_VAE builds exactly the 248 tensors of stabilityai/stable-diffusion-2-base's vae."""
    listing = read_listing("sd2_base_vae_diffusers.tsv")
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in listing.items()}
    load_vae(state, SD2_VAE)
    assert SD2_VAE == VAEConfig()
    assert SD2_VAE.down_block_types == ("DownEncoderBlock2D",) * 4


def test_vae_load_is_strict(tiny_vae):
    ref, cfg, _ = tiny_vae
    state = torch_state(ref)
    del state["decoder.mid_block.attentions.0.to_q.bias"]
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        load_vae(state, cfg)
    assert err.value.missing == ["decoder.mid_block.attentions.0.to_q.bias"]
    assert err.value.unexpected == ["encoder.extra.weight"]


@pytest.mark.parametrize("change, match", [
    ({"down_block_types": ["DownBlock2D"] * 4}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"use_quant_conv": False}, "use_quant_conv"),
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"norm_num_groups": 3}, "norm_num_groups"),
])
def test_vae_refuses_unsupported_configs(change, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig.from_diffusers_config({**TINY, **change})
