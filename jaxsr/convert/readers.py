"""Checkpoint files -> {name: numpy array}, dtypes exactly as stored.

    .safetensors                 jaxsr's own reader (`SafetensorsFile`), no torch
    *.safetensors.index.json     sharded diffusers/transformers checkpoints
    .bin .pth .pt .ckpt          PyTorch pickles, only through
                                 torch.load(weights_only=True): a pickle that carries
                                 anything but tensors and plain containers is refused

Nothing is read before it is used. A safetensors checkpoint comes back as a
`LazyStateDict`: its keys, dtypes and shapes from the header, each tensor read from
disk when it is looked up (and not kept). A PyTorch pickle is memory-mapped where
its format allows (the zip format of every torch >= 1.6 save), so its tensors are
file pages the kernel can drop again. Converting CoSeR reads three checkpoints of
21 GB together; held in memory at once they would not fit a 24 GB machine.

bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (jax reads them without
a copy); torch cannot export bf16 to numpy, so pickled bf16 tensors are
reinterpreted bit for bit.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16" dtype name for safetensors
import numpy as np

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# safetensors dtype codes -> numpy, for the raw-bytes fallback
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (damaged, unsafe, or of an unknown kind)."""


def read_state_dict(path, *, unwrap: tuple[str, ...] = ("state_dict", "model")) -> Mapping:
    """Every tensor of a checkpoint file as numpy (dtype as stored, no casts): a
    `LazyStateDict` for safetensors, a dict of memory-mapped arrays for pickles.

    Args:
      path: a .safetensors file, a sharded `*.safetensors.index.json`, or a PyTorch
        pickle (.bin/.pth/.pt/.ckpt).
      unwrap: for pickles, top-level keys whose dict holds the tensors (Lightning's
        "state_dict", RAM's "model"); the first present is used and the other
        top-level entries (optimizer state, epoch, ...) are dropped. () keeps the
        top level as is.
    Raises:
      FileNotFoundError if `path` does not exist; CheckpointReadError (naming the
      file) if it is damaged, of an unknown kind, or an unsafe pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.name.endswith(".safetensors.index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, unwrap)
    raise CheckpointReadError(f"{path}: unknown checkpoint kind (expected .safetensors, "
                              f"a sharded *.safetensors.index.json or one of "
                              f"{', '.join(PICKLE_SUFFIXES)})")


def read_safetensors(path) -> LazyStateDict:
    """The tensors of one .safetensors file, each read when looked up. The header is
    validated on opening, so a truncated or overlapping file fails here, naming it."""
    f = SafetensorsFile(path)
    return LazyStateDict({key: (f, key) for key in f.keys()})


class LazyStateDict(Mapping):
    """A read-only {name: numpy array} whose tensors stay on disk until looked up.

    Every lookup reads the tensor again (nothing is cached): a converter that walks
    the checkpoint once holds one tensor at a time beyond what it keeps. `info(name)`
    gives (dtype, shape) from the header without reading.
    """

    def __init__(self, entries: dict[str, tuple[SafetensorsFile, str]]):
        self._entries = entries

    def __getitem__(self, name: str) -> np.ndarray:
        f, key = self._entries[name]
        return f.read(key)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        f, key = self._entries[name]
        return f.info(key)


class KeyView(Mapping):
    """{new name: state[old name]} over another mapping, lazily: a renamed or filtered
    view of a (lazy) state dict that reads nothing until looked up."""

    def __init__(self, state: Mapping, names: dict[str, str]):
        self._state, self._names = state, names

    def __getitem__(self, name: str):
        return self._state[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        return stored_info(self._state, self._names[name])


def stored_info(state: Mapping, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of state[name], from a lazy mapping's header when it has one."""
    if hasattr(state, "info"):
        return state.info(name)
    value = np.asarray(state[name])
    return value.dtype, value.shape


