"""Shared helpers for the benchmark scripts: timing, environment facts, reporting."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from jaxsr.plan.flops import unchunked  # noqa: F401 - the benchmarks' shared helper


def time_call(fn, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn` (which must block until its result is ready)."""
    return time_alternating({"fn": fn}, warmup=warmup, repeats=repeats)["fn"]


def time_alternating(fns: dict, *, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each blocking callable, their timed runs interleaved
    (a, b, a, b, ...), so a slow spell of a shared machine falls on all of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def environment() -> dict:
    from jaxsr.platform import auto_compute_dtype, cpu_model_and_flags, quiet_absent_tpu

    quiet_absent_tpu()      # libtpu installed, no TPU here: no TPU backend start-up noise
    import jax

    from jaxsr.kernels import ISA_NAMES, cpu_attention_isa

    cpu_model, cpu_flags = cpu_model_and_flags()
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "cpu_model": cpu_model or platform.processor(), "cpu_flags": cpu_flags,
           "auto_dtype": auto_compute_dtype(jax.default_backend()),
           "cpu_count": os.cpu_count(), "jax": jax.__version__,
           "jax_backend": jax.default_backend(),
           "devices": [d.device_kind for d in jax.devices()],
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "cpu_attention_kernel": ISA_NAMES.get(cpu_attention_isa(), "not built")}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return env


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")


def random_params(shapes, seed: int, scale: float = 0.02):
    """Random float32 host arrays (numpy) for a tree of ShapeDtypeStructs: benchmarks time
    the released network sizes without downloading weights."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape, dtype=np.float32) * np.float32(scale), shapes)


def measure_peak(dtype, seconds: float = 3.0) -> float:
    """Achieved FLOP/s of a large square matmul in `dtype` on the default device: the
    yardstick for "fraction of peak" (a measured, not a datasheet, peak)."""
    import jax
    import jax.numpy as jnp

    n = 4096 if jax.default_backend() != "cpu" else 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def xla_flops(compiled) -> float | None:
    """The "flops" entry of XLA's cost analysis of a compiled program (None when the
    backend gives none). XLA counts the body of a while loop once, whatever its trip
    count; callers compose loops themselves."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _loop_equations(jaxpr) -> int:
    """scan/while equations in a jaxpr, nested ones included."""
    import jax

    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("scan", "while")
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _loop_equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _loop_equations(sub)
    return count


def has_chunk_loops(fn, *args) -> bool:
    """Whether tracing fn(*args) makes any of jaxsr's row-chunk loops: its jaxpr has
    more loops than the same trace under `unchunked()`."""
    import jax

    with unchunked():
        whole = _loop_equations(jax.make_jaxpr(fn)(*args).jaxpr)
    return _loop_equations(jax.make_jaxpr(fn)(*args).jaxpr) > whole
