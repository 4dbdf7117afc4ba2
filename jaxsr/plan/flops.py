"""FLOPs of a traced program with every loop at its trip count.

XLA's cost analysis counts a while loop's body once, whatever its trip count, so the
attention chunk loops, the gradient-accumulation scan and the sampling loop would
hide most of the work. `analytic_flops` counts 2 x the multiply-accumulates of every
dot_general and conv_general_dilated in the jaxpr instead, scans at their lengths,
with jaxsr's row-chunked ops traced in one piece (`unchunked`: the same FLOPs, no
loop) and dead code removed as XLA removes it.
"""

from __future__ import annotations

import contextlib
import math
import sys


@contextlib.contextmanager
def unchunked():
    """Trace jaxsr's row-chunked ops in one piece instead of a `lax.map`: softmax
    attention, the argmax reference attention of CoSeR's AiA UNet and the CPU
    feed-forward. The FLOPs are the same, but XLA's cost analysis counts a loop body
    once, so a loop would hide all its other steps. Each module reads its threshold
    at trace time, so they are raised while tracing; JAX's caches are cleared on the
    way in and out, because a cached trace of the same function would not look."""
    import jax

    from jaxsr.nn import attention, hard_attention, transformer

    knobs = [(attention, "MAX_ITEM_LOGITS"), (hard_attention, "MIN_CHUNKED_Q_LEN"),
             (transformer, "CPU_FF_STEP_FLOATS")]
    saved = [getattr(m, name) for m, name in knobs]
    jax.clear_caches()
    for m, name in knobs:
        setattr(m, name, sys.maxsize)
    try:
        yield
    finally:
        for (m, name), value in zip(knobs, saved):
            setattr(m, name, value)
        jax.clear_caches()


def _subjaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def _dot_macs(eqn) -> int:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)


def _conv_macs(eqn) -> int:
    # Each output element sums over the kernel window and the input features of its
    # group: the kernel's in-feature and spatial dims (rhs_spec[1:]).
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[d] for d in spec[1:])


def count_macs(jaxpr) -> tuple[int, int, int]:
    """(MACs with scans at their trip counts, MACs with every loop body once, MACs in
    while loops of unknown trip count, counted once) of dot_general and
    conv_general_dilated in a jaxpr and everything it calls. A cond counts its
    costliest branch."""
    total = once = in_while = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            m = _dot_macs(eqn)
            total, once = total + m, once + m
        elif name == "conv_general_dilated":
            m = _conv_macs(eqn)
            total, once = total + m, once + m
        elif name == "cond":
            counts = [count_macs(b.jaxpr) for b in eqn.params["branches"]]
            t, o, w = max(counts)
            total, once, in_while = total + t, once + o, in_while + w
        else:
            reps = eqn.params["length"] if name == "scan" else 1
            for sub in _subjaxprs(eqn.params):
                t, o, w = count_macs(sub)
                total, once = total + reps * t, once + o
                in_while += reps * w + (t if name == "while" else 0)
    return total, once, in_while


def analytic_flops(fn, *args) -> dict:
    """2 × conv/matmul MACs of `fn` traced on `args` (arrays or ShapeDtypeStructs),
    after dead-code elimination."""
    import jax

    with unchunked():
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return jaxpr_flops(jaxpr)


def jaxpr_flops(jaxpr) -> dict:
    """`analytic_flops` of an already traced jaxpr. The row-chunk loops are scans of
    known length, so a trace with them counts the same (only XLA's cost analysis
    needs `unchunked`)."""
    try:
        # Tracing keeps work whose results are dropped (e.g. the encoder tail behind
        # the CFW features); XLA deletes it, so the count must too. Private API: on
        # failure count everything and say so.
        from jax._src.interpreters import partial_eval as pe

        jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
        pruned = True
    except Exception:
        pruned = False
    total, once, in_while = count_macs(jaxpr)
    return {"flops": 2.0 * total, "flops_loops_once": 2.0 * once,
            "flops_in_unknown_loops": 2.0 * in_while, "dead_code_removed": pruned}
