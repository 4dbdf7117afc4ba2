"""A TFDS dataset of captioned images with same-class references, from a JSON-lines manifest.

CoSeR trains on images that each carry captions and a few similar images of the same
class (its references). A user describes them in a manifest beside the images, one
JSON object per line, paths relative to the manifest's folder:

    {"image": "n01440764/a.JPEG",
     "captions": ["a photo of tench", "a photo of tench, a man holding a fish"],
     "caption_weights": [0.5, 0.31],
     "references": ["n01440764/b.JPEG", "n01440764/c.JPEG"],
     "reference_weights": [0.93, 0.88]}

- "caption": "..." may stand for a single caption; weights default to equal ones;
- every reference must itself be an "image" of the manifest (CoSeR's references are
  training images of the same class); "references" may be absent (stage 1 needs none);
- `coser_captions` makes CoSeR's caption list (section 5 of the reference notes)
  from a class name and scored captions.

    prepared = prepare_manifest("/data/imagenet512/train.jsonl", data_dir)

writes `jaxsr_captioned_images/<name>/1.0.0` (array_record), one record per manifest
line in manifest order, with features

    image:             the file's own encoded bytes
    file_name:         the manifest's "image"
    captions:          [k] text
    caption_weights:   [k] float32
    references:        [r] int64, record indices of the references
    reference_weights: [r] float32

References are stored as record indices, not as copies of their bytes (CoSeR keeps
ten per image). The dataset name hashes the manifest's path and content, so an
edited manifest is prepared anew; preparing is otherwise done once, under the same
lock as `jaxsr.data.tfds_folder`. Every image is decoded once while preparing; an
unreadable one is an error naming its line (a reference index would dangle if it
were skipped).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxsr.data import tfds_folder

BUILDER_NAME = "jaxsr_captioned_images"
DATASET_VERSION = "1.0.0"
SPLIT = "train"
_CHECK_CHUNK = 256


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    image: str                          # relative to the manifest's folder
    captions: tuple[str, ...]
    caption_weights: tuple[float, ...]
    references: tuple[int, ...]         # entry indices
    reference_weights: tuple[float, ...]


def coser_captions(class_name: str, captions=(), scores=(), *, threshold: float = 0.28,
                   class_weight: float = 0.5) -> tuple[list[str], list[float]]:
    """CoSeR's caption choices for one image: "a photo of {class}" (weight 0.5), "a
    photo of {class}, {caption}" for each caption whose CLIP score is at least
    `threshold` (weight = its score), and all of them joined (weight = their mean
    score). Returns (captions, weights)."""
    head = f"a photo of {class_name}"
    kept = [(c.strip(), float(s)) for c, s in zip(captions, scores, strict=True)
            if float(s) >= threshold]
    out = [(head, class_weight)] + [(f"{head}, {c}", s) for c, s in kept]
    if kept:
        out.append((", ".join([head] + [c for c, _ in kept]),
                    float(np.mean([s for _, s in kept]))))
    return [c for c, _ in out], [w for _, w in out]


def _weights(line: dict, key: str, n: int, where: str) -> tuple[float, ...]:
    weights = line.get(key)
    if weights is None:
        return (1.0,) * n
    if not isinstance(weights, list) or len(weights) != n:
        raise ManifestError(f"{where}: {key!r} must be a list of {n} numbers")
    weights = tuple(float(w) for w in weights)
    if any(not np.isfinite(w) or w < 0 for w in weights) or (n and sum(weights) <= 0):
        raise ManifestError(f"{where}: {key!r} must be non-negative with a positive sum")
    return weights


def read_manifest(path) -> list[ManifestEntry]:
    """Parse and check a manifest (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(line, dict) or not isinstance(line.get("image"), str):
            raise ManifestError(f'{where}: expected an object with an "image" path')
        lines.append((where, line))
    if not lines:
        raise ManifestError(f"manifest {path} has no entries")
    index = {}
    for i, (where, line) in enumerate(lines):
        if line["image"] in index:
            raise ManifestError(f"{where}: image {line['image']!r} is listed twice")
        index[line["image"]] = i
    entries = []
    for where, line in lines:
        captions = line.get("captions", [line["caption"]] if "caption" in line else None)
        if (not isinstance(captions, list) or not captions
                or not all(isinstance(c, str) for c in captions)):
            raise ManifestError(f'{where}: give "caption" (a string) or "captions" (a '
                                "non-empty list of strings)")
        refs = line.get("references", [])
        missing = [r for r in refs if r not in index]
        if missing:
            raise ManifestError(f"{where}: references {missing} are not images of the "
                                "manifest (each reference must have its own line)")
        entries.append(ManifestEntry(
            image=line["image"], captions=tuple(captions),
            caption_weights=_weights(line, "caption_weights", len(captions), where),
            references=tuple(index[r] for r in refs),
            reference_weights=_weights(line, "reference_weights", len(refs), where)))
    return entries


def manifest_dataset_name(manifest) -> str:
    """The manifest's base name plus a hash of its absolute path and content."""
    path = os.path.abspath(os.fspath(manifest))
    base = re.sub(r"[^a-z0-9]+", "_", Path(path).stem.lower()).strip("_") or "manifest"
    digest = zlib.crc32(Path(path).read_bytes(), zlib.crc32(path.encode()))
    return f"{base}_{digest:08x}"


def prepared_dir(data_dir, name: str) -> Path:
    return Path(data_dir) / BUILDER_NAME / name / DATASET_VERSION


@dataclasses.dataclass(eq=False)
class ManifestConfig(tfds.core.BuilderConfig):
    manifest: str = ""


class JaxsrCaptionedImages(tfds.core.GeneratorBasedBuilder):
    """Images of a manifest with their captions and reference indices."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Encoded images, captions, reference indices."}
    code_path = None        # see tfds_folder.JaxsrImageFolder

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Captioned images of {self.builder_config.manifest}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "file_name": tfds.features.Text(),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "caption_weights": tfds.features.Sequence(np.float32),
                "references": tfds.features.Sequence(np.int64),
                "reference_weights": tfds.features.Sequence(np.float32),
            }),
            disable_shuffling=True,  # record i = manifest entry i (references index them)
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {SPLIT: self._generate_examples(self.builder_config.manifest)}

    def _generate_examples(self, manifest):
        entries = read_manifest(manifest)
        root = Path(manifest).parent
        paths = [str(root / e.image) for e in entries]
        for i, (entry, (data, error)) in enumerate(zip(entries, _read_all(paths))):
            if error is not None:
                raise ManifestError(f"{manifest}: entry {i} ({entry.image}): {error}; "
                                    "fix or remove its line")
            # Zero-padded keys sort as the manifest is ordered.
            yield f"{i:012d}", {
                "image": data, "file_name": entry.image,
                "captions": list(entry.captions),
                "caption_weights": np.asarray(entry.caption_weights, np.float32),
                "references": np.asarray(entry.references, np.int64),
                "reference_weights": np.asarray(entry.reference_weights, np.float32)}


def _read_all(paths):
    """(bytes, error) of each path in order, read and checked by a thread pool in chunks,
    so a slow writer never has more than a chunk of file bytes waiting in memory
    (ImageNet has 1.2M images)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), _CHECK_CHUNK):
            yield from pool.map(tfds_folder.read_checked, paths[start:start + _CHECK_CHUNK])


def prepare_manifest(manifest, data_dir) -> Path:
    """Prepare (once) the dataset of `manifest` under `data_dir`; returns its folder."""
    manifest = os.path.abspath(os.fspath(manifest))
    read_manifest(manifest)     # fail on a bad line before taking the lock
    name = manifest_dataset_name(manifest)
    target = prepared_dir(data_dir, name)

    def build():
        print(f"preparing a TFDS dataset of the manifest {manifest} (once)", flush=True)
        tfds_folder.build_quietly(lambda: JaxsrCaptionedImages(
            config=ManifestConfig(name=name, manifest=manifest,
                                  description=f"Captioned images of {manifest}."),
            data_dir=os.fspath(data_dir), file_format="array_record"))

    tfds_folder.prepare_once(target, build)
    return target
