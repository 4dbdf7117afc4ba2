"""Native kernels, loaded with ctypes and registered as XLA FFI targets.

One so far: `jaxsr_cpu_attention` (cpu_attention.cc), fused softmax attention for
XLA:CPU, built at install time by setup.py. A build without it (no C++ compiler)
still works: `cpu_attention_isa()` is then None and attention runs as XLA ops.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

CPU_ATTENTION_TARGET = "jaxsr_cpu_attention"
_LIBRARY_NAME = "_cpu_attention"
# What the kernel's code paths are called (JaxsrCpuAttentionIsa's return values).
ISA_NAMES = {4: "AVX-512 (x86-64-v4)", 3: "AVX2+FMA (x86-64-v3)", 0: "baseline vectors"}


def _library_path() -> Path | None:
    folder = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"{_LIBRARY_NAME}{suffix}"
        if path.is_file():
            return path
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = _library_path()
    if path is None:
        return None
    import jax

    library = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(CPU_ATTENTION_TARGET,
                                jax.ffi.pycapsule(library.JaxsrCpuAttention), platform="cpu")
    return library


def cpu_attention_isa() -> int | None:
    """The fused CPU attention kernel's code path on this CPU (a key of ISA_NAMES),
    or None when jaxsr was built without it. Registers the kernel with XLA once."""
    library = _library()
    return None if library is None else int(library.JaxsrCpuAttentionIsa())
