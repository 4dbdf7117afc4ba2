"""Will a pipeline fit? Its memory need, estimated before any weight is read, against
what the host or the devices have free; a clear error instead of the kernel's OOM
killer.

need per device = held parameters (exact: the folder's headers and the dtype rule of
jaxsr.pipelines.placement) + a runtime allowance (activations, compiled programs,
compiler scratch), measured by benchmarks/sr_memory.py as peak RSS minus the held
parameters and the bare process at a 128² → 512² image, batch 1, and rounded up.
Larger images and batches need more: the allowance is a floor, not a promise.

On the CPU every local device lives in host memory, so n devices hold n copies of
the parameters; on accelerators each device is checked on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

GB = 1 << 30


class InsufficientMemoryError(MemoryError):
    """The weights and the runtime would not fit in free memory (message says by how
    much and what to try)."""


def host_free_bytes() -> int | None:
    """Memory this process can still take: the kernel's MemAvailable, capped by the
    cgroup's limit (containers), or None where neither can be read."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            candidates.append(int(limit) - usage)
    return min(candidates) if candidates else None


def device_free_bytes(device) -> int | None:
    """An accelerator's free memory from its allocator statistics (None if unknown)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without statistics
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def check_fits(param_bytes: int, runtime_bytes: int, devices, *, what: str,
               smaller_param_bytes: int | None = None, free_bytes: int | None = None) -> None:
    """Raise InsufficientMemoryError when `param_bytes` per device plus `runtime_bytes`
    do not fit.

    devices: the pipeline's devices. smaller_param_bytes: the per-device parameters in
    bfloat16, when the pipeline runs in float32 (for the hint). free_bytes: the free
    host memory (CPU) or per-device memory, instead of asking. Unknown free memory
    (no /proc, a backend without statistics) passes: the check only refuses what it
    can show will not fit.
    """
    devices = list(devices)
    if not devices:
        return
    if devices[0].platform == "cpu":
        free = host_free_bytes() if free_bytes is None else free_bytes
        need = len(devices) * param_bytes + runtime_bytes
        where = "host memory"
        fits_with = lambda p, n: n * p + runtime_bytes <= free
    else:
        frees = [f for f in (device_free_bytes(d) for d in devices) if f is not None]
        free = free_bytes if free_bytes is not None else (min(frees) if frees else None)
        need = param_bytes + runtime_bytes
        where = f"memory on each {devices[0].device_kind}"
        fits_with = lambda p, n: p + runtime_bytes <= free
    if free is None or need <= free:
        return
    hints = []
    if smaller_param_bytes is not None and fits_with(smaller_param_bytes, len(devices)):
        hints.append("--dtype bfloat16")
    if devices[0].platform == "cpu" and len(devices) > 1 and fits_with(param_bytes, 1):
        hints.append("--devices 1 (every CPU device holds its own copy of the weights)")
    hints.append("closing other programs")
    raise InsufficientMemoryError(
        f"{what} needs ~{need / GB:.1f} GB of {where} ({param_bytes / GB:.1f} GB of "
        f"weights per device, {runtime_bytes / GB:.1f} GB to run), but {free / GB:.1f} GB "
        f"is free; try {', or '.join(hints)}. (Set JAXSR_SKIP_MEMORY_CHECK=1 to try anyway.)")


def check_enabled() -> bool:
    return not os.environ.get("JAXSR_SKIP_MEMORY_CHECK")
