"""Writing safetensors files from numpy, atomically and one tensor at a time.

The header (names, dtypes, shapes, byte ranges) is computed from the arrays first,
then each array's bytes are written in C order straight from it. safetensors' own
writer builds the whole file in memory first; for a 4.5 GB UNet whose converted
kernels are transposed views that meant two more copies of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxsr.convert.readers import _SAFETENSORS_DTYPES

_DTYPE_CODES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write via a temporary file and a rename: a crash never leaves a half-written file.

    tensors: {name: array} of any layout (views are written in C order); dtypes
    float64/32/16, bfloat16, int64/32/16/8, uint8, bool. metadata: {str: str}.
    """
    path = Path(path)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    header, offset = {}, 0
    for name, a in arrays.items():
        if a.dtype not in _DTYPE_CODES:
            raise TypeError(f"{name}: safetensors has no dtype for {a.dtype}")
        header[name] = {"dtype": _DTYPE_CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)            # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays.values():
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
