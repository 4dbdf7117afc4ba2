"""Training logs: JSON lines, TensorBoard event files (tensorboardX, no TensorFlow) and a
console progress line. Only process 0 writes; the others stay silent."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax


class MetricWriter:
    def __init__(self, workdir, total_steps: int, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.total = total_steps
        self.started = time.monotonic()
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
            self._tb.flush()
        self._progress(step, metrics)

    def image(self, step: int, name: str, image) -> None:
        """image: uint8 [H, W, 3]."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")
            self._tb.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def _progress(self, step: int, m: dict) -> None:
        width = 24
        done = min(step / max(self.total, 1), 1.0)
        bar = "#" * int(done * width) + "." * (width - int(done * width))
        parts = [f"step {step}/{self.total} [{bar}]"]
        for key, fmt in (("loss", ".4f"), ("grad_norm", ".3f"), ("images_per_s", ".2f"),
                         ("tflops_per_device", ".3f")):
            if key in m and math.isfinite(float(m[key])):
                parts.append(f"{key} {float(m[key]):{fmt}}")
        elapsed = time.monotonic() - self.started
        parts.append(f"{elapsed:.0f}s")
        print("  ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
