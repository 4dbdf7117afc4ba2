"""The transformer feed-forward (GEGLU) against diffusers' FeedForward, in one piece
and in the row steps it takes on the CPU."""

import jax
import numpy as np
import pytest
import torch
from diffusers.models.attention import FeedForward

from jaxsr.nn import transformer
from tests.parity import rel_err


@pytest.mark.parametrize("step_floats", [None, 64 * 2 * 128])
def test_geglu_feed_forward_matches_diffusers(monkeypatch, step_floats):
    """step_floats=None leaves the module's own budget (one piece at this size); the
    small budget makes 64-row steps over 300 tokens, the last one padded."""
    if step_floats is not None:
        monkeypatch.setattr(transformer, "CPU_FF_STEP_FLOATS", step_floats)
        monkeypatch.setattr(transformer, "CPU_FF_MIN_STEP_ROWS", 0)
    torch.manual_seed(0)
    ref = FeedForward(32, activation_fn="geglu").eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = {"net_0": {"proj": {"kernel": sd["net.0.proj.weight"].T,
                                 "bias": sd["net.0.proj.bias"]}},
              "net_2": {"kernel": sd["net.2.weight"].T, "bias": sd["net.2.bias"]}}
    x = np.random.default_rng(0).standard_normal((2, 300, 32)).astype(np.float32)
    module = transformer.GEGLUFeedForward()
    # The parameter tree is the one nn.Dense layers would make (the converters' layout).
    init = module.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)
    out = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert rel_err(out, want) <= 1e-5
