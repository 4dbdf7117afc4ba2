"""Compile a Program for a mesh and report what it needs per chip, with a roofline
prediction of its step time.

The prediction is a model, not a measurement: the step takes the longest of
  compute      flops_per_chip / the chip's peak bf16 FLOP/s,
  memory       hbm_traffic_bytes / its HBM bandwidth,
  collectives  the collectives' wire bytes per chip / half its bidirectional ICI
               bandwidth (what one direction carries),
  dcn          on multi-slice meshes, the bytes of collectives whose groups span
               slices / the chip's data-centre network bandwidth,
as if each overlapped the others perfectly; `bound` names the largest. Real steps
are slower (float32 work runs below the bf16 peak, overlap is partial).
"""

from __future__ import annotations

import math
import re
import time

import jax

from jaxsr.plan.capture import capture_stderr
from jaxsr.plan.chips import Chip
from jaxsr.plan.flops import jaxpr_flops
from jaxsr.plan.hlo import KINDS, collectives
from jaxsr.plan.programs import Program

# What the TPU runtime keeps for itself beside the program (its own buffers, the
# compiled program's scratch beyond the analysis); a plan "fits" only below this.
RUNTIME_HEADROOM = 0.05


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


class DoesNotFit(RuntimeError):
    """The TPU compiler refused the program: it needs more HBM than the chip has."""


