"""CoSeR's training input: GT image, tokenised caption and a reference, with grain.

    source = open_manifest_source("/data/imagenet512/train.jsonl", data_dir)
    it = make_coser_iterator(source, tokenizer, global_batch_size=32, size=512, seed=0,
                             process_index=0, process_count=1, with_reference=True)
    batch = next(it)
    # {"hr": uint8 [b, 512, 512, 3], "ids": int32 [b, 77], "ref": uint8 [b, 512, 512, 3],
    #  "index": int64 [b]}

Per example (coser_reference.md section 5), all on the host:
- the GT is the whole image at size × size: CoSeR's images are made so offline (BOX
  halving while the short side is at least twice the size, bicubic to a short side of
  `size`, centre crop); an image that is not size × size yet is made so here with
  the same steps (deterministic, so prepare the images once offline for speed);
  then flipped left to right with probability 1/2 (the only augmentation);
- one caption, drawn with probability ∝ its weight, tokenised with the CLIP tokenizer
  to 77 ids (padded, truncated with the end token kept);
- with_reference: one reference, drawn ∝ its weight, squared the same way, never
  cropped or flipped. An example without references is an error then.

The draws (flip, caption, reference, in that order) come from the example's own
stream seeded by (seed, epoch, source index), and the order, sharding, batching,
workers and iterator state are those of `jaxsr.data.train_input.make_train_iterator`
(this module only supplies the per-example map), so the input is as deterministic
and resumable as SeeSR's.
"""

from __future__ import annotations

import grain
import numpy as np

from jaxsr.data import tfds_manifest
from jaxsr.data.image_bytes import decode_image_bytes
from jaxsr.data.train_input import make_train_iterator

_COSER_STREAM = 0xC05E
TEXT_LENGTH = 77


class ManifestSource:
    """Random access to the raw records of a prepared manifest dataset (grain's source
    protocol; picklable). record -> {"image": bytes, "file_name": bytes, "captions":
    [k] bytes, "caption_weights": [k], "references": [r], "reference_weights": [r]}."""

    def __init__(self, records, description: str):
        self._records = records
        self.description = description

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[int(index)]

    def __repr__(self) -> str:
        return f"ManifestSource({self.description}, {len(self)} images)"


def open_manifest_source(manifest, data_dir) -> ManifestSource:
    """Prepare (once) and open the TFDS dataset of a CoSeR manifest (tfds_manifest)."""
    import tensorflow_datasets as tfds

    folder = tfds_manifest.prepare_manifest(manifest, data_dir)
    builder = tfds.builder_from_directory(folder)
    records = builder.as_data_source(split=tfds_manifest.SPLIT,
                                     decoders={"image": tfds.decode.SkipDecoding()})
    return ManifestSource(records, str(manifest))


def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3]: halve with a box filter while the short side
    is at least 2·size, bicubic (PIL) to a short side of `size`, centre crop. An image
    that is size × size already is returned as it is."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    from PIL import Image

    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize((max(size, round(pil.width * scale)), max(size, round(pil.height * scale))),
                     Image.Resampling.BICUBIC)
    out = np.asarray(pil, np.uint8)
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return np.ascontiguousarray(out[top:top + size, left:left + size])


def _choose(rng: np.random.Generator, weights) -> int:
    """Index i with probability weights[i] / sum(weights), from one uniform draw."""
    cdf = np.cumsum(np.asarray(weights, np.float64))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class CoSeRExample(grain.transforms.MapWithIndex):
    """(stream index g, record) -> {"hr", "ids", ["ref"], "index"}; see the module
    docstring. `source` is read again for the reference's record."""

    def __init__(self, source, tokenizer, size: int, seed: int, with_reference: bool):
        self.source = source
        self.tokenizer = tokenizer
        self.size = int(size)
        self.seed = int(seed)
        self.with_reference = bool(with_reference)

    def _image(self, record, index: int) -> np.ndarray:
        name = _text(record["file_name"])
        image = decode_image_bytes(record["image"], f"{self.source.description}[{index}] "
                                                    f"({name})")
        return square_image(image, self.size)

    def map_with_index(self, index: int, record: dict) -> dict:
        from jaxsr.models.tokenizer import tokenize

        epoch, i = divmod(int(index), len(self.source))
        rng = np.random.default_rng([self.seed, _COSER_STREAM, epoch, i])
        hr = self._image(record, i)
        if rng.random() < 0.5:
            hr = np.ascontiguousarray(hr[:, ::-1])
        captions = [_text(c) for c in record["captions"]]
        caption = captions[_choose(rng, record["caption_weights"])]
        out = {"hr": hr, "ids": tokenize(self.tokenizer, caption, TEXT_LENGTH)[0],
               "index": np.int64(i)}
        if self.with_reference:
            refs = np.asarray(record["references"])
            if refs.size == 0:
                raise ValueError(f"{self.source.description}: image {i} "
                                 f"({_text(record['file_name'])}) has no references; CoSeR "
                                 "stage 2 needs at least one per image")
            j = int(refs[_choose(rng, record["reference_weights"])])
            out["ref"] = self._image(self.source[j], j)
        return out


def make_coser_iterator(source, tokenizer, *, global_batch_size: int, size: int, seed: int,
                        process_index: int, process_count: int, with_reference: bool,
                        shuffle: bool = True, num_epochs: int | None = None,
                        worker_count: int = 0, read_options: grain.ReadOptions | None = None):
    """A grain iterator of this process's CoSeR batches (see the module docstring);
    get_state()/set_state() resume it exactly."""
    return make_train_iterator(
        source, global_batch_size=global_batch_size, crop_size=size, seed=seed,
        process_index=process_index, process_count=process_count, shuffle=shuffle,
        num_epochs=num_epochs, worker_count=worker_count, read_options=read_options,
        transform=CoSeRExample(source, tokenizer, size, seed, with_reference))
