"""Progress per denoising step, reported from inside the compiled sampling loops.

    with step_progress.listening(lambda step, total, loop: print(loop, step, total)):
        pipe.upscale(images, options=SeeSROptions(step_progress=True))

A sampling loop is one jitted `lax.fori_loop`, so the host hears nothing until the
program returns. With the pipelines' `step_progress` option (a static setting: part of
their compile-cache key, so programs with and without it never mix) each loop body
calls `report(i, total, loop)`, which adds an unordered `jax.debug.callback` carrying
the step index; the callback feeds nothing back into the computation, so the images
are the same to the bit. Without the option no callback is traced at all.

The host side: the callback reaches every listener registered with `listening` (a
process-wide registry under a lock; the callback arrives on a runtime thread, not
the caller's). Under SPMD the callback may fire once per device, from devices a few
steps apart (JAX 0.10 places the pipelines' unpartitioned callback on one device of
their data-parallel mesh, but does not promise it); each listener therefore reports a
loop's steps 1..N once each and in order, counting a step whose callback comes late
as done when a later one arrives. `tracked` wraps a pipeline's compiled program: it
starts every listener's count afresh and waits for the outputs, so all of a call's
callbacks land in that call. A compiled program knows no request, so concurrent
requests would hear each other's steps: the app runs one request at a time.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import jax

# loop names the pipelines report: SeeSR's one loop, CoSeR's reference generation and
# SR pass (the tiled mode has the SR pass only).
DENOISE, REFERENCE, SR = "denoise", "reference", "sr"

OnStep = Callable[[int, int, str], None]       # (step 1..total, total, loop)

_LOCK = threading.Lock()
_LISTENERS: dict[int, StepListener] = {}
_IDS = itertools.count()


class StepListener:
    """Turns the raw per-device callbacks of one request into steps 1..N of each loop,
    each once, in order, passed to `on_step(step, total, loop)`."""

    def __init__(self, on_step: OnStep):
        self.on_step = on_step
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}           # loop -> last step reported this call

    def new_call(self) -> None:
        """A compiled program starts: its loops count from step 1 again."""
        with self._lock:
            self._last.clear()

    def __call__(self, step: int, total: int, loop: str) -> None:
        # Held while reporting, so that two devices' callbacks cannot interleave
        # their steps: the listener sees a monotonic sequence.
        with self._lock:
            last = self._last.get(loop, 0)
            for s in range(last + 1, min(step, total) + 1):
                self.on_step(s, total, loop)
            self._last[loop] = max(last, step)


@contextmanager
def listening(on_step: OnStep | StepListener):
    """Registers a `StepListener` for `on_step` (or `on_step` itself when it is one) for
    the `with` block; yields it."""
    listener = on_step if isinstance(on_step, StepListener) else StepListener(on_step)
    with _LOCK:
        key = next(_IDS)
        _LISTENERS[key] = listener
    try:
        yield listener
    finally:
        with _LOCK:
            del _LISTENERS[key]


def _listeners() -> list[StepListener]:
    with _LOCK:
        return list(_LISTENERS.values())


def _deliver(total: int, loop: str, index) -> None:
    """Host side of `report`: index is the loop's 0-based step (a numpy scalar)."""
    for listener in _listeners():
        listener(int(index) + 1, total, loop)


def report(index, total: int, loop: str) -> None:
    """Inside a traced loop body: tell the listeners that step `index` (0-based, a traced
    int scalar) of `total` of `loop` is being computed. total and loop are static."""
    jax.debug.callback(partial(_deliver, int(total), str(loop)), index, ordered=False)


def tracked(program) -> TrackedProgram:
    """`program` (a jitted function) as a `TrackedProgram`."""
    return TrackedProgram(program)


class TrackedProgram:
    """A compiled program that restarts every listener's count per call and returns
    only when its outputs (and so all its callbacks) are done. Other attributes
    (`lower`, ...) are the program's."""

    def __init__(self, program):
        self.program = program

    def __call__(self, *args, **kwargs):
        for listener in _listeners():
            listener.new_call()
        return jax.block_until_ready(self.program(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self.program, name)
