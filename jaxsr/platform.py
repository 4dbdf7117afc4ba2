"""Backend settings jaxsr applies by default (call before JAX starts its backends).

One XLA:CPU setting, measured on the SD2-base UNet forward (batch 2, 64² latent,
float32, 2-core x86; benchmarks/unet_forward_cpu.py):
`--xla_cpu_experimental_ynn_fusion_type=individual_dot` gives YNNPACK the single
dots only. XLA's default also hands it the convolutions, which it ran at 37-66
GFLOP/s for the UNet's 3×3 convs on 8²-32² maps with 1280 channels, where XLA's
own convolution runs them at 160-185 GFLOP/s; the forward went from 16.6 s to
12.0 s with this flag alone. (The oneDNN custom-call flag jaxsr set before
compiles to the identical program once YNNPACK takes the dots, so it is gone.)
Results move only by float32 rounding: that forward is 3.3e-6 from PyTorch's
(relative) with the flag and 3.7e-6 without. The flag only concerns the CPU backend; a user's own
XLA_FLAGS entry for it wins. Set JAXSR_NO_XLA_DEFAULTS=1 to leave XLA_FLAGS
untouched.
"""

from __future__ import annotations

import os

CPU_XLA_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "individual_dot"}


def configure_xla_defaults() -> str:
    """Add jaxsr's default XLA flags to XLA_FLAGS unless the user set them; returns it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAXSR_NO_XLA_DEFAULTS"):
        return flags
    for name, value in CPU_XLA_FLAGS.items():
        if name not in flags:
            flags = f"{flags} {name}={value}".strip()
    os.environ["XLA_FLAGS"] = flags
    return flags
