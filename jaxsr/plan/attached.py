"""Peak rates of the attached devices, measured, for the roofline of
`jaxsr plan --topology attached` (no chip table covers CPUs or a lent GPU)."""

from __future__ import annotations

import time


def _rate(fn, arg, work: float, seconds: float) -> float:
    import jax

    jax.block_until_ready(fn(arg))
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(fn(arg))
        reps += 1
    return work * reps / (time.perf_counter() - start)


def measured_peaks(dtype, seconds: float = 2.0) -> dict:
    """{"flops": matmul FLOP/s in `dtype`, "bytes": streaming bytes/s (read + write)}
    of the first attached device."""
    import jax
    import jax.numpy as jnp

    accel = jax.default_backend() != "cpu"
    n = 8192 if accel else 2048
    a = jnp.ones((n, n), dtype)
    flops = _rate(jax.jit(lambda x: x @ x), a, 2.0 * n ** 3, seconds)
    m = (1 << 28) if accel else (1 << 25)
    b = jnp.ones((m,), jnp.float32)
    stream = _rate(jax.jit(lambda x: x * 1.0001), b, 2.0 * 4 * m, seconds)
    return {"flops": flops, "bytes": stream}
