"""DISTS (Ding et al. 2020), as `DISTS_pytorch` (0.1) and pyiqa compute it.

For images x, y in [0, 1], six stages of features: the raw image (3 channels) and
VGG16's relu1_2 .. relu5_3 (64, 128, 256, 512, 512) of (img - ImageNet mean) / std,
with L2 pooling in place of the max-pools (`jaxsr.metrics.backbones.l2_pool`). Per stage
and channel, over pixels (means, population variances, covariance):
    S1 = (2 mx my + c1) / (mx^2 + my^2 + c1)           structure of the means
    S2 = (2 cov + c2) / (vx + vy + c2)                  texture, cov = E[xy] - mx my
with c1 = c2 = 1e-6, and
    DISTS = 1 - sum_channels (alpha S1 + beta S2) / (sum(alpha) + sum(beta))
with the learned alpha, beta (1475 = 3+64+128+256+512+512 weights each).

pyiqa (`pyiqa/archs/dists_arch.py`) against `DISTS_pytorch`:
  - Same arithmetic (filter, eps, constants, weight normalisation, no resizing inside
    the model: DISTS_pytorch's `prepare_image(resize=True)` is a command-line helper
    only).
  - Weights: pyiqa loads one file, `DISTS_weights-<hash>.pth`, the whole module's state
    dict (trunk keys `stageK.N.*`, the L2-pooling filters, `mean`, `std`, `alpha`,
    `beta`) over torchvision's ImageNet VGG16; DISTS_pytorch takes torchvision's VGG16
    and `alpha`/`beta` from its `weights.pt` (which it looks for under `sys.prefix`, not
    in its package folder, so a plain pip install needs `load_weights=False` and the
    two tensors set by hand). `jaxsr.convert.metric_dists` reads either layout.
  - pyiqa returns `(B, 1)`; DISTS_pytorch squeezes to `(B,)` (a scalar for B = 1).

Arithmetic. The weights sum to one, so DISTS = sum (alpha (1 - S1) + beta (1 - S2))
with the exact rearrangements
    1 - S1 = (mx - my)^2 / (mx^2 + my^2 + c1)
    1 - S2 = E[((x - mx) - (y - my))^2] / (vx + vy + c2)
which is what is computed here, the (co)variances as means of products of deviations.
The reference's float32 form cancels three times: E[xy] - mx my (a covariance beside
large means), 1 - (...) of a sum near one, and S1, S2 near one for similar images. A
DISTS score of similar images (0.005-0.02) is then only good to ~1e-5 relative, and a
change of the VGG's summation order (XLA:CPU handing its dots to YNNPACK) moved the
score by 6e-4 relative while every feature map stayed within 1e-6. Here every term is
a non-negative sum of small values: the score follows the features' accuracy, and it
is tested against the reference run in float64.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.metrics.backbones import VGG16_CHANNELS, vgg16_features

CHANNELS = (3, *VGG16_CHANNELS)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
C1 = C2 = 1e-6


class DISTS(nn.Module):
    """Params: `net` (VGG16's convs, torchvision names), `alpha` and `beta` (1, 1475, 1, 1)
    in the reference's layout."""

    @nn.compact
    def __call__(self, sr: jax.Array, hr: jax.Array) -> jax.Array:
        """sr, hr (B, H, W, 3) RGB in [0, 1] -> (B,) float32."""
        shape = (1, sum(CHANNELS), 1, 1)
        alpha = self.param("alpha", nn.initializers.zeros, shape, jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, shape, jnp.float32)
        x = jnp.concatenate([sr, hr], axis=0).astype(jnp.float32)
        stages = [x, *vgg16_features(l2_pooling=True)((x - jnp.asarray(MEAN)) / jnp.asarray(STD))]
        total = jnp.sum(alpha) + jnp.sum(beta)
        splits = [sum(CHANNELS[: k + 1]) for k in range(len(CHANNELS) - 1)]
        alphas = jnp.split(alpha.reshape(-1) / total, splits)
        betas = jnp.split(beta.reshape(-1) / total, splits)
        score = 0.0
        for f, a, b in zip(stages, alphas, betas, strict=True):
            fx, fy = jnp.split(f, 2, axis=0)
            mx, my = jnp.mean(fx, axis=(1, 2)), jnp.mean(fy, axis=(1, 2))      # (B, C)
            dx, dy = fx - mx[:, None, None], fy - my[:, None, None]
            vx = jnp.mean(dx * dx, axis=(1, 2))
            vy = jnp.mean(dy * dy, axis=(1, 2))
            apart = jnp.mean(jnp.square(dx - dy), axis=(1, 2))      # vx + vy - 2 cov
            one_minus_s1 = jnp.square(mx - my) / (mx**2 + my**2 + C1)
            one_minus_s2 = apart / (vx + vy + C2)
            score = score + jnp.sum(a * one_minus_s1 + b * one_minus_s2, axis=-1)
        return score


def dists(params, sr: jax.Array, hr: jax.Array) -> jax.Array:
    """Per-image DISTS.

    Args:
      params: the Flax params from `jaxsr.convert.metric_dists.convert`.
      sr, hr: (B, H, W, 3) float32 RGB in [0, 1]; H, W at least 16 (four halvings).
    Returns:
      (B,) float32, about 0 for identical images, larger is more different.
    """
    return DISTS().apply({"params": params}, sr, hr)
