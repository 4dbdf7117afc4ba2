"""The TPU plan table's batch search (benchmarks/tpu_plan.py), on memory curves whose
largest fitting batch is known: the search compiles nothing here, a report is made
from the curve the way `jaxsr plan` reports a compile."""

import math

import pytest

from benchmarks.tpu_plan import largest_fitting_batch, search_batch
from jaxsr.plan.report import RUNTIME_HEADROOM

HBM = 100e9
USABLE = HBM * (1 - RUNTIME_HEADROOM)


def reporter(total_bytes, compiled):
    """compile_at(batch) for a program whose per-chip total is total_bytes(batch)."""

    def compile_at(batch):
        compiled.append(batch)
        total = total_bytes(batch)
        return {"batch_per_chip": batch, "memory": {"total": total}, "hbm_bytes": HBM,
                "fits": total <= USABLE}

    return compile_at


def largest_true(total_bytes):
    return max(b for b in range(1, 1000) if total_bytes(b) <= USABLE)


def test_an_affine_curve_is_found_in_three_compiles():
    def total(b):
        return 10e9 + 3e9 * b

    compiled = []
    runs = search_batch(reporter(total, compiled))
    assert compiled == [1, 2, largest_true(total)] == [1, 2, 28]
    assert runs[-1]["fits"]


def test_a_slope_overstated_by_small_batches_is_corrected_upwards():
    # Like DAPE distillation: 3 GB per image from batch 1 to 2, 1.5 GB after.
    def total(b):
        return 2.5e9 + 1.5e9 * b + 1.5e9 * min(b, 2)

    compiled = []
    runs = search_batch(reporter(total, compiled))
    assert compiled[:3] == [1, 2, 30] and runs[2]["fits"]
    # The line through batches 2 and 30 is the true one: the fourth compile lands on
    # the largest batch that fits.
    assert compiled[3] == largest_true(total) == 59 and runs[3]["fits"]


def test_an_overshoot_is_walked_back_along_the_steeper_line():
    # Per-image bytes grow with the batch: the first extrapolation does not fit.
    def total(b):
        return 10e9 + 3e9 * b + 0.05e9 * b * b

    compiled = []
    runs = search_batch(reporter(total, compiled))
    assert not runs[2]["fits"]
    assert len(compiled) == 4 and runs[3]["fits"]
    assert 2 < compiled[3] < compiled[2]
    assert compiled[3] <= largest_true(total)


def test_a_batch_the_compiler_refuses_is_walked_back_by_one():
    # A compile refused for lack of HBM may not say how much it needed: no total.
    def total(b):
        return 10e9 + 3e9 * b + 0.05e9 * b * b

    compiled = []
    plain = reporter(total, compiled)

    def compile_at(batch):
        report = plain(batch)
        if not report["fits"]:
            report["memory"]["total"] = None
        return report

    runs = search_batch(compile_at)
    assert compiled == [1, 2, 27, 26]
    assert not runs[2]["fits"] and not runs[3]["fits"]


def test_a_failed_compile_ends_the_search():
    compiled = []

    def compile_at(batch):
        compiled.append(batch)
        return {"error": "refused", "batch_per_chip": batch}

    assert search_batch(compile_at) == [{"error": "refused", "batch_per_chip": 1},
                                        {"error": "refused", "batch_per_chip": 2}]
    assert compiled == [1, 2]


@pytest.mark.parametrize("fixed,per_image", [(1e9, 0.0), (1e9, -1e6)])
def test_memory_that_does_not_grow_is_not_extrapolated(fixed, per_image):
    low = {"batch_per_chip": 1, "memory": {"total": fixed}, "hbm_bytes": HBM}
    high = {"batch_per_chip": 2, "memory": {"total": fixed + per_image}, "hbm_bytes": HBM}
    assert largest_fitting_batch(low, high) is None
    compiled = []
    search_batch(reporter(lambda b: fixed + per_image * (b - 1), compiled))
    assert compiled == [1, 2]


def test_the_extrapolation_is_the_largest_batch_on_the_line():
    low = {"batch_per_chip": 4, "memory": {"total": 20e9}, "hbm_bytes": HBM}
    high = {"batch_per_chip": 8, "memory": {"total": 32e9}, "hbm_bytes": HBM}
    expected = 4 + math.floor((USABLE - 20e9) / 3e9)
    assert largest_fitting_batch(low, high) == expected == 29
