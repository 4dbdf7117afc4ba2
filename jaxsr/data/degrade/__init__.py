"""Real-ESRGAN-style second-order degradations in JAX (SeeSR's training pairs).

One job per module: kernels (random blur kernels), blur, resize (traced sizes on
static canvases, see canvas), noise, jpeg, usm (target sharpening), presets and the
pipeline `degrade(key, hr, preset) -> (lr, target)`.
"""

from jaxsr.data.degrade.pipeline import degrade, degrade_batch, degrade_image
from jaxsr.data.degrade.presets import (
    COSER,
    REALESRGAN,
    SEESR,
    DegradationPreset,
    KernelSettings,
    StageSettings,
)

__all__ = ["COSER", "REALESRGAN", "SEESR", "DegradationPreset", "KernelSettings", "StageSettings",
           "degrade", "degrade_batch", "degrade_image", "preset_by_name"]


def preset_by_name(name: str) -> DegradationPreset:
    """"seesr", "realesrgan" or "coser" (case-insensitive)."""
    presets = {"seesr": SEESR, "realesrgan": REALESRGAN, "coser": COSER}
    if name.lower() not in presets:
        raise ValueError(f"unknown degradation preset {name!r}; use one of "
                         f"{', '.join(presets)}")
    return presets[name.lower()]
