"""Every probability and range of the second-order degradation, as frozen dataclasses.

Three presets:

- `SEESR`: the values hard-coded in SeeSR's `make_paired_data.py` (reference notes,
  section 6), i.e. the Real-ESRGAN ×4 "plus" training settings, with the GT sharpened
  by USM before degradation and both LR and GT saved as 8-bit images.
- `REALESRGAN`: the Real-ESRGAN defaults of the (unused) `params_realesrgan.yml`:
  milder noise and JPEG, second blur p = 0.5, no USM, LR rounded to 1/255.
  Values the notes list as unchanged (kernel types, probabilities and σ ranges,
  resize probabilities, final sinc p = 0.8) are the same. The notes' "gray /
  colour-jitter 0" is read as the yml's image-level grayscale conversion and
  colour jitter (not part of this pipeline); gray *noise* keeps p = 0.4, the
  Real-ESRGAN default.
- `COSER`: StableSR's variant that CoSeR trains with (coser_reference.md section 5):
  Real-ESRGAN's stage settings with milder blur (σ [0.2, 1.5] then [0.2, 1.0],
  β_g [0.5, 2], β_p [1, 1.5] in both stages), the GT USM-sharpened first, and the LR
  only clamped, not rounded to 1/255 (StableSR keeps it in memory, never as a file).

Noise σ ranges are in 8-bit units (σ/255 is applied), as in the reference. The
dataclasses are hashable, so a preset can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math

# Order of the Gaussian-family kernel types in `KernelSettings.type_probs`.
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso",
                "plateau_iso", "plateau_aniso")
# Order of the resize modes drawn uniformly at every resize.
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """A random blur kernel (sinc or one of the six Gaussian-family types)."""

    sinc_prob: float = 0.1
    type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    # β of the generalized Gaussian / plateau: U[lo, 1) or U[1, hi], 50/50 (see kernels.py).
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    # Odd support sizes drawn uniformly from lo, lo+2, ..., hi; hi is the canvas size.
    size_range: tuple[int, int] = (7, 21)


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """One resize → noise → JPEG round of the degradation."""

    resize_probs: tuple[float, float, float]  # up, down, keep
    resize_range: tuple[float, float]  # down scale from [lo, 1], up scale from [1, hi]
    gaussian_noise_prob: float  # else Poisson
    noise_range: tuple[float, float]  # Gaussian σ, 8-bit units
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class DegradationPreset:
    """The whole second-order pipeline (see pipeline.py for the order of the stages)."""

    kernel1: KernelSettings
    kernel2: KernelSettings
    first: StageSettings
    second: StageSettings
    second_blur_prob: float
    final_sinc_prob: float = 0.8
    # ω_c of the final sinc ~ U[lo, hi] (no size-dependent range, unlike kernel1/2).
    final_sinc_omega: tuple[float, float] = (math.pi / 3, math.pi)
    scale: int = 4
    usm_sharpen: bool = False  # sharpen the HR (target and degradation input) first
    round_lr: bool = True  # LR to multiples of 1/255
    round_target: bool = False  # target to multiples of 1/255


SEESR = DegradationPreset(
    kernel1=KernelSettings(sigma_range=(0.2, 3.0)),
    kernel2=KernelSettings(sigma_range=(0.2, 1.5)),
    first=StageSettings(
        resize_probs=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
        gaussian_noise_prob=0.5, noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0),
        gray_noise_prob=0.4, jpeg_range=(30.0, 95.0)),
    second=StageSettings(
        resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        gaussian_noise_prob=0.5, noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5),
        gray_noise_prob=0.4, jpeg_range=(30.0, 95.0)),
    second_blur_prob=0.8,
    usm_sharpen=True,
    round_lr=True,
    round_target=True,  # the sharpened GT is saved as an 8-bit PNG
)

REALESRGAN = DegradationPreset(
    kernel1=KernelSettings(sigma_range=(0.2, 3.0)),
    kernel2=KernelSettings(sigma_range=(0.2, 1.5)),
    first=StageSettings(
        resize_probs=(0.2, 0.7, 0.1), resize_range=(0.3, 1.5),
        gaussian_noise_prob=0.5, noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0),
        gray_noise_prob=0.4, jpeg_range=(60.0, 95.0)),
    second=StageSettings(
        resize_probs=(0.3, 0.4, 0.3), resize_range=(0.6, 1.2),
        gaussian_noise_prob=0.5, noise_range=(1.0, 12.0), poisson_scale_range=(0.05, 1.0),
        gray_noise_prob=0.4, jpeg_range=(60.0, 100.0)),
    second_blur_prob=0.5,
    usm_sharpen=False,
    round_lr=True,
    round_target=False,
)

COSER = DegradationPreset(
    kernel1=KernelSettings(sigma_range=(0.2, 1.5), betag_range=(0.5, 2.0),
                           betap_range=(1.0, 1.5)),
    kernel2=KernelSettings(sigma_range=(0.2, 1.0), betag_range=(0.5, 2.0),
                           betap_range=(1.0, 1.5)),
    first=REALESRGAN.first,
    second=REALESRGAN.second,
    second_blur_prob=0.5,
    usm_sharpen=True,   # the LR is made from the sharpened GT, which is also the target
    round_lr=False,
    round_target=False,
)
