"""Checkpoint files -> {name: numpy array}, without importing torch for safetensors.

    .safetensors                 parsed here (header + memory map); bf16 via ml_dtypes
    *.safetensors.index.json     sharded diffusers/transformers checkpoints
    .bin .pth .pt .ckpt          PyTorch pickles, only through
                                 torch.load(weights_only=True): a pickle that carries
                                 anything but tensors and plain containers is refused
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (damaged, unsafe, or of an unknown kind)."""


def read_state_dict(path, *, unwrap: tuple[str, ...] = ("state_dict", "model")) -> dict:
    """Read every tensor of a checkpoint file as numpy (dtype as stored).

    A pickled dict whose tensors sit under one of `unwrap` (Lightning's
    "state_dict", RAM's "model") is unwrapped; other top-level entries are dropped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, unwrap)
    raise CheckpointReadError(f"{path}: unknown checkpoint kind (expected .safetensors, "
                              f"a sharded index .json or one of {PICKLE_SUFFIXES})")


def read_safetensors(path) -> dict:
    """Parse the safetensors format: u64 header length, JSON header, raw little-endian data."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointReadError(f"{path}: not a readable safetensors file ({e})") from None
    data_start = 8 + header_len
    header.pop("__metadata__", None)
    if not header:
        return {}
    end = max(int(info["data_offsets"][1]) for info in header.values())
    if data_start + end > size:
        raise CheckpointReadError(f"{path}: truncated ({size} bytes, the header promises "
                                  f"{data_start + end})")
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(end,))
    out = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointReadError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        lo, hi = (int(o) for o in info["data_offsets"])
        out[key] = buf[lo:hi].view(dtype).reshape(info["shape"])
    return out


def _read_sharded(index_path: Path) -> dict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise CheckpointReadError(f"{index_path}: not a sharded-checkpoint index ({e})") from None
    out = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_state_dict(index_path.parent / shard)
        out.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointReadError(f"{index_path}: shards lack {len(missing)} indexed tensors, "
                                  f"e.g. {missing[:5]}")
    return out


def _read_pickle(path: Path, unwrap) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointReadError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch, the CPU "
            "build is enough) or convert it to .safetensors first") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for bad pickles
        kind = type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointReadError(
                f"{path}: refused, the pickle holds objects other than tensors ({kind}); "
                "jaxsr only loads pickles with torch.load(weights_only=True)") from None
        raise CheckpointReadError(f"{path}: cannot be read as a PyTorch checkpoint "
                                  f"({kind}: {e})") from None
    if isinstance(obj, dict):
        for key in unwrap:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[key] = _tensor_to_numpy(value)
    return out


def _tensor_to_numpy(t):
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
