"""Readers for the checkpoint key/shape listings in tests/data/keys (see its README)."""

from pathlib import Path

KEYS = Path(__file__).parent / "data" / "keys"


def read_listing(name: str) -> dict[str, tuple[int, ...]]:
    """`name<TAB>shape` rows (first line is a header) -> {name: shape}; shapes are
    written `[d0,d1,...]` or as PyTorch's tuple repr `(d0, d1, ...)` (the coser_* files)."""
    out = {}
    for line in (KEYS / name).read_text().splitlines()[1:]:
        if not line:
            continue
        key, shape = line.split("\t")[:2]
        out[key] = tuple(int(d) for d in shape.strip("[]() ").split(",") if d.strip())
    return out


def read_map(name: str) -> list[list[str]]:
    """Rows of a 2- or 3-column mapping file (first line is a header)."""
    return [line.split("\t") for line in (KEYS / name).read_text().splitlines()[1:] if line]
