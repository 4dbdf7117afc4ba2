"""Which images `jaxsr eval` scores: SR files paired with reference files by stem,
grouped by size for batching, and every file left out with the reason.

A file is left out (and listed) when it has no partner with the same stem in the other
folder, shares its stem with another file of its folder (`a.png` and `a.jpg`: which to
pair would be a guess), cannot be read as an image, or differs in size from its partner.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from jaxsr.data.image_io import ImageError
from jaxsr.inference.inputs import discover, read_size


@dataclasses.dataclass(frozen=True)
class Item:
    stem: str
    sr: Path
    hr: Path | None            # None: no-reference evaluation


@dataclasses.dataclass(frozen=True)
class Skip:
    file: str
    reason: str

    def as_dict(self) -> dict:
        return {"file": self.file, "reason": self.reason}


def list_images(folder: Path) -> list[Path]:
    """Every regular, non-hidden file of `folder` (not recursive), sorted."""
    if not Path(folder).is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    return discover([str(folder)]).files


def _by_stem(files: list[Path], what: str, skipped: list[Skip]) -> dict[str, Path]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        groups[f.stem].append(f)
    out = {}
    for stem, group in groups.items():
        if len(group) == 1:
            out[stem] = group[0]
        else:
            names = ", ".join(p.name for p in group)
            skipped += [Skip(str(p), f"several {what} files have the stem {stem!r} "
                                     f"({names}); rename all but one") for p in group]
    return out


def pair(sr_dir: Path, hr_dir: Path | None) -> tuple[list[Item], list[Skip]]:
    """SR files with their reference (by stem), sorted by stem, and the files left out."""
    skipped: list[Skip] = []
    sr = _by_stem(list_images(sr_dir), "SR", skipped)
    if hr_dir is None:
        return [Item(s, p, None) for s, p in sorted(sr.items())], skipped
    hr = _by_stem(list_images(hr_dir), "reference", skipped)
    items = [Item(s, sr[s], hr[s]) for s in sorted(sr.keys() & hr.keys())]
    skipped += [Skip(str(sr[s]), f"no reference image with this stem in {hr_dir}")
                for s in sorted(sr.keys() - hr.keys())]
    skipped += [Skip(str(hr[s]), f"no SR image with this stem in {sr_dir}")
                for s in sorted(hr.keys() - sr.keys())]
    return items, skipped


def group_by_size(items: list[Item]) -> tuple[dict[tuple[int, int], list[Item]], list[Skip]]:
    """{(height, width): items} from the image headers; unreadable files and pairs of
    different sizes are left out with the reason."""
    groups: dict[tuple[int, int], list[Item]] = defaultdict(list)
    skipped: list[Skip] = []
    for item in items:
        try:
            size = read_size(item.sr)
            if item.hr is not None:
                hr_size = read_size(item.hr)
                if hr_size != size:
                    skipped.append(Skip(str(item.sr), f"size {size[1]}x{size[0]} differs from "
                                                      f"the reference's {hr_size[1]}x"
                                                      f"{hr_size[0]} ({item.hr})"))
                    continue
        except ImageError as e:
            skipped.append(Skip(str(item.sr), str(e)))
            continue
        groups[size].append(item)
    return dict(groups), skipped
