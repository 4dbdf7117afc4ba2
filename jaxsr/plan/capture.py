"""Capture what native code writes to the process's stderr (file descriptor 2).

libtpu and the XLA compilers log through C++ straight to fd 2, which Python's
`contextlib.redirect_stderr` does not see. `jaxsr plan` needs both halves of that
stream: libtpu's start-up noise kept out of the user's terminal, and the compiler's
warnings (e.g. "involuntary full rematerialization") kept for the report.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# Start-up messages of libtpu on a host that is not a TPU VM. They say the host has no
# TPU, which is the point of compiling for a described topology.
_NOISE = (
    "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "Logging before InitGoogle",
    "Failed to find host bounds", "Source Location Trace", "libtpu_init_utils",
    "could not determine TPU", "unexpected worker hostname",
)
# absl/glog line prefix: severity letter, MMDD, time, thread id, file:line]
_GLOG = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] (.*)$")


class Captured:
    """Text written to fd 2 inside `capture_stderr()` (available after the block)."""

    def __init__(self):
        self.text = ""

    def lines(self) -> list[str]:
        return [ln for ln in self.text.splitlines() if ln.strip()]

    def warnings(self) -> list[str]:
        """Compiler warnings and errors: glog lines of severity W/E/F and lines that
        say WARNING, without libtpu's start-up noise, de-duplicated in order."""
        out: list[str] = []
        for ln in self.lines():
            if any(n in ln for n in _NOISE):
                continue
            m = _GLOG.match(ln)
            if m:
                if m.group(1) == "I":
                    continue
                msg = f"{m.group(2)}: {m.group(3)}"
            elif "warning" in ln.lower():
                msg = ln.strip()
            else:
                continue
            if msg not in out:
                out.append(msg)
        return out


@contextlib.contextmanager
def capture_stderr():
    """Redirect fd 2 to a temporary file for the block; yields a `Captured`."""
    captured = Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", "replace")
