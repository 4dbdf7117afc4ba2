"""Devices to compile for: compile-only TPU devices of a named slice, or those attached.

    devices, chip = tpu_topology("v5p:4x4x4")              # 64 compile-only devices
    devices, chip = tpu_topology("v5e:1x1")                 # one chip
    devices, chip = tpu_topology("v5p:2x2x2", num_slices=2) # 16 devices, slice_index 0/1

libtpu describes a slice without owning one (`jax.experimental.topologies`); programs
lowered against those devices go through the real TPU compiler, so their memory and
cost analyses and HLO are the ones a real slice would run. Nothing can be executed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jaxsr.plan.capture import capture_stderr
from jaxsr.plan.chips import Chip, chip_named

_TOPOLOGY = re.compile(r"^(v\d+[a-z]?):(\d+(?:x\d+){1,2})$")


class TopologyUnavailable(RuntimeError):
    """libtpu is missing or cannot describe the slice on this machine."""


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """"v5p:4x4x4" -> ("v5p", (4, 4, 4))."""
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise ValueError(f"topology {name!r} is not GENERATION:AxB[xC], e.g. v5e:2x2, "
                         "v5p:4x4x4, or 'attached'")
    return m.group(1), tuple(int(x) for x in m.group(2).split("x"))


def libtpu_status() -> str | None:
    """None when libtpu can describe a topology here, else the reason it cannot."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (pip install 'jaxsr[tpu]')"
    try:
        tpu_topology("v5e:1x1")
    except Exception as e:  # noqa: BLE001 - reported to the caller as the reason
        return f"libtpu cannot describe a topology here: {e}"
    return None


def tpu_topology(name: str, num_slices: int = 1) -> tuple[list, Chip]:
    """(compile-only devices of `num_slices` slices of `name`, the chip's facts)."""
    generation, dims = parse_topology(name)
    chip = chip_named(generation)
    try:
        from jax.experimental import topologies
    except ImportError as e:      # pragma: no cover - jax always ships it
        raise TopologyUnavailable(str(e)) from e
    # Compile-only devices touch no chip: let several processes load libtpu at once
    # (otherwise the second one fails on libtpu's lock file).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if math.prod(dims) == 1:
        # A one-chip slice needs one-chip hosts; the default host bounds are 2x2x1.
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    with capture_stderr() as log:
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
        except Exception as e:
            raise TopologyUnavailable(f"could not describe {name}: {e}") from e
    del log   # libtpu's start-up noise on a host without a TPU
    devices = list(topo.devices)
    if devices and devices[0].device_kind != chip.device_kind:
        raise TopologyUnavailable(f"{name} gave {devices[0].device_kind} devices, "
                                  f"expected {chip.device_kind}")
    cores = len(devices) // (math.prod(dims) * num_slices)
    if cores > 1:
        # libtpu describes v4 one device per TensorCore: each holds half the chip.
        chip = dataclasses.replace(
            chip, hbm_bytes=chip.hbm_bytes / cores,
            peak_bf16_flops=chip.peak_bf16_flops / cores,
            hbm_bytes_per_s=chip.hbm_bytes_per_s / cores,
            ici_bytes_per_s=chip.ici_bytes_per_s / cores,
            dcn_bytes_per_s=chip.dcn_bytes_per_s / cores, cores_per_device=1,
            note=(chip.note + "; " if chip.note else "") + f"per TensorCore ({cores} "
                 "devices per chip): every figure is the chip's divided by " + str(cores))
    return devices, chip