class SafetensorsFile:
    """A .safetensors file read one tensor at a time, with plain reads into fresh arrays.

        with SafetensorsFile(path) as f:
            for key in f.keys():
                array = f.read(key)          # dtype and shape as stored

    safetensors' own reader maps the file, and every page it touched stays resident
    until the file is closed: reading a 4.5 GB UNet tensor by tensor that way leaves
    4.5 GB resident. Here a tensor costs its own size while it is alive and nothing
    after, so weights can stream from disk to the devices. The header is checked
    as the library checks it (known dtypes, sizes that match the shapes, byte ranges
    that tile the data exactly); CheckpointReadError names the file otherwise.
    """

    _MAX_HEADER = 100 << 20

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._entries, self._data_start = self._parse_header()
        except Exception:
            self._file.close()
            raise

    def _damaged(self, why: str) -> CheckpointReadError:
        return CheckpointReadError(f"{self.path}: not a readable safetensors file, damaged or "
                                   f"truncated ({why})")

    def _parse_header(self):
        size = self.path.stat().st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._damaged("shorter than its header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, self._MAX_HEADER):
            raise self._damaged(f"header length {n} exceeds the file")
        try:
            header = json.loads(self._file.read(n))
        except ValueError as e:
            raise self._damaged(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._damaged("header is not a JSON object")
        header.pop("__metadata__", None)
        entries, spans = {}, []
        for key, info in header.items():
            try:
                dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._damaged(f"tensor {key!r} has a bad entry {info!r}") from None
            if min(shape, default=0) < 0 or end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise self._damaged(f"tensor {key!r}: {end - begin} bytes for shape {shape}")
            entries[key] = (dtype, shape, begin)
            spans.append((begin, end))
        covered = 0
        for begin, end in sorted(spans):
            if begin != covered:
                raise self._damaged(f"tensor byte ranges overlap or leave a gap at {covered}")
            covered = end
        if 8 + n + covered != size:
            raise self._damaged(f"the tensors need {8 + n + covered} bytes, the file has {size}")
        return entries, 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor, from the header alone."""
        dtype, shape, _ = self._entries[key]
        return dtype, shape

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin = self._entries[key]
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._file.seek(self._data_start + begin)
        got = self._file.readinto(view)
        if got != out.nbytes:
            raise self._damaged(f"tensor {key!r} ends early")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_sharded(index_path: Path) -> LazyStateDict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointReadError(f"{index_path}: not a sharded-checkpoint index ({e!r})") from None
    entries = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{shard_path} (a shard listed in {index_path}) is missing")
        f = SafetensorsFile(shard_path)
        entries.update({k: (f, k) for k in f.keys() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(entries))
    if missing:
        raise CheckpointReadError(f"{index_path}: shards lack {len(missing)} indexed tensors, "
                                  f"e.g. {missing[:5]}")
    return LazyStateDict(entries)


def _read_pickle(path: Path, unwrap) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointReadError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch, the CPU "
            "build is enough) or convert it to .safetensors first") from None
    try:
        obj = _torch_load(torch, path)
    except pickle.UnpicklingError as e:
        # weights_only's unpickler raises this for any global outside its allow-list
        # (the object is never constructed); a damaged legacy pickle raises it too.
        if "weights_only" in str(e) or "Unsupported" in str(e):
            raise CheckpointReadError(
                f"{path}: refused, the pickle holds objects other than tensors and plain "
                "containers; jaxsr only loads pickles with torch.load(weights_only=True). "
                "If you trust the file, re-save its tensors with safetensors.") from None
        raise CheckpointReadError(f"{path}: damaged PyTorch pickle ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated zips, bad magic, EOF: all "damaged"
        raise CheckpointReadError(f"{path}: cannot be read as a PyTorch checkpoint, damaged "
                                  f"or truncated ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        for key in unwrap:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {key: _tensor_to_numpy(value) for key, value in obj.items()
            if isinstance(value, torch.Tensor)}


def _torch_load(torch, path: Path):
    """torch.load(weights_only=True), memory-mapped when the file's format allows (the
    zip format; older files are read whole)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zipfile" not in str(e).lower():
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _tensor_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:   # torch cannot export bf16 to numpy: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
