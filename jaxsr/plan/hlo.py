"""Collectives of a compiled SPMD program, read from its HLO text, per step.

    collectives(compiled.as_text()) -> {"all-gather": {"count", "bytes", "wire_bytes",
                                                       "dcn_wire_bytes"}, ...}

Each computation is weighted by how often one call of the entry runs it: a while
body by its trip count (`trip_count`; 1, and counted in `unknown_trip_counts`, when
it cannot be read), a fusion or call by its call sites. So a collective in
the gradient-accumulation scan or the sampling loop counts once per iteration.

`bytes` is the size of the full buffer each collective moves (the gathered result of
an all-gather, the summed input of a reduce-scatter or all-reduce, the operand of an
all-to-all or collective-permute). `wire_bytes` is what one chip sends for it with a
ring or bidirectional algorithm over a group of g chips: (g-1)/g of the buffer for
all-gather, reduce-scatter and all-to-all, twice that for all-reduce, the whole
buffer for a collective-permute.

The TPU compiler writes some reduce-scatters as a fusion (`all-reduce-scatter`)
around an all-reduce and a slice: those all-reduces count as reduce-scatters.
Collectives across slices of a multi-slice mesh become host transfers to the
megascale (data-centre network) runtime: a `send` named after the collective; its
buffer counts as that kind's bytes, all of them on the DCN (`dcn_wire_bytes`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute",
}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"\b(calls|body|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e\w*|bf16|f16|f32|f64|"
                    r"c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32,
         "u32": 32, "s64": 64, "u64": 64, "bf16": 16, "f16": 16, "f32": 32, "f64": 64,
         "c64": 64, "c128": 128}
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")


def _shape_bytes(dtype: str, dims: str) -> int:
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    bits = _BITS.get(dtype, 8)   # fp8 variants: 8 bits
    return n * bits // 8


def result_bytes(result_type: str, opcode: str) -> int:
    """Bytes of the buffer a collective moves, from its result type. `-start` ops
    return (operand, result, ...) tuples: the result is the second element."""
    shapes = [_shape_bytes(t, d) for t, d in _SHAPE.findall(result_type)]
    if not shapes:
        return 0
    if opcode.endswith("-start") and result_type.lstrip().startswith("(") and len(shapes) > 1:
        return shapes[1]
    return sum(shapes)


def group_size(line: str) -> int:
    """Chips in each replica group of a collective (2 for a collective-permute, or
    when the line names no groups this parser reads)."""
    groups = replica_groups(line)
    return max(1, len(groups[0])) if groups else 2


_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{(\{[\d,{}]*\})\}")


def _iota(shape: str, dims: str, perm: str | None):
    import numpy as np

    dims_ = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(dims_)).reshape(dims_)
    if perm:
        ids = ids.transpose([int(p) for p in perm.split(",")])
    return ids.reshape([int(d) for d in shape.split(",")])


def replica_groups(line: str) -> list[list[int]] | None:
    """The device ids of each group of a collective (pairs for a collective-permute),
    or None when the line gives no groups this parser reads."""
    import numpy as np

    m = _PAIRS.search(line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}",
                                                                      m.group(1))]
    m = re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}",
                                                                      m.group(1))]
    m = re.search(r"replica_groups=" + _IOTA.pattern, line)
    if m:
        return _iota(m.group(1), m.group(2), m.group(3)).tolist()
    m = _GROUPS_MESH.search(line)
    if m:
        axes = re.findall(r"'([\w]+)'=(\d+)", m.group(1))
        named = set(re.findall(r"'([\w]+)'", m.group(2)))
        sizes = [int(n) for _, n in axes]
        dev = re.search(r"device_ids=\(\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?\)",
                        line)
        if dev:
            ids = _iota(",".join(map(str, sizes)), dev.group(2) or dev.group(1),
                        dev.group(3))
        else:
            ids = np.arange(math.prod(sizes)).reshape(sizes)
        grouped = [i for i, (a, _) in enumerate(axes) if a in named]
        rest = [i for i in range(len(axes)) if i not in grouped]
        size = math.prod(sizes[i] for i in grouped)
        return ids.transpose(rest + grouped).reshape(-1, size).tolist()
    return None


def wire_fraction(kind: str, g: int) -> float:
    if kind == "collective-permute":
        return 1.0
    if g <= 1:
        return 0.0
    share = (g - 1) / g
    return 2 * share if kind == "all-reduce" else share


def split_computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """{name: instruction lines} and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            comps[current].append(line)
    return comps, entry


