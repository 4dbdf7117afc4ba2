"""Training image sources: prepared TFDS datasets read as random-access sources.

    source = open_source("folder:/data/LSDIR", data_dir)      # any image folder
    source = open_source("div2k/bicubic_x4:train", data_dir)  # a TFDS catalog dataset
    len(source); source[i]  # -> {"image": uint8 [H, W, 3]}

Spec forms:

- `folder:<path>`: the images under <path> (recursively). Prepared on first use as
  `jaxsr_image_folder/<base name>_<path hash>` under `data_dir` (see
  `jaxsr.data.tfds_folder`); later calls, and other processes, reuse it.
- `<dataset>[/<config>][:<version>][:<split>]`: a dataset from the TFDS catalog, or
  any dataset TFDS prepared under `data_dir`, e.g. "div2k/bicubic_x4:train",
  "div2k/realistic_wild_x4:validation", "coco/2017:train". The split defaults to
  "train". It must already be prepared in array_record format: nothing is
  downloaded here (`tfds build <dataset>/<config> --data_dir=<data_dir>
  --file_format=array_record` does that, and needs TensorFlow for most catalog
  datasets). The HR image is the "hr" feature where there is one (div2k), else
  "image"; `image_key` picks another.

Prepared datasets are opened from their own metadata files
(`tfds.builder_from_directory`), then `as_data_source`, as `tfds.data_source`
does after constructing the catalog's Python builder; skipping that builder
matters because some (coco) import TensorFlow just to be constructed.

Images are kept encoded in the records and decoded here with PIL (not by TFDS), to
uint8 RGB with grayscale, palette, alpha and 16-bit images converted as
`jaxsr.data.image_io.load_image` converts files.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path

import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from jaxsr.data import tfds_folder
from jaxsr.data.image_bytes import decode_image_bytes

FOLDER_PREFIX = "folder:"
DEFAULT_SPLIT = "train"
_VERSION = re.compile(r"^(\d+|\*)\.(\d+|\*)\.(\d+|\*)$")


class SourceError(ValueError):
    """A source spec that cannot be opened; the message says why and what to do."""


class ImageSource:
    """Random access to the HR images of one split of a prepared TFDS dataset.

    Implements grain's random-access source protocol (`len`, `[i]`). Each record
    decodes to {"image": uint8 [H, W, 3]}. Picklable (grain worker processes get a
    copy; TFDS's array_record source reopens its files there).
    """

    def __init__(self, data_source, image_key: str, description: str):
        self._records = data_source
        self.image_key = image_key
        self.description = description

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[int(index)]
        name = record.get("file_name")
        name = name.decode() if isinstance(name, bytes) else name
        return {"image": decode_image_bytes(record[self.image_key],
                                            f"{self.description}[{int(index)}]"
                                            + (f" ({name})" if name else ""))}

    def __repr__(self) -> str:
        return f"ImageSource({self.description}, {len(self)} images, key={self.image_key!r})"


@dataclasses.dataclass(frozen=True)
class CatalogSpec:
    """A parsed `<dataset>[/<config>][:<version>][:<split>]` spec."""

    dataset: str
    config: str | None
    version: str | None
    split: str

    @property
    def tfds_name(self) -> str:
        """The name as TFDS spells it: "dataset[/config][:version]"."""
        name = self.dataset + (f"/{self.config}" if self.config else "")
        return name + (f":{self.version}" if self.version else "")


def default_data_dir() -> str:
    """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return tfds_constants.get_default_data_dir()


def open_source(spec: str, data_dir=None, *, image_key: str | None = None) -> ImageSource:
    """A grain-compatible random-access source of uint8 RGB images for `spec`
    (see the module docstring). `data_dir` defaults to TFDS's default data dir."""
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    if spec.startswith(FOLDER_PREFIX):
        image_dir = spec[len(FOLDER_PREFIX):]
        if not image_dir:
            raise SourceError("folder source: give a path, as in folder:/data/LSDIR")
        name = tfds_folder.folder_dataset_name(image_dir)
        tfds_folder.prepare_folder(image_dir, data_dir, name)
        builder = tfds.builder_from_directory(tfds_folder.prepared_dir(data_dir, name))
        return _image_source(builder, tfds_folder.SPLIT, image_key, spec)
    catalog = parse_catalog_spec(spec)
    return _image_source(_prepared_builder(catalog, data_dir), catalog.split, image_key, spec)


def parse_catalog_spec(spec: str) -> CatalogSpec:
    """Split "div2k/bicubic_x4:2.0.0:train" into its parts (split defaults to "train";
    a trailing part that looks like a version is a version, not a split)."""
    spec = spec.strip()
    if not spec:
        raise SourceError("empty source spec: give folder:<path> or a TFDS name like "
                          "div2k/bicubic_x4:train")
    head, *tail = spec.split(":")
    if len(tail) > 2:
        raise SourceError(f"source spec {spec!r}: expected <dataset>[/<config>]"
                          "[:<version>][:<split>]")
    version = split = None
    for part in tail:
        if _VERSION.match(part) and version is None and split is None:
            version = part
        elif split is None and part:
            split = part
        else:
            raise SourceError(f"source spec {spec!r}: expected <dataset>[/<config>]"
                              "[:<version>][:<split>]")
    dataset, _, config = head.partition("/")
    if not dataset or "/" in config:
        raise SourceError(f"source spec {spec!r}: expected <dataset>[/<config>]")
    return CatalogSpec(dataset, config or None, version, split or DEFAULT_SPLIT)


def resolve_catalog(catalog: CatalogSpec):
    """The registered TFDS builder class for `catalog`, after checking that it has the
    named config. Constructs nothing and reads no files."""
    try:
        cls = tfds.builder_cls(catalog.dataset)
    except tfds.core.registered.DatasetNotFoundError:
        names = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(catalog.dataset, names, n=5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SourceError(f"{catalog.dataset!r} is not a TFDS dataset{hint}; for a folder "
                          "of images use folder:<path>") from None
    configs = sorted(cls.builder_configs)
    if catalog.config and configs and catalog.config not in cls.builder_configs:
        raise SourceError(f"TFDS dataset {catalog.dataset!r} has no config "
                          f"{catalog.config!r}; its configs: {', '.join(configs)}")
    return cls


def _prepared_builder(catalog: CatalogSpec, data_dir: str):
    try:
        cls = tfds.builder_cls(catalog.dataset)
    except tfds.core.registered.DatasetNotFoundError:
        cls = None  # not in the catalog, but a dataset prepared elsewhere may be on disk
    config = catalog.config
    if config is None and cls is not None and cls.default_builder_config is not None:
        config = cls.default_builder_config.name
    found = _prepared_dir(data_dir, catalog.dataset, config, catalog.version)
    if found is not None:
        return tfds.builder_from_directory(found)
    # Not on disk: say whether the name is wrong or the dataset is just not prepared.
    cls = resolve_catalog(catalog)
    name = cls.name + (f"/{config}" if config else "")
    if cls.name == tfds_folder.BUILDER_NAME:
        raise SourceError(f"{name} is not prepared under {data_dir}: image folders are "
                          "prepared by the source spec folder:<path>")
    raise SourceError(
        f"TFDS dataset {name}{f' version {catalog.version}' if catalog.version else ''} "
        f"is not prepared under {data_dir} (jaxsr never downloads datasets). Prepare it "
        "once, where its download is reachable and (for most catalog datasets) "
        f"TensorFlow is installed: `tfds build {name} --data_dir={data_dir} "
        "--file_format=array_record`, then copy the data dir to the training machines "
        "if they do not share it.")


def _prepared_dir(data_dir: str, dataset: str, config: str | None,
                  version: str | None) -> Path | None:
    """data_dir/dataset[/config]/version holding a finished dataset (the newest version
    when none is given), or None. TFDS renames a finished dataset into place, so
    its dataset_info.json marks it as complete."""
    root = Path(data_dir) / dataset / (config or "")
    if version is not None and "*" not in version:
        candidates = [root / version]
    else:
        pattern = re.compile("^" + (version or "*.*.*").replace(".", r"\.")
                             .replace("*", r"\d+") + "$")
        candidates = sorted((p for p in root.glob("*") if pattern.match(p.name)),
                            key=lambda p: tuple(int(x) for x in p.name.split(".")),
                            reverse=True)
    return next((p for p in candidates if (p / "dataset_info.json").is_file()), None)


def _image_source(builder, split: str, image_key: str | None, description: str):
    info = builder.info
    if split not in info.splits:
        raise SourceError(f"{description}: no split {split!r}; splits: "
                          f"{', '.join(sorted(info.splits))}")
    formats = {info.file_format, *info.alternative_file_formats}
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
        raise SourceError(
            f"{description}: prepared as {info.file_format.value}, but random access "
            "needs array_record; rebuild it with `tfds build ... --file_format="
            "array_record` or convert it with `tfds convert_format`")
    images = [k for k, f in info.features.items() if isinstance(f, tfds.features.Image)]
    key = image_key or ("hr" if "hr" in images else "image")
    if key not in images:
        raise SourceError(f"{description}: no image feature {key!r}; image features: "
                          f"{', '.join(images) or 'none'} (choose one with image_key=)")
    # Every image stays encoded (decoding div2k's unused "lr" would double the work).
    records = builder.as_data_source(
        split=split, decoders={k: tfds.decode.SkipDecoding() for k in images})
    return ImageSource(records, key, description)