_NEED = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\)[^(]*\(([\d.]+)([KMGT])\)")


def _gib(value: str, unit: str) -> float:
    return float(value) * 2.0 ** (10 * "KMGT".index(unit) + 10)


def compile_program(program: Program):
    """(compiled, seconds to compile, compiler warnings, FLOP counts). One trace gives
    both the FLOP count and the lowering."""
    start = time.perf_counter()
    # libtpu may log again while lowering for a multi-host slice: capture it all.
    with capture_stderr() as log:
        traced = program.jitted.trace(*program.args)
        counted = jaxpr_flops(traced.jaxpr.jaxpr)
        try:
            compiled = traced.lower().compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" in str(e):
                raise DoesNotFit(str(e).strip()) from None
            raise
    return compiled, time.perf_counter() - start, log.warnings(), counted


def memory_breakdown(program: Program, compiled) -> dict:
    """Bytes per chip: the program's arguments split by role (exact, from the
    shardings), the compiler's temporaries and generated code, and the total the
    chip must hold at once (arguments + outputs not aliased to a donated argument
    + temporaries + code)."""
    m = compiled.memory_analysis()
    parts = dict(program.argument_parts)
    unaliased_out = max(0, m.output_size_in_bytes - m.alias_size_in_bytes)
    total = (m.argument_size_in_bytes + unaliased_out + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    return {**parts, "arguments": int(m.argument_size_in_bytes),
            "outputs_not_aliased": int(unaliased_out),
            "temporaries": int(m.temp_size_in_bytes),
            "generated_code": int(m.generated_code_size_in_bytes), "total": int(total)}


def roofline(chip: Chip | None, flops: float, hbm_bytes: float, wire_bytes: float,
             images: int, chips: int, peak_flops: float | None = None,
             hbm_bandwidth: float | None = None, link_bandwidth: float | None = None,
             dcn_bytes: float = 0.0) -> dict:
    """Predicted step time and its bound (see the module docstring). wire_bytes: the
    collectives' bytes per chip over ICI; dcn_bytes: those crossing slices."""
    peak = peak_flops or chip.peak_bf16_flops
    hbm = hbm_bandwidth or chip.hbm_bytes_per_s
    link = link_bandwidth or (chip.ici_one_way_bytes_per_s if chip else hbm)
    times = {"compute": flops / peak, "memory": hbm_bytes / hbm,
             "collectives": wire_bytes / link if link else 0.0}
    if dcn_bytes:
        times["dcn"] = dcn_bytes / chip.dcn_bytes_per_s
    step = max(times.values())
    bound = max(times, key=times.get)
    return {"step_s": step, "images_per_s_per_chip": images / chips / step if step else None,
            "mfu": (flops / step) / peak if step else None, "bound": bound,
            "times_s": times,
            "note": "a roofline prediction, not a measurement"}


def plan_program(program: Program, mesh, chip: Chip | None, topology: str,
                 batch_per_chip: int, peak_flops: float | None = None,
                 hbm_bandwidth: float | None = None) -> tuple[dict, object]:
    """(the report dict, the compiled program)."""
    try:
        compiled, compile_s, warnings, counted = compile_program(program)
    except DoesNotFit as e:
        return does_not_fit_report(program, mesh, chip, topology, batch_per_chip,
                                   str(e)), None
    chips = mesh.size
    mem = memory_breakdown(program, compiled)
    cost = _cost(compiled)
    xla_flops = float(cost.get("flops", 0.0))
    flops_per_chip = counted["flops"] / chips
    # XLA counts a loop body once; scale its traffic by the same factor as the FLOPs
    # (an estimate: the loops hold the UNet steps, whose traffic scales with them).
    loop_factor = (counted["flops"] / counted["flops_loops_once"]
                   if counted["flops_loops_once"] else 1.0)
    traffic = float(cost.get("bytes accessed", 0.0)) * loop_factor
    flat = list(mesh.devices.flat)
    multislice = len({getattr(d, "slice_index", 0) or 0 for d in flat}) > 1
    coll = collectives(compiled.as_text(), slice_of=(
        (lambda i: getattr(flat[i], "slice_index", 0) or 0) if multislice else None))
    dcn = sum(coll[k]["dcn_wire_bytes"] for k in KINDS)
    wire = sum(coll[k]["wire_bytes"] for k in KINDS) - dcn
    hbm = chip.hbm_bytes if chip else None
    usable = hbm * (1 - RUNTIME_HEADROOM) if hbm else None
    report = {
        **_header(program, mesh, chip, topology, batch_per_chip),
        "memory": mem,
        "hbm_bytes": hbm,
        "fits": (mem["total"] <= usable) if usable else None,
        "fits_rule": (f"total <= {1 - RUNTIME_HEADROOM:.0%} of HBM "
                      f"({RUNTIME_HEADROOM:.0%} kept for the runtime)"),
        "flops_per_chip": flops_per_chip,
        "flops_counting": "2 x the matmul and convolution MACs of the traced program, "
                          "loops at their trip counts, divided by the chips",
        "xla_flops_per_chip_loops_once": xla_flops,
        "hbm_traffic_bytes": traffic,
        "collectives": {k: coll[k] for k in KINDS},
        "collective_loops_of_unknown_trip_count": coll["unknown_trip_counts"],
        "predicted": roofline(chip, flops_per_chip, traffic, wire, program.images_per_call,
                              chips, peak_flops, hbm_bandwidth, dcn_bytes=dcn),
        "warnings": warnings,
        "compile_s": round(compile_s, 1),
        "notes": list(program.notes),
    }
    if chip:
        report["chip_facts"] = {"peak_bf16_flops": chip.peak_bf16_flops,
                                "hbm_bytes_per_s": chip.hbm_bytes_per_s,
                                "ici_bytes_per_s": chip.ici_bytes_per_s,
                                "dcn_bytes_per_s": chip.dcn_bytes_per_s,
                                "source": chip.source, "note": chip.note}
    return report, compiled


def _header(program: Program, mesh, chip: Chip | None, topology: str,
            batch_per_chip: int) -> dict:
    """What every report starts with: where and what was planned."""
    return {"topology": topology,
            "chip": chip.name if chip else mesh.devices.flat[0].device_kind,
            "chips": mesh.size, "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "program": program.name, "batch_per_chip": batch_per_chip,
            "images_per_step": program.images_per_call}


def does_not_fit_report(program: Program, mesh, chip: Chip | None, topology: str,
                        batch_per_chip: int, message: str) -> dict:
    """The report of a program the compiler refused for lack of HBM: the same keys,
    fits False, the compiler's message, and the bytes it said it needed when it says."""
    need = _NEED.search(message)
    required = _gib(need.group(1), need.group(2)) if need else None
    return {
        **_header(program, mesh, chip, topology, batch_per_chip),
        "memory": {**program.argument_parts, "temporaries": None, "generated_code": None,
                   "total": required},
        "hbm_bytes": chip.hbm_bytes if chip else None, "fits": False,
        "fits_rule": "the TPU compiler refused the program: " + message.splitlines()[0],
        "flops_per_chip": None, "hbm_traffic_bytes": None,
        "collectives": {k: None for k in KINDS}, "predicted": None,
        "warnings": [message.splitlines()[0]], "notes": list(program.notes),
    }


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def format_report(r: dict) -> str:
    """The report as a short table for the terminal."""
    m, p = r["memory"], r["predicted"]
    if p is None:
        return (f"{r['program']} on {r['topology']}, mesh {r['mesh']}, "
                f"{r['batch_per_chip']} per chip: does NOT fit ({r['fits_rule']})")
    rows = [
        ("program", f"{r['program']} on {r['topology']} ({r['chips']} x {r['chip']}), "
                    f"mesh {r['mesh']}, {r['batch_per_chip']} per chip"),
        *(("notes", note) for note in r.get("notes", [])),
        ("memory per chip", f"params {_gb(m['params'])}, optimizer {_gb(m['optimizer'])}, "
                            f"frozen {_gb(m['frozen'])}, batch {_gb(m['batch'])}, "
                            f"temporaries {_gb(m['temporaries'])}, code "
                            f"{_gb(m['generated_code'])}"),
        ("total / HBM", f"{_gb(m['total'])} / {_gb(r['hbm_bytes'])}: "
                        + ("fits" if r["fits"] else "does NOT fit" if r["fits"] is False
                           else "unknown HBM")),
        ("FLOPs per chip", f"{r['flops_per_chip'] / 1e12:.3f} TFLOP"),
        ("HBM traffic", _gb(r["hbm_traffic_bytes"])),
        ("collectives", ", ".join(f"{k} {v['count']} x / {_gb(v['bytes'])}"
                                  for k, v in r["collectives"].items() if v["count"])
         or "none"),
        ("predicted (roofline)", f"{p['step_s'] * 1e3:.1f} ms per step, "
                                 f"{p['images_per_s_per_chip']:.2f} images/s/chip, MFU "
                                 f"{p['mfu']:.0%}, {p['bound']}-bound"),
    ]
    if "measured" in r:
        rows.append(("measured", f"{r['measured']['step_s'] * 1e3:.1f} ms per step "
                                 f"(median of {r['measured']['repeats']})"))
    rows.append(("warnings", "; ".join(r["warnings"]) if r["warnings"] else "none"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def measure(compiled, program: Program, repeats: int = 3) -> dict:
    """Run a program compiled for attached devices on zero inputs; median step time."""
    import numpy as np

    def zeros(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                keys = jax.random.split(jax.random.key(0), math.prod(x.shape) or 1)
                return jax.device_put(keys.reshape(x.shape), x.sharding)
            return jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
        return x

    args = jax.tree.map(zeros, program.args)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        if i:
            times.append(time.perf_counter() - start)
        if program.name.endswith("train"):
            args = (out[0],) + tuple(args[1:])       # the state was donated
    return {"step_s": float(np.median(times)), "repeats": repeats}
