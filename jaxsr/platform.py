"""Backend settings jaxsr applies by default (call before JAX starts its backends).

Two XLA:CPU settings. The first, measured on the SD2-base UNet forward (batch 2, 64² latent,
float32, 2-core x86; benchmarks/unet_forward_cpu.py):
`--xla_cpu_experimental_ynn_fusion_type=individual_dot` gives YNNPACK the single
dots only. XLA's default also hands it the convolutions, which it ran at 37-66
GFLOP/s for the UNet's 3×3 convs on 8²-32² maps with 1280 channels, where XLA's
own convolution runs them at 160-185 GFLOP/s; the forward went from 16.6 s to
12.0 s with this flag alone. (The oneDNN custom-call flag jaxsr set before
compiles to the identical program once YNNPACK takes the dots, so it is gone.)
Results move only by float32 rounding: that forward is 3.3e-6 from PyTorch's
(relative) with the flag and 3.7e-6 without.

`--xla_cpu_enable_concurrency_optimized_scheduler=false` orders each program to
keep fewer buffers alive rather than to start independent ops early. The early
starts cost memory where bfloat16 is emulated: XLA:CPU then computes bfloat16 dots
and convolutions in float32 from a float32 copy of each weight, and the default
scheduler made every copy at the start, all alive at once (with the sampling
loops' `optimization_barrier`, jaxsr.pipelines.seesr_sampling, which keeps them
from being hoisted out of the loop, full-size SeeSR in bfloat16 went from 12.5 GB
to 6.9 GB of peak RSS; benchmarks/sr_memory.py). The UNet forward is as fast with
it (8.9 vs 9.1-9.4 s median on an Intel Xeon). Both flags only concern the CPU backend; a user's own
XLA_FLAGS entry for either wins. Set JAXSR_NO_XLA_DEFAULTS=1 to leave XLA_FLAGS
untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

CPU_XLA_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "individual_dot",
                 "--xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def configure_xla_defaults() -> str:
    """Add jaxsr's default XLA flags to XLA_FLAGS unless the user set them; returns it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAXSR_NO_XLA_DEFAULTS"):
        return flags
    for name, value in CPU_XLA_FLAGS.items():
        if name not in flags:
            flags = f"{flags} {name}={value}".strip()
    os.environ["XLA_FLAGS"] = flags
    quiet_absent_tpu()
    return flags


def tpu_present() -> bool:
    """Whether this host has TPU chips (the device files a TPU VM exposes)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_absent_tpu() -> str | None:
    """With libtpu installed (`jaxsr[tpu]`, for compiling TPU programs anywhere) on a
    host without TPU chips, JAX would try to start a TPU backend and libtpu would
    print pages of errors before JAX falls back. Unless the user chose platforms
    (JAX_PLATFORMS), leave the TPU out: "cuda,cpu" where NVIDIA devices exist, else
    "cpu". Compile-only TPU devices (`jaxsr plan`) do not need the backend. Returns
    the platforms set, or None when nothing changed."""
    import importlib.util
    import sys

    if os.environ.get("JAX_PLATFORMS") or tpu_present():
        return None
    if importlib.util.find_spec("libtpu") is None:
        return None
    import glob

    platforms = "cuda,cpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", platforms)
    return platforms


# --------------------------------------------------------------- compute dtype choice

# CPU features that give bfloat16 matmuls native instructions: x86's AVX512_BF16 and
# AMX-BF16, ARMv8.6's BF16 (/proc/cpuinfo "flags" on x86, "Features" on ARM). Without
# them XLA:CPU emulates bfloat16 dots through float32 and runs them slower than
# float32 itself (benchmarks/sr_memory.py records both on the CPU at hand).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; ("", []) where
    there is none (macOS, Windows)."""
    model, flags = "", []
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value.split()
    return model, flags


def auto_compute_dtype(backend: str | None = None) -> str:
    """"bfloat16" on accelerators and on CPUs with native bfloat16, else "float32".

    backend: jax.default_backend() (asked when not given)."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if NATIVE_BF16_CPU_FLAGS & set(cpu_model_and_flags()[1]) else "float32"


def resolve_compute_dtype(name: str) -> str:
    """"auto" → `auto_compute_dtype()`; "float32" / "bfloat16" as given."""
    if name == "auto":
        return auto_compute_dtype()
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return name


_TARGET = contextvars.ContextVar("jaxsr_target_backend", default=None)


def target_backend() -> str:
    """The platform the program being traced will run on: "cpu", "gpu" or "tpu".

    Normally jax.default_backend(). Inside `compiling_for(p)` it is p: `jaxsr plan`
    traces on a CPU host for compile-only TPU devices, and the layers that choose
    their form by platform (attention blocks, the CPU feed-forward steps) must choose
    the form that will run there."""
    target = _TARGET.get()
    if target is not None:
        return target
    import jax

    return jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace as if on `platform` (see `target_backend`)."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
