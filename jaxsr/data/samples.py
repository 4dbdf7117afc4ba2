"""Sample photos for the quickstart, shipped inside an installed package (no download).

scikit-image's wheel carries a handful of photographs in `skimage/data/`
(installed with the package; other images of its gallery are fetched on first
use, and none of those are used here). The four below are colour photos, at
least 300 px on each side, free of copyright restrictions (public domain or CC0,
per scikit-image's own notes):

    astronaut  512 x 512   NASA, public domain
    chelsea    451 x 300   a cat; CC0, Stefan van der Walt
    coffee     600 x 400   a coffee cup; CC0, Rachel Michetti
    rocket     640 x 427   a Falcon 9 launch; SpaceX, public domain

    train_dir, held_out = sample_image_folder("/tmp/samples")
    # train_dir = /tmp/samples/train (3 photos), held_out = /tmp/samples/eval/chelsea.png
    jaxsr train ... --config.data.source=folder:/tmp/samples/train

Install with the `quickstart` extra (`pip install jaxsr[quickstart]`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SAMPLES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
}
DEFAULT_HELD_OUT = "chelsea"
PACKAGE = "skimage"
EXTRA = "quickstart"


class SamplesUnavailableError(ImportError):
    """The package that carries the sample photos is not installed."""


def package_data_dir() -> Path:
    """The `skimage/data` folder of the installed scikit-image."""
    try:
        import skimage  # scikit-image imports its submodules lazily: this is cheap
    except ImportError as e:
        raise SamplesUnavailableError(
            "the sample images ship with scikit-image, which is not installed: "
            f"pip install 'jaxsr[{EXTRA}]' (or pip install scikit-image)") from e
    return Path(skimage.__file__).resolve().parent / "data"


def sample_image_paths() -> list[Path]:
    """The sample photos' files inside the installed package, in `SAMPLES` order."""
    folder = package_data_dir()
    paths = [folder / f for f in SAMPLES.values()]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SamplesUnavailableError(
            f"scikit-image at {folder.parent} lacks {', '.join(missing)}; reinstall it "
            f"(pip install --force-reinstall 'jaxsr[{EXTRA}]')")
    return paths


def sample_image_folder(dest, *, held_out: str | None = DEFAULT_HELD_OUT
                        ) -> tuple[Path, Path | None]:
    """Copy the sample photos into dest/train/, except `held_out` (a `SAMPLES` name),
    which goes to dest/eval/ (None: all to train/).

    Returns (the train folder, the held-out photo's path or None). Earlier copies are
    replaced, so calling this again gives the same folders."""
    if held_out is not None and held_out not in SAMPLES:
        raise ValueError(f"held_out must be one of {', '.join(SAMPLES)} or None, "
                         f"got {held_out!r}")
    dest = Path(dest)
    paths = dict(zip(SAMPLES, sample_image_paths()))
    for sub in ("train", "eval"):
        for name in SAMPLES.values():
            (dest / sub / name).unlink(missing_ok=True)
    (dest / "train").mkdir(parents=True, exist_ok=True)
    if held_out is not None:
        (dest / "eval").mkdir(parents=True, exist_ok=True)
    kept_out = None
    for name, path in paths.items():
        target = dest / ("eval" if name == held_out else "train") / path.name
        # A copy, not a link: the folder must survive the package being upgraded.
        shutil.copyfile(path, target)
        os.chmod(target, 0o644)
        if name == held_out:
            kept_out = target
    return dest / "train", kept_out