_COND = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONSTANT = re.compile(r"= [su]32\[\][^ ]* constant\((\d+)\)")


def trip_count(while_line: str, comps: dict[str, list[str]]) -> int | None:
    """A while loop's trip count: the compiler's `known_trip_count`, else the bound of
    a condition `i < N` with N its only integer constant (a counted loop from 0, as
    lax.fori_loop and scan lower), else None."""
    known = _TRIP.search(while_line)
    if known:
        return int(known.group(1))
    cond = _COND.search(while_line)
    lines = comps.get(cond.group(1), []) if cond else []
    if not any("compare(" in ln and "direction=LT" in ln for ln in lines):
        return None
    bounds = {int(m.group(1)) for ln in lines for m in [_INT_CONSTANT.search(ln)] if m}
    return bounds.pop() if len(bounds) == 1 else None


def multiplicities(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], int]:
    """(runs of each computation per call of `entry`, while loops of unknown trip count)."""
    sites: dict[str, list[tuple[str, int]]] = defaultdict(list)
    unknown = 0
    for name, lines in comps.items():
        for line in lines:
            for attr, target in _CALLS.findall(line):
                factor = 1
                if attr == "body":
                    trip = trip_count(line, comps)
                    factor = trip or 1
                    unknown += trip is None
                for callee in re.findall(r"%?([\w.\-]+)", target.strip("{}")):
                    if callee in comps:
                        sites[name].append((callee, factor))
    mult: dict[str, int] = defaultdict(int)

    def visit(name: str, m: int, depth: int = 0):
        mult[name] += m
        if depth > 64:          # HLO call graphs are DAGs; this only guards the parser
            return
        for callee, factor in sites.get(name, ()):
            visit(callee, m * factor, depth + 1)

    visit(entry, 1)
    return dict(mult), unknown


_RENDEZVOUS = re.compile(r'_xla_host_transfer_rendezvous="([a-z\-]+)')


def _count_megascale(out: dict, line: str, result_type: str, m: int) -> None:
    """A collective across slices: the compiler sends this slice's part to the
    megascale (DCN) runtime as a host transfer named after the collective."""
    name = _RENDEZVOUS.search(line)
    kind = name.group(1).rstrip("-") if name else "all-reduce"
    kind = kind if kind in out else "all-reduce"
    shapes = _SHAPE.findall(result_type)
    size = _shape_bytes(*shapes[0]) if shapes else 0
    entry = out[kind]
    entry["count"] += m
    entry["bytes"] += m * size
    entry["wire_bytes"] += m * size
    entry["dcn_wire_bytes"] += m * size


def collectives(text: str, slice_of=None) -> dict:
    """{kind: {"count", "bytes", "wire_bytes", "dcn_wire_bytes"}} per call of the
    entry computation, for every kind in KINDS, plus "unknown_trip_counts" (loops
    counted once).

    slice_of: device id -> slice index (multi-slice meshes); a collective whose group
    spans slices has its wire bytes counted as DCN bytes too."""
    comps, entry = split_computations(text)
    out = {k: {"count": 0, "bytes": 0, "wire_bytes": 0.0, "dcn_wire_bytes": 0.0}
           for k in KINDS}
    if entry is None:
        return {**out, "unknown_trip_counts": 0}
    mult, unknown = multiplicities(comps, entry)
    for name, lines in comps.items():
        m = mult.get(name, 0)
        if not m:
            continue
        for line in lines:
            ins = _INSTR.match(line)
            if ins and ins.group(2) == "send" and "xla_megascale_runtime" in line:
                _count_megascale(out, line, ins.group(1), m)
                continue
            if not ins or ins.group(2) not in _OPCODES:
                continue
            kind = _OPCODES[ins.group(2)]
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            size = result_bytes(ins.group(1), ins.group(2))
            entry_ = out[kind]
            entry_["count"] += m
            entry_["bytes"] += m * size
            wire = m * size * wire_fraction(kind, group_size(line))
            entry_["wire_bytes"] += wire
            if slice_of is not None:
                groups = replica_groups(line) or []
                if any(len({slice_of(d) for d in g}) > 1 for g in groups):
                    entry_["dcn_wire_bytes"] += wire
    for v in out.values():
        v["wire_bytes"] = int(round(v["wire_bytes"]))
        v["dcn_wire_bytes"] = int(round(v["dcn_wire_bytes"]))
    return {**out, "unknown_trip_counts": unknown}
