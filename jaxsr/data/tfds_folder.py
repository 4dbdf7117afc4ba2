"""A TFDS dataset made from a folder of images (LSDIR, FFHQ, your own photos).

    prepare_folder("/data/LSDIR", data_dir, "lsdir")
    # -> data_dir/jaxsr_image_folder/lsdir/1.0.0/  (array_record shards + metadata)

One builder, `jaxsr_image_folder`, with one config per prepared folder (the config
name is the dataset name). It has a single split, "train", with features

    image:     the file's own encoded bytes (PNG/JPEG/WebP/BMP, not re-encoded)
    file_name: the path relative to the folder, with "/" separators

Records are in sorted file-name order (TFDS's key shuffling is off), so record i is
the i-th readable image of the sorted listing and the same folder always gives the
same dataset. Images are stored as encoded bytes, never as arrays: encoding arrays
is the one thing TFDS needs TensorFlow for, and storing the original bytes also
keeps the data exactly as the files hold it.

Every file is decoded once while preparing, with the decoder the training input
uses, so a corrupt or unreadable image is skipped (with a one-line
`SkippedImageWarning` naming it) instead of failing a training run hours later.

Preparing is idempotent: a prepared dataset is reused as it is (to pick up changed
files, delete its folder or prepare under another name). It is also safe when
several processes start at once: TFDS writes into a temporary folder and renames
it when done, and here one process at a time builds, holding a lock file next to
the dataset, while the others wait for the finished dataset (this works on a
shared file system and on per-host disks alike).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import os
import re
import socket
import time
import warnings
import zlib
from pathlib import Path

import tensorflow_datasets as tfds

from jaxsr.data.image_bytes import decode_image_bytes
from jaxsr.data.image_io import ImageError

BUILDER_NAME = "jaxsr_image_folder"
DATASET_VERSION = "1.0.0"
SPLIT = "train"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Files are checked in chunks on a thread pool (PIL decodes without the GIL); a chunk
# bounds how many encoded images are held in memory at once.
_CHECK_CHUNK = 64


class SkippedImageWarning(UserWarning):
    """An image file in a folder being prepared could not be read; it was left out."""


def list_images(image_dir) -> list[str]:
    """Image files under `image_dir`, recursively, as sorted relative POSIX paths.

    Extensions are matched case-insensitively; hidden files and folders (names
    starting with ".") are ignored.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    found = []
    for folder, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append((Path(folder) / f).relative_to(root).as_posix())
    return sorted(found)


def folder_dataset_name(image_dir) -> str:
    """A dataset name for a folder: its base name plus a hash of its absolute path, so
    two folders that share a base name do not share a dataset ("lsdir_1c2d3e4f")."""
    path = os.path.abspath(os.fspath(image_dir))
    base = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path.rstrip(os.sep)).lower()).strip("_")
    return f"{base or 'images'}_{zlib.crc32(path.encode()):08x}"


def prepared_dir(data_dir, name: str) -> Path:
    """Where `prepare_folder(..., data_dir, name)` puts the dataset."""
    return Path(data_dir) / BUILDER_NAME / name / DATASET_VERSION


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """One prepared folder: `name` is the dataset name, `image_dir` the folder read."""

    image_dir: str = ""


class JaxsrImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images of a folder, recursively, as encoded bytes plus relative file names."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Encoded image bytes and relative file names, sorted."}
    # TFDS locates a builder's source file (for download checksums, which this builder
    # has none of) through `importlib_resources`, a backport it declares only for
    # Python < 3.9 yet imports on every version: without it, preparing fails with
    # "No module named 'importlib_resources'". No source file, no lookup.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Images read from {self.builder_config.image_dir}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "file_name": tfds.features.Text(),
            }),
            disable_shuffling=True,  # keep sorted file order: record i = i-th image
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {SPLIT: self._generate_examples(self.builder_config.image_dir)}

    def _generate_examples(self, image_dir):
        names = list_images(image_dir)
        if not names:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {image_dir}")
        kept = 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for start in range(0, len(names), _CHECK_CHUNK):
                chunk = names[start:start + _CHECK_CHUNK]
                paths = [os.path.join(image_dir, n) for n in chunk]
                for name, (data, error) in zip(chunk, pool.map(read_checked, paths)):
                    if error is not None:
                        warnings.warn(f"skipping {error}", SkippedImageWarning, stacklevel=1)
                        continue
                    kept += 1
                    yield name, {"image": data, "file_name": name}
        if not kept:
            raise ValueError(f"none of the {len(names)} image files under {image_dir} "
                             "could be read")


def read_checked(path: str) -> tuple[bytes | None, ImageError | None]:
    """(file bytes, None) if the file decodes as an image, else (None, the error)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, ImageError(f"{path}: cannot read ({e.strerror or e})")
    try:
        decode_image_bytes(data, path)
    except ImageError as e:
        return None, e
    return data, None


def prepare_folder(image_dir, data_dir, name: str, *, wait_timeout_s: float = 6 * 3600,
                   poll_s: float = 1.0) -> None:
    """Write the images of `image_dir` as the array_record dataset
    `jaxsr_image_folder/<name>` under `data_dir`, unless it is there already.

    When another process is preparing the same dataset (its lock file exists), this
    waits up to `wait_timeout_s` for it to finish instead of building it twice.
    """
    image_dir = os.path.abspath(os.fspath(image_dir))
    prepare_once(prepared_dir(data_dir, name), lambda: _build(image_dir, data_dir, name),
                 wait_timeout_s=wait_timeout_s, poll_s=poll_s)


def prepare_once(target: Path, build, *, wait_timeout_s: float = 6 * 3600,
                 poll_s: float = 1.0) -> None:
    """Run `build()` (which must leave a finished TFDS dataset at `target`) unless the
    dataset is there already, one process at a time: see `prepare_folder`."""
    lock = target.parent / f".{target.name}.lock"
    deadline = time.monotonic() + wait_timeout_s
    while True:
        if _is_prepared(target):
            return
        if _take_lock(lock):
            try:
                if not _is_prepared(target):  # another process may have just finished
                    build()
            finally:
                lock.unlink(missing_ok=True)
            return
        if _lock_is_stale(lock):
            lock.unlink(missing_ok=True)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {wait_timeout_s:.0f} s for another process to prepare {target} "
                f"(lock {lock}: {_read_text(lock)}); if no process is preparing it, "
                "delete the lock file and retry")
        time.sleep(poll_s)


def _build(image_dir: str, data_dir, name: str) -> None:
    print(f"preparing a TFDS dataset of the images in {image_dir} (once; nothing is "
          "downloaded)", flush=True)
    build_quietly(lambda: JaxsrImageFolder(
        config=ImageFolderConfig(name=name, image_dir=image_dir,
                                 description=f"Images read from {image_dir}."),
        data_dir=os.fspath(data_dir), file_format="array_record"))


def build_quietly(make_builder) -> None:
    """make_builder().download_and_prepare() for a builder with nothing to download."""
    # TFDS's progress bars, its "Downloading and preparing" message and its warning
    # about custom configs would suggest a download; the line above says what happens.
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.disable_progress_bar()
    try:
        builder = make_builder()
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.enable_progress_bar()


def _is_prepared(target: Path) -> bool:
    # TFDS renames the finished folder into place, so its metadata file appears atomically.
    return (target / "dataset_info.json").is_file()


def _take_lock(lock: Path) -> bool:
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _lock_is_stale(lock: Path) -> bool:
    """A lock left by a process of this host that no longer runs (killed while building).
    Locks from other hosts cannot be checked and are waited on."""
    parts = _read_text(lock).split()
    if len(parts) != 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
