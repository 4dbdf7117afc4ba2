"""Per-image blur: the same 2-D kernel on every channel, reflect padding.

`blur` correlates (no kernel flip, like torch's conv2d; all kernels here are
point-symmetric so this is also the convolution). The padding reflects about the
borders of the valid region (see canvas.py), so the valid output equals
`F.conv2d(F.pad(img, mode="reflect"), kernel, groups=C)` on the valid image.
Precision is HIGHEST so accelerators do not drop to bf16/tf32 passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsr.data.degrade.canvas import reflect_index


def blur(image, kernel, valid_hw=None):
    """image: [H, W, C] float32 canvas; kernel: [k, k] (k odd); valid_hw: (h, w) or None (all).

    Returns [H, W, C]; pixels beyond the valid region are unspecified.
    """
    height, width, channels = image.shape
    k = kernel.shape[0]
    pad = k // 2
    if valid_hw is None:
        valid_hw = (height, width)
    rows = reflect_index(jnp.arange(-pad, height + pad), valid_hw[0])
    cols = reflect_index(jnp.arange(-pad, width + pad), valid_hw[1])
    padded = image[rows][:, cols]
    rhs = jnp.broadcast_to(kernel.astype(jnp.float32)[:, :, None, None], (k, k, 1, channels))
    out = jax.lax.conv_general_dilated(
        padded[None].astype(jnp.float32), rhs, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST)
    return out[0]
