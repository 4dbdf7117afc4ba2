"""UNet2DConditionModel parity with diffusers' PyTorch module (random weights, float32)."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsr.convert.networks import load_unet
from jaxsr.models.unet import UNet2DConditionModel, UNetConfig
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state

TINY = dict(
    block_out_channels=(16, 32, 64, 64), attention_head_dim=(1, 2, 4, 4), cross_attention_dim=24,
    norm_num_groups=8, layers_per_block=2, in_channels=4, out_channels=4, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
)


def randomize_(module, seed=0):
    """Perturb every parameter so zero-init or unit-init tensors cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**TINY).eval()
    randomize_(ref)
    cfg = UNetConfig.from_diffusers_config(dict(ref.config))
    return ref, cfg, load_unet(torch_state(ref), cfg)


def _inputs(cfg, seed=1, size=16, batch=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, size, size)).astype(np.float32)
    t = np.array([981, 17][:batch], np.int64)
    ctx = rng.standard_normal((batch, 7, cfg.cross_attention_dim)).astype(np.float32)
    return x, t, ctx


def test_unet_matches_diffusers(tiny_unet):
    ref, cfg, params = tiny_unet
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    got = UNet2DConditionModel(cfg).apply({"params": params}, nchw_to_nhwc(x), t, ctx)
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5


def test_unet_odd_latent_sizes_match_diffusers(tiny_unet):
    """SeeSR crops images only to multiples of 8 px, so latents like 20×12 reach the UNet:
    diffusers then upsamples to each skip's size (20→10→5→3 comes back 3→5→10→20)."""
    ref, cfg, params = tiny_unet
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, cfg.in_channels, 20, 12)).astype(np.float32)
    t = np.array([500], np.int64)
    ctx = rng.standard_normal((1, 7, cfg.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    got = UNet2DConditionModel(cfg).apply({"params": params}, nchw_to_nhwc(x), t, ctx)
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5


def test_nearest_indices_match_torch():
    from jaxsr.nn.resnet import nearest_indices

    for n_in, n_out in ((3, 5), (5, 10), (7, 13), (13, 25), (25, 50), (4, 8)):
        probe = torch.arange(n_in, dtype=torch.float32)[None, None, :, None]
        want = torch.nn.functional.interpolate(probe, size=(n_out, 1), mode="nearest")
        np.testing.assert_array_equal(nearest_indices(n_in, n_out), want[0, 0, :, 0].long())


def test_unet_with_additional_residuals_matches_diffusers(tiny_unet):
    ref, cfg, params = tiny_unet
    x, t, ctx = _inputs(cfg, seed=2)
    # Residual shapes: the 12 skips (conv_in, 2 layers + downsampler per level, 2 on the last)
    chans = cfg.block_out_channels
    shapes, size = [(chans[0], 16)], 16
    for i, c in enumerate(chans):
        shapes += [(c, size)] * 2
        if i < len(chans) - 1:
            size //= 2
            shapes.append((c, size))
    rng = np.random.default_rng(3)
    down = [rng.standard_normal((2, c, s, s)).astype(np.float32) for c, s in shapes]
    mid = rng.standard_normal((2, chans[-1], size, size)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                   down_block_additional_residuals=tuple(torch.from_numpy(d) for d in down),
                   mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy()
    got = UNet2DConditionModel(cfg).apply(
        {"params": params}, nchw_to_nhwc(x), t, ctx,
        down_block_additional_residuals=[nchw_to_nhwc(d) for d in down],
        mid_block_additional_residual=nchw_to_nhwc(mid))
    assert len(down) == 12
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5


def test_unet_bfloat16_close_to_float32(tiny_unet):
    _, cfg, params = tiny_unet
    x, t, ctx = _inputs(cfg, seed=4)
    f32 = UNet2DConditionModel(cfg).apply({"params": params}, nchw_to_nhwc(x), t, ctx)
    bf16 = UNet2DConditionModel(cfg, dtype=jnp.bfloat16).apply(
        {"params": params}, nchw_to_nhwc(x), t, ctx)
    assert rel_err(bf16, f32) <= 2e-2


def test_unet_config_round_trip(tiny_unet):
    ref, cfg, _ = tiny_unet
    rebuilt = diffusers.UNet2DConditionModel.from_config(cfg.to_diffusers_config())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}


def test_unet_refuses_unsupported_config():
    with pytest.raises(ValueError, match="upcast_attention"):
        UNetConfig.from_diffusers_config({**TINY, "upcast_attention": True})


