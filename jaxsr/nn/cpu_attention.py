"""The fused CPU attention kernel (jaxsr/kernels/cpu_attention.cc) as a JAX function.

Forward: one XLA FFI call that never forms the logits in memory. Backward: the
gradient of the same attention computed with XLA ops (the kernel has no backward
pass of its own), so the function can sit inside trained networks; training on a CPU
is for tests and debugging, where recomputing the logits costs nothing that matters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.kernels import CPU_ATTENTION_TARGET, cpu_attention_isa

HEAD_DIMS = (32, 64, 128)
# The code paths "auto" takes the kernel on: measured faster than XLA's ops (the
# AVX-512 path: 1.3-2.4x on SD's 4096-token self-attention, 1.56x on its 77-token
# cross-attention, equal at 1024 tokens; benchmarks/unet_forward_cpu.py). The AVX2
# and baseline paths run when asked for by name.
AUTO_ISAS = (4,)


def fused_cpu_attention_preferred() -> bool:
    """Whether "auto" attention takes the fused kernel on this CPU."""
    return cpu_attention_isa() in AUTO_ISAS


def fused_cpu_attention_supported(q, k, mask) -> str | None:
    """None when the kernel can compute this attention, else why not."""
    if cpu_attention_isa() is None:
        return "jaxsr was installed without its CPU attention kernel (no C++ compiler)"
    if mask is not None:
        return "the kernel takes no mask"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head size {q.shape[-1]} is not one of {HEAD_DIMS}"
    if q.ndim != 4 or k.ndim != 4:
        return "q, k and v must be [B, L, H, D]"
    return None


def _kernel(q, k, v, scale: float):
    dtype = q.dtype
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = jax.ffi.ffi_call(CPU_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           vmap_method="sequential")(q, k, v, scale=np.float32(scale))
    return out.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_cpu_attention(q, k, v, scale: float, xla_attention):
    """Unmasked softmax attention. q [B, Lq, H, D]; k, v [B, Lk, H, D] -> [B, Lq, H, D].

    xla_attention(q, k, v) computes the same in XLA ops; its gradient is used.
    """
    del xla_attention
    return _kernel(q, k, v, scale)


def _forward(q, k, v, scale, xla_attention):
    del xla_attention
    return _kernel(q, k, v, scale), (q, k, v)


def _backward(scale, xla_attention, residuals, grad):
    del scale
    _, pullback = jax.vjp(xla_attention, *residuals)
    return pullback(grad)


fused_cpu_attention.defvjp(_forward, _backward)
