"""Rematerialised UNet and ControlNet layers (`remat=True`: configs/seesr_train.py's and
configs/coser_train.py's `config.remat`): the same parameters, the same loss and
gradients, less memory kept for the backward pass.

Small two-level networks of each family, one ControlNet + UNet ε-prediction loss on a
16² latent, differentiated through both networks as the train steps do:
  - SeeSR: ControlNet + UNet with RCA blocks;
  - CoSeR: its ControlNet run on the LR and the reference latents, then the AiA UNet
    reading both feature sets (every AiA transformer, the dubch ones included).
"""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsr.models import controlnet, coser_controlnet, coser_unet, unet

_SHARED = dict(block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=32,
               layers_per_block=1, norm_num_groups=8)
_LEVELS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
SEESR_UNET = unet.UNetConfig(up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                             use_image_cross_attention=True, image_cross_attention_dim=16,
                             **_LEVELS, **_SHARED)
SEESR_CONTROLNET = controlnet.ControlNetConfig(
    conditioning_embedding_out_channels=(8, 16), use_image_cross_attention=True,
    image_cross_attention_dim=16, **_LEVELS, **_SHARED)
# CoSeR: attention at both levels, so the up path has AiA transformers at each.
COSER_BASE = unet.UNetConfig(down_block_types=("CrossAttnDownBlock2D",) * 2,
                             up_block_types=("CrossAttnUpBlock2D",) * 2,
                             use_linear_projection=True, **_SHARED)


def _seesr(remat: bool, rng, x, t, ctx):
    u = unet.UNet2DConditionModel(SEESR_UNET, remat=remat)
    c = controlnet.ControlNetModel(SEESR_CONTROLNET, remat=remat)
    b, side = x.shape[:2]
    f = SEESR_CONTROLNET.condition_downscale
    hint = jnp.asarray(rng.random((b, side * f, side * f, 3)), jnp.float32)
    img = jnp.asarray(rng.standard_normal((b, 145, SEESR_UNET.image_cross_attention_dim)),
                      jnp.float32)
    shapes = {"unet": jax.eval_shape(u.init, jax.random.key(1), x, t, ctx, img)["params"],
              "controlnet": jax.eval_shape(c.init, jax.random.key(2), x, t, ctx, hint,
                                           img)["params"]}

    def eps(p):
        down, mid = c.apply({"params": p["controlnet"]}, x, t, ctx, hint, img)
        return u.apply({"params": p["unet"]}, x, t, ctx, img,
                       down_block_additional_residuals=down, mid_block_additional_residual=mid)

    return shapes, eps


def _coser(remat: bool, rng, x, t, ctx):
    u = coser_unet.CoSeRUNet(coser_unet.CoSeRUNetConfig(base=COSER_BASE), remat=remat)
    c = coser_controlnet.CoSeRControlNet(
        coser_controlnet.CoSeRControlNetConfig(base=COSER_BASE, attention_levels=(0, 1)),
        remat=remat)
    lr = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ref = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    feats = [jnp.zeros(s, jnp.float32) for s in
             coser_unet.control_feature_shapes(COSER_BASE, *x.shape[:3])]
    shapes = {"unet": jax.eval_shape(u.init, jax.random.key(1), x, t, ctx, feats,
                                     feats)["params"],
              "controlnet": jax.eval_shape(c.init, jax.random.key(2), x, t, ctx, lr)["params"]}

    def eps(p):
        x_feats, r_feats = c.apply({"params": p["controlnet"]}, x, t, ctx, lr, ref,
                                   method="lr_and_reference")
        return u.apply({"params": p["unet"]}, x, t, ctx, x_feats, r_feats)

    return shapes, eps


def _loss_and_grad(family, remat: bool):
    rng = np.random.default_rng(0)
    b, side = 2, 16
    x = jnp.asarray(rng.standard_normal((b, side, side, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((b, 77, 32)), jnp.float32)
    t = jnp.array([10, 700])
    shapes, eps = family(remat, rng, x, t, ctx)
    target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    # Random weights from the shapes alone: init itself would compile every layer.
    params = jax.tree.map(
        lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32), shapes)

    fn = jax.jit(jax.value_and_grad(lambda p: jnp.mean((eps(p) - target) ** 2)))
    compiled = fn.lower(params).compile()
    value, grads = compiled(params)
    return params, value, grads, compiled.memory_analysis().temp_size_in_bytes


# CoSeR's compiles take twice SeeSR's (its AiA blocks): its numbers run with -m slow; the
# default suite checks its wiring below from the trace alone.
@pytest.mark.parametrize("family", [_seesr, pytest.param(_coser, marks=pytest.mark.slow)],
                         ids=["seesr", "coser"])
def test_remat_keeps_params_loss_and_gradients_and_frees_memory(family):
    p0, v0, g0, temp0 = _loss_and_grad(family, False)
    p1, v1, g1, temp1 = _loss_and_grad(family, True)
    # nn.remat keeps every parameter's name and shape: checkpoints load either way.
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    scale = max(float(jnp.max(jnp.abs(g))) for g in leaves0)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves0, leaves1))
    assert worst <= 1e-5 * scale, (worst, scale)
    # The activations kept for the backward pass are what remat trades away.
    assert temp1 < 0.8 * temp0, (temp1, temp0)


_LAYER = re.compile(r"^(.*?(?:^|/)(?:resnets|attentions|image_attentions)_\d+)/")


def _checkpoint_regions(jaxpr) -> int:
    """How many jax.checkpoint (nn.remat) calls a traced program makes, nested ones in
    sub-jaxprs (pjit, scans) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("checkpoint", "remat2")  # jax.checkpoint's primitive
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _checkpoint_regions(sub)
    return count


@pytest.mark.parametrize("family", [_seesr, _coser], ids=["seesr", "coser"])
def test_remat_wraps_every_resnet_and_transformer_layer(family):
    """One checkpoint region per ResNet and transformer layer of both networks (CoSeR's
    AiA transformers included), counted from the parameter tree's layer names; none
    without remat. Traced only: seconds."""
    rng = np.random.default_rng(0)
    x = jnp.zeros((1, 16, 16, 4), jnp.float32)
    ctx = jnp.zeros((1, 77, 32), jnp.float32)
    t = jnp.array([10])
    counts = {}
    for remat in (False, True):
        shapes, eps = family(remat, rng, x, t, ctx)
        counts[remat] = _checkpoint_regions(jax.make_jaxpr(eps)(shapes).jaxpr)
    # Each layer once: the parameter paths cut after their first layer name.
    paths = ["/".join(k.key for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    names = {m.group(1) for m in map(_LAYER.match, paths) if m}
    assert counts[False] == 0
    assert counts[True] == len(names) > 0, (counts, sorted(names))
