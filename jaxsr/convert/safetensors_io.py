"""Writing safetensors files from numpy, atomically.

safetensors.numpy names a numpy dtype by `dtype.name`; importing `ml_dtypes` makes
"bfloat16" one of those names, so bfloat16 arrays are stored as BF16 like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16" dtype name for safetensors
import numpy as np
from safetensors.numpy import save_file


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write via a temporary file and a rename: a crash never leaves a half-written file."""
    path = Path(path)
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # keeps 0-d shapes
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
    os.replace(tmp, path)
