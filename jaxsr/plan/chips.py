"""Per-chip facts of the TPU generations `jaxsr plan` models.

Every number is per chip, from the Cloud TPU system-architecture pages (`source`).
Bandwidths are in bytes per second: the pages give HBM and ICI in GB/s (10^9) and the
data-centre network in Gbit/s. ICI is the page's bidirectional figure; the roofline
charges a chip's collective bytes against half of it (what one direction carries),
which is also each page's "all-reduce bandwidth per Pod" divided by its chips.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                     # "v5e"
    device_kind: str              # jax Device.device_kind of its compile-only devices
    hbm_bytes: float
    peak_bf16_flops: float        # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float        # bidirectional, per chip
    dcn_bytes_per_s: float        # per chip
    source: str
    note: str = ""
    cores_per_device: int = 1      # TensorCores one JAX device drives

    @property
    def ici_one_way_bytes_per_s(self) -> float:
        return self.ici_bytes_per_s / 2


CHIPS: dict[str, Chip] = {
    "v4": Chip(
        "v4", "TPU v4", hbm_bytes=32 * GIB, peak_bf16_flops=275e12,
        hbm_bytes_per_s=1200 * GB,
        # The v4 page gives no per-chip ICI figure; its "all-reduce bandwidth per Pod",
        # 1.1 PB/s over 4096 chips, is 268.6 GB/s one way per chip.
        ici_bytes_per_s=2 * 1.1e15 / 4096,
        dcn_bytes_per_s=25e9 / 8,
        source="https://cloud.google.com/tpu/docs/v4",
        note="ICI from the pod all-reduce bandwidth; DCN not published, taken as v5e's"),
    "v5e": Chip(
        "v5e", "TPU v5 lite", hbm_bytes=16 * GB, peak_bf16_flops=197e12,
        hbm_bytes_per_s=819 * GB, ici_bytes_per_s=400 * GB,
        # 2 x 100 Gbit/s NICs per host of 8 chips.
        dcn_bytes_per_s=200e9 / 8 / 8,
        source="https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(
        "v5p", "TPU v5", hbm_bytes=95 * GIB, peak_bf16_flops=459e12,
        hbm_bytes_per_s=2765 * GB, ici_bytes_per_s=1200 * GB, dcn_bytes_per_s=50e9 / 8,
        source="https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(
        "v6e", "TPU v6 lite", hbm_bytes=32 * GB, peak_bf16_flops=918e12,
        hbm_bytes_per_s=1638 * GB, ici_bytes_per_s=800 * GB,
        dcn_bytes_per_s=200e9 / 8 / 8,
        source="https://cloud.google.com/tpu/docs/v6e",
        note="DCN per chip not published; taken as v5e's (2 x 100 Gbit/s per 8 chips)"),
}


def chip_named(name: str) -> Chip:
    try:
        return CHIPS[name]
    except KeyError:
        raise ValueError(f"unknown TPU generation {name!r}; jaxsr plan knows "
                         f"{', '.join(CHIPS)}") from None
