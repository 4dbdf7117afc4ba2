"""Plain-text progress for long runs: one line per batch, no terminal control codes,
so the output reads the same in a terminal, a log file or a batch job's stderr.

    [  6/120]   5%  1.23 images/s  eta 1m33s  (batch of 2 at 256x192)

The rate counts every finished image (written or failed) over the time since the
first batch started, compilation included; the first lines of a run are therefore
pessimistic and the rate climbs as the compiled programs are reused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_line(done: int, total: int, elapsed: float, note: str = "") -> str:
    """One progress line for `done` of `total` images after `elapsed` seconds."""
    width = len(str(total))
    parts = [f"[{done:>{width}}/{total}]", f"{100 * done // max(total, 1):>3}%"]
    if elapsed > 0 and done > 0:
        rate = done / elapsed
        parts.append(f"{rate:.3g} images/s")
        if done < total:
            parts.append(f"eta {format_duration((total - done) / rate)}")
    if note:
        parts.append(f"({note})")
    return "  ".join(parts)


def format_summary(written: int, skipped: int, failed: int, elapsed: float) -> str:
    """The run's last line."""
    line = f"written {written}, skipped {skipped}, failed {failed}"
    if skipped:
        line += " (skipped: output exists; --overwrite redoes them)"
    return f"{line} in {format_duration(elapsed)}"


class Progress:
    """Counts finished images and prints a line per `advance` (see module doc)."""

    def __init__(self, total: int, *, stream=None,
                 clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.done = 0
        self._stream = stream
        self._clock = clock
        self._start = clock()

    def restart_clock(self) -> None:
        """Start timing now (call when the first batch begins, after model loading)."""
        self._start = self._clock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def advance(self, n: int, note: str = "") -> str:
        """Record n more finished images; prints and returns the line."""
        self.done += n
        line = format_line(self.done, self.total, self.elapsed, note)
        stream = self._stream if self._stream is not None else sys.stderr
        print(line, file=stream, flush=True)
        return line
