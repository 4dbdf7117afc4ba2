"""Which files `jaxsr sr` reads, where each result goes, and which are already done.

Inputs. Each command-line INPUT is
- an existing file: taken as it is (whatever its extension);
- a folder: its regular, non-hidden files (every one, so that a file PIL cannot read
  is reported rather than silently passed over); subfolders only with `recursive`;
- otherwise a glob pattern (`*`, `?`, `[...]`; `**` with `recursive`), expanded here
  for shells that did not; a folder it matches is listed like a folder given by name.
An INPUT that is none of these is "missing". The same file named twice counts once.
Files inside the output folder are never inputs (so `jaxsr sr photos/* --output
photos/sr` does not upscale its own earlier results).

Order and noise. The inputs are sorted by absolute path. An input's random-stream id
is the CRC-32 of its output file name, so its result depends on the seed and that
name only: not on batching, on the other inputs, or on which of them a rerun (which
skips finished files) still has to do.

Output names. `<output>/<stem>.png`, unless several inputs share a stem (compared
case-insensitively, as on macOS/Windows file systems): those keep their extension,
`a.jpg.png` and `a.png.png`. A name that is still taken (the same file name in two
folders, or an input literally called `a.jpg.png`) gets `.2`, `.3`, ... before `.png`
in input order: `a.png.2.png`. With several samples per input (`jaxsr sr
--sample-times K`) every input has K jobs, one per output `<name>-s0.png` ...
`<name>-s{K-1}.png` (<name> the single-sample name without `.png`). Each is planned,
skipped when done and given its random stream on its own: the stream comes from the
output name, so the samples differ and an interrupted run redoes only missing ones.
These names cannot collide, since the last `-s<digits>` of a name gives its
single-sample name back.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from jaxsr.data.image_io import ImageError, reading_image

_GLOB_CHARS = frozenset("*?[")
_ORIENTATION_TAG = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)     # EXIF orientations that turn the image by 90°
MIN_SIDE = 8                             # pixels; smaller inputs are refused


@dataclasses.dataclass(frozen=True)
class Discovery:
    files: list[Path]          # sorted by absolute path, unique
    missing: list[str]         # INPUTs that named nothing
    in_output: int             # files left out because they lie in the output folder


@dataclasses.dataclass(frozen=True)
class Job:
    index: int                 # position in the sorted input list
    source: Path
    output: Path

    @property
    def stream(self) -> int:
        """The random-stream id: CRC-32 of the output file name (see module doc)."""
        return zlib.crc32(self.output.name.encode("utf-8"))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_folder(folder: Path, recursive: bool, skip: Path | None) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        root_path = Path(root)
        # Pruning `dirs` in place keeps os.walk out of hidden folders and the output.
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d)
                         and (skip is None or (root_path / d).resolve() != skip))
        found += [root_path / f for f in sorted(files)
                  if not _is_hidden(f) and (root_path / f).is_file()]
        if not recursive:
            break
    return found


def _absolute(path: Path) -> Path:
    # Normalised but symlinks kept: the user's own spelling of where a file lives.
    return Path(os.path.abspath(path))


def _inside(path: Path, folder: Path) -> bool:
    resolved = path.resolve()
    return folder == resolved.parent or folder in resolved.parents


def discover(specs: Iterable[str], *, recursive: bool = False,
             output_dir: str | os.PathLike | None = None) -> Discovery:
    """Expand command-line INPUTs into a sorted list of unique files (see module doc)."""
    out = Path(output_dir).resolve() if output_dir is not None else None
    candidates: list[Path] = []
    missing: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            candidates += _list_folder(path, recursive, out)
        elif path.exists():
            candidates.append(path)
        elif _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=recursive))
            if not matches:
                missing.append(spec)
            for m in map(Path, matches):
                candidates += _list_folder(m, recursive, out) if m.is_dir() else [m]
        else:
            missing.append(spec)
    unique: dict[Path, Path] = {}
    in_output = 0
    for c in candidates:
        if out is not None and _inside(c, out):
            in_output += 1
            continue
        unique.setdefault(c.resolve(), c)
    files = sorted(unique.values(), key=lambda p: str(_absolute(p)))
    return Discovery(files=files, missing=missing, in_output=in_output)


def output_names(files: Sequence[Path]) -> list[str]:
    """One distinct PNG file name per input, in input order (rules in the module doc)."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem.casefold()] = stems.get(f.stem.casefold(), 0) + 1
    taken: set[str] = set()
    names = []
    for f in files:
        first = f"{f.stem}.png" if stems[f.stem.casefold()] == 1 else f"{f.name}.png"
        name, k = first, 1
        while name.casefold() in taken:
            k += 1
            name = f"{first[:-len('.png')]}.{k}.png"
        taken.add(name.casefold())
        names.append(name)
    return names


def sample_names(name: str, samples: int) -> list[str]:
    """An input's output names: [name] for one sample, else name-s0.png ... (0-based, as
    test_seesr.py's sample00, sample01, ... folders)."""
    if samples == 1:
        return [name]
    return [f"{name[:-len('.png')]}-s{k}.png" for k in range(samples)]


def plan_jobs(files: Sequence[Path], output_dir: str | os.PathLike,
              samples: int = 1) -> list[Job]:
    """Pair every input with its index and output paths: `samples` jobs per input, in
    input order, its samples together."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    out = Path(output_dir)
    return [Job(index=i, source=f, output=out / sample)
            for i, (f, name) in enumerate(zip(files, output_names(files)))
            for sample in sample_names(name, samples)]


def for_process(jobs: Sequence[Job], process_index: int, process_count: int) -> list[Job]:
    """This host's share of a multi-host run: every process_count-th job."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process {process_index} of {process_count}")
    return list(jobs[process_index::process_count])


def split_done(jobs: Sequence[Job], overwrite: bool) -> tuple[list[Job], list[Job]]:
    """(to do, already done). Outputs are written atomically, so an existing file is a
    finished result, never a half-written one."""
    if overwrite:
        return list(jobs), []
    done = [j for j in jobs if j.output.is_file()]
    todo = [j for j in jobs if not j.output.is_file()]
    return todo, done


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as `load_image` will return it, from the header only.

    The EXIF orientation is honoured where it is known without decoding (JPEG, WebP,
    TIFF, and PNG when the eXIf chunk precedes the pixels). Raises ImageError for files
    that are not images, cannot be opened, or are smaller than MIN_SIDE on a side.
    """
    path = os.fspath(path)
    with reading_image(path):
        with Image.open(path) as img:
            width, height = img.size
            if img.format != "PNG" or "exif" in img.info:
                # PNG's getexif() would decode the whole image to look for a late chunk.
                if img.getexif().get(_ORIENTATION_TAG, 1) in _SWAPPED_ORIENTATIONS:
                    width, height = height, width
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{path}: too small ({width}x{height} px; at least {MIN_SIDE} px "
                         "a side)")
    return height, width
