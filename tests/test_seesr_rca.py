"""SeeSR's RCA-augmented UNet and ControlNet against a PyTorch reference built from
diffusers blocks (tests/seesr_reference.py), random weights, float32."""

import functools

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from jaxsr.convert.networks import load_controlnet, load_unet
from jaxsr.convert.seesr_init import controlnet_params_from_unet
from jaxsr.convert.tree import flax_to_torch
from jaxsr.models.controlnet import ControlNetConfig, ControlNetModel
from jaxsr.models.unet import UNet2DConditionModel, UNetConfig
from tests import seesr_reference as ref_lib
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state
from tests.test_unet import TINY, randomize_

IMG_DIM = 12


def _rca_config(model, cls):
    d = {**dict(model.config), "use_image_cross_attention": True,
         "image_cross_attention_dim": IMG_DIM}
    return cls.from_diffusers_config(d)


@pytest.fixture(scope="module")
def seesr_pair():
    torch.manual_seed(0)
    unet = ref_lib.seesr_unet(TINY, IMG_DIM).eval()
    randomize_(unet, seed=1)
    cn = ref_lib.seesr_controlnet_from_unet(unet, IMG_DIM).eval()
    randomize_(cn, seed=2)           # also makes the zero convs non-zero
    ucfg, ccfg = _rca_config(unet, UNetConfig), _rca_config(cn, ControlNetConfig)
    return unet, cn, ucfg, ccfg, load_unet(torch_state(unet), ucfg), load_controlnet(
        torch_state(cn), ccfg)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([981, 3])
    ctx = rng.standard_normal((2, 7, TINY["cross_attention_dim"])).astype(np.float32)
    img = rng.standard_normal((2, 145, IMG_DIM)).astype(np.float32)
    cond = rng.uniform(0, 1, (2, 3, 128, 128)).astype(np.float32)
    return x, t, ctx, img, cond


@functools.cache
def _jitted_apply(model_cls, config):
    """One compile per model shared by both scales (the scale is traced)."""
    return jax.jit(model_cls(config).apply)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_rca_controlnet_and_unet_match_reference(seesr_pair, scale):
    unet, cn, ucfg, ccfg, up, cp = seesr_pair
    x, t, ctx, img, cond = _inputs()
    ref_lib.RCA_CONTEXT["image"] = torch.from_numpy(img)
    with torch.no_grad():
        down_t, mid_t = cn(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                           torch.from_numpy(cond), conditioning_scale=scale, return_dict=False)
        want = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                    down_block_additional_residuals=down_t,
                    mid_block_additional_residual=mid_t).sample.numpy()
    down, mid = _jitted_apply(ControlNetModel, ccfg)(
        {"params": cp}, nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(cond), img,
        conditioning_scale=scale)
    assert len(down) == 12
    errors = [rel_err(nhwc_to_nchw(d), r.numpy()) for d, r in zip(down, down_t)]
    errors.append(rel_err(nhwc_to_nchw(mid), mid_t.numpy()))
    assert max(errors) <= 1e-5, errors
    got = _jitted_apply(UNet2DConditionModel, ucfg)(
        {"params": up}, nchw_to_nhwc(x), t, ctx, img, down_block_additional_residuals=down,
        mid_block_additional_residual=mid)
    unet_err = rel_err(nhwc_to_nchw(got), want)
    print(f"scale {scale}: ControlNet max rel_err {max(errors):.2e} over 13 residuals, "
          f"UNet {unet_err:.2e}")
    assert unet_err <= 1e-5


def test_rca_changes_the_output(seesr_pair):
    """The image context really enters: another soft prompt gives other residuals
    (same compiled ControlNet as the parity test)."""
    _, _, _, ccfg, _, cp = seesr_pair
    x, t, ctx, img, cond = _inputs()
    apply = _jitted_apply(ControlNetModel, ccfg)
    _, a = apply({"params": cp}, nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(cond), img,
                 conditioning_scale=1.0)
    _, b = apply({"params": cp}, nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(cond), img * 0.5,
                 conditioning_scale=1.0)
    assert rel_err(a, b) > 1e-3


def test_plain_controlnet_matches_diffusers():
    torch.manual_seed(3)
    cn = diffusers.ControlNetModel(conditioning_embedding_out_channels=(8, 16, 16, 32), **{
        k: v for k, v in TINY.items() if k not in ("up_block_types", "out_channels",
                                                     "sample_size")}).eval()
    randomize_(cn, seed=4)
    cfg = ControlNetConfig.from_diffusers_config(dict(cn.config))
    params = load_controlnet(torch_state(cn), cfg)
    x, t, ctx, _, cond = _inputs(1)
    with torch.no_grad():
        down_t, mid_t = cn(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                           torch.from_numpy(cond), return_dict=False)
    down, mid = ControlNetModel(cfg).apply({"params": params}, nchw_to_nhwc(x), t, ctx,
                                           nchw_to_nhwc(cond))
    errors = [rel_err(nhwc_to_nchw(d), r.numpy())
              for d, r in zip(list(down) + [mid], list(down_t) + [mid_t])]
    print(f"plain ControlNet max rel_err {max(errors):.2e} over {len(errors)} outputs")
    assert len(errors) == 13 and max(errors) <= 1e-5, errors


def test_controlnet_init_from_unet_matches_diffusers(seesr_pair):
    unet, _, ucfg, ccfg, up, _ = seesr_pair
    params = controlnet_params_from_unet(up, ccfg, jax.random.key(0))
    want = torch_state(ref_lib.seesr_controlnet_from_unet(unet, IMG_DIM))
    flat = traverse_util.flatten_dict(params, sep="/")
    got = flax_to_torch(params)
    assert got.keys() == want.keys()
    fresh = [k for k in want if k.startswith("controlnet_cond_embedding.")
             and not k.startswith("controlnet_cond_embedding.conv_out")]
    for k in want:
        if k in fresh:          # freshly initialised in both: same shape, same law
            assert got[k].shape == want[k].shape
            # PyTorch's default Conv2d init: U(±1/sqrt(fan_in)) for weight and bias
            bound = 1 / np.sqrt(np.prod(want[k.replace(".bias", ".weight")].shape[1:]))
            for tensor in (got[k], want[k]):
                assert np.abs(tensor).max() <= bound
            assert np.abs(got[k]).max() > bound / 2
        else:                   # copied from the UNet, or zero
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert any(np.any(flat[p] != 0) for p in flat if "controlnet_cond_embedding/blocks_0" in p)
    zero = [k for k in want if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero and all(not np.any(got[k]) for k in zero)


def test_controlnet_config_round_trip_and_from_unet_config():
    torch.manual_seed(5)
    unet = diffusers.UNet2DConditionModel(**TINY)
    ref = diffusers.ControlNetModel.from_unet(unet)
    cfg = ControlNetConfig.from_diffusers_config(dict(ref.config))
    assert ControlNetConfig.from_unet_config(UNetConfig.from_diffusers_config(
        dict(unet.config))) == cfg
    rebuilt = diffusers.ControlNetModel.from_config(cfg.to_diffusers_config())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    for bad in ({"controlnet_conditioning_channel_order": "bgr"},
                {"global_pool_conditions": True}, {"upcast_attention": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ControlNetConfig.from_diffusers_config({**dict(ref.config), **bad})
