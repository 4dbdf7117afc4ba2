"""The SD2-base-size UNet (865,910,724 parameters) against diffusers on one forward.

Slow (about 4 GB of float32 weights per framework and a long compile): marked
`slow`, deselected in CI with `-m "not slow"`; run with `pytest -m slow`.
"""

import diffusers
import jax
import numpy as np
import pytest
import torch

from jaxsr.convert.networks import load_unet
from jaxsr.models.unet import SD2_BASE_UNET, UNet2DConditionModel
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state

pytestmark = pytest.mark.slow


def test_full_size_unet_matches_diffusers():
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(SD2_BASE_UNET.to_diffusers_config()).eval()
    state = torch_state(ref)
    assert sum(v.size for v in state.values()) == 865_910_724
    params = load_unet(state, SD2_BASE_UNET)
    del state
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    t = np.array([500])
    ctx = rng.standard_normal((1, 77, 1024)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    del ref
    got = jax.jit(UNet2DConditionModel(SD2_BASE_UNET).apply)(
        {"params": params}, nchw_to_nhwc(x), t, ctx)
    err = rel_err(nhwc_to_nchw(got), want)
    print(f"full-size UNet relative error: {err:.3e}")
    assert err <= 1e-5
