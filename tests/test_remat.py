"""Rematerialised UNet and ControlNet layers (`remat=True`, configs/seesr_train.py's
`config.remat`): the same parameters, the same loss and gradients, less memory kept
for the backward pass.

Small SeeSR-shaped networks (two levels, RCA blocks on), one ControlNet + UNet
ε-prediction loss on a 16² latent, differentiated through both networks as the SeeSR
train step does.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.models import controlnet, unet

_SHARED = dict(block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=32,
               layers_per_block=1, norm_num_groups=8, use_image_cross_attention=True,
               image_cross_attention_dim=16)
UNET = unet.UNetConfig(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **_SHARED)
CONTROLNET = controlnet.ControlNetConfig(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    conditioning_embedding_out_channels=(8, 16), **_SHARED)


def _loss_and_grad(remat: bool):
    u = unet.UNet2DConditionModel(UNET, remat=remat)
    c = controlnet.ControlNetModel(CONTROLNET, remat=remat)
    rng = np.random.default_rng(0)
    b, side = 2, 16
    x = jnp.asarray(rng.standard_normal((b, side, side, 4)), jnp.float32)
    f = CONTROLNET.condition_downscale
    hint = jnp.asarray(rng.random((b, side * f, side * f, 3)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((b, 77, UNET.cross_attention_dim)), jnp.float32)
    img = jnp.asarray(rng.standard_normal((b, 145, UNET.image_cross_attention_dim)),
                      jnp.float32)
    t = jnp.array([10, 700])
    target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    # Random weights from the shapes alone: init itself would compile every layer.
    shapes = {"unet": jax.eval_shape(u.init, jax.random.key(1), x, t, ctx, img)["params"],
              "controlnet": jax.eval_shape(c.init, jax.random.key(2), x, t, ctx, hint,
                                           img)["params"]}
    params = jax.tree.map(
        lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32), shapes)

    def loss(p):
        down, mid = c.apply({"params": p["controlnet"]}, x, t, ctx, hint, img)
        eps = u.apply({"params": p["unet"]}, x, t, ctx, img, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid)
        return jnp.mean((eps - target) ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    compiled = fn.lower(params).compile()
    value, grads = compiled(params)
    return params, value, grads, compiled.memory_analysis().temp_size_in_bytes


def test_remat_keeps_params_loss_and_gradients_and_frees_memory():
    p0, v0, g0, temp0 = _loss_and_grad(False)
    p1, v1, g1, temp1 = _loss_and_grad(True)
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
