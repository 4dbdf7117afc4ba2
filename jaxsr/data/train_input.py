"""The training input: random HR crops from an image source, sharded per process, with grain.

    it = make_train_iterator(source, global_batch_size=32, crop_size=512, seed=0,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)   # {"hr": uint8 [32 // process_count, 512, 512, 3], "index": int64 [b]}
    state = it.get_state()   # a JSON-able dict: save it with ocp.args.JsonSave(state)
    it.set_state(state)      # on an iterator made with the same arguments: resumes exactly

Order. The element stream is a pure function of (seed, source length, process
index and count): epoch e is a permutation of the source drawn from (seed, e),
and process p takes positions p, p + P, p + 2P, ... of it, for the first
N - N % P positions only, so every process gets the same number of examples and
the processes' shares of an epoch are disjoint and together cover it (the
N % P left-over examples change from epoch to epoch). Without `shuffle` the
permutation is the identity. Each process then batches its own stream with
`global_batch_size // process_count` examples per batch (batches may straddle
an epoch boundary; with `num_epochs` set, an incomplete last batch is dropped).

Augmentation, as in SeeSR's training data (RealESRGANDataset with a 512 crop):
an image smaller than the crop is first padded at the bottom and right by
reflection without repeating the edge pixel (OpenCV's BORDER_REFLECT_101),
then a uniformly placed crop_size x crop_size crop is taken, then flipped left
to right with probability 1/2. No rotation, no resize. The random draws for an
example come from its own stream seeded by (seed, epoch, source index), so an
example's crop does not depend on the process count, the worker count or where
it lands in a batch.

`augment="resize"` instead resizes the whole image to crop_size x crop_size with
PIL's Lanczos filter, ignoring the aspect ratio, and does not flip: how DAPE's
training pairs were made from COCO (seesr_reference.md section 6, "GT source (DAPE)").

Batching happens before the iterator is made, so a batch is a fixed set of
stream positions: grain worker processes (`worker_count > 0`) each produce whole
batches and the sequence of batches is the same for any worker count.
"""

from __future__ import annotations

import os

import grain
import numpy as np

# Purpose tags mixed into the seed, so the shuffle and the crops never share a stream.
_SHUFFLE_STREAM = 0x5F1E
_AUGMENT_STREAM = 0xC409


class RandomCropFlip(grain.transforms.MapWithIndex):
    """{"image": uint8 [H, W, 3]} at stream index g -> {"hr": uint8 [c, c, 3], "index": int64},
    where g = epoch * source_length + source index (what grain passes to a map
    placed directly on the source, below the shuffle)."""

    def __init__(self, crop_size: int, seed: int, source_length: int):
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.source_length = int(source_length)

    def map_with_index(self, index: int, element: dict) -> dict:
        epoch, source_index = divmod(int(index), self.source_length)
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, epoch, source_index])
        hr = random_crop_flip(element["image"], self.crop_size, rng)
        return {"hr": hr, "index": np.int64(source_index)}


class ResizeWhole(grain.transforms.MapWithIndex):
    """{"image": uint8 [H, W, 3]} -> {"hr": uint8 [c, c, 3], "index": int64}: the whole
    image resized with Lanczos (deterministic, so it needs no random stream)."""

    def __init__(self, size: int, source_length: int):
        self.size = int(size)
        self.source_length = int(source_length)

    def map_with_index(self, index: int, element: dict) -> dict:
        from PIL import Image

        image = Image.fromarray(element["image"])
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        return {"hr": np.asarray(image, np.uint8),
                "index": np.int64(int(index) % self.source_length)}


AUGMENTS = ("crop_flip", "resize")


def random_crop_flip(image: np.ndarray, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [crop_size, crop_size, 3]: reflect-101 pad (bottom, right)
    up to the crop size if smaller, a uniform random crop, a horizontal flip with p=1/2.
    Draws from `rng`, in order: top, left, flip."""
    c = crop_size
    h, w = image.shape[:2]
    if h < c or w < c:
        # numpy's "reflect" is reflect-101 (the edge pixel is not repeated); it reflects
        # repeatedly when the pad is longer than the image.
        image = np.pad(image, ((0, max(c - h, 0)), (0, max(c - w, 0)), (0, 0)), mode="reflect")
        h, w = image.shape[:2]
    top = int(rng.integers(0, h - c + 1))
    left = int(rng.integers(0, w - c + 1))
    crop = image[top:top + c, left:left + c]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def make_train_iterator(source, *, global_batch_size: int, crop_size: int, seed: int,
                        process_index: int, process_count: int, shuffle: bool = True,
                        num_epochs: int | None = None, worker_count: int = 0,
                        read_options: grain.ReadOptions | None = None,
                        augment: str = "crop_flip",
                        transform: grain.transforms.MapWithIndex | None = None):
    """A grain iterator of this process's training batches (see the module docstring).

    source: random access (`len`, `[i]` -> {"image": uint8 [H, W, 3]}), e.g. from
        `jaxsr.data.sources.open_source`.
    num_epochs: None repeats forever.
    augment: "crop_flip" (random crop + flip, SeeSR) or "resize" (whole image, DAPE).
    transform: replaces `augment`: a map of (stream index g, source record) to one
        example, given g = epoch * len(source) + source index as the built-in ones are
        (e.g. jaxsr.data.coser_input's image + caption + reference examples).
    worker_count: grain worker processes for decoding and cropping; 0 decodes in
        threads of this process (`read_options`: default up to 8 threads, as many
        batches read ahead).
    Returns a `grain.DatasetIterator` with `get_state()` / `set_state(state)`.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive "
                         f"multiple of the process count {process_count}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or positive, got {num_epochs}")
    n = len(source)
    if n < process_count:
        raise ValueError(f"the source has {n} images, fewer than the {process_count} "
                         "processes that share it")
    local_batch = global_batch_size // process_count

    ds = grain.MapDataset.source(source)
    if transform is None:
        transform = (RandomCropFlip(crop_size, seed, n) if augment == "crop_flip"
                     else ResizeWhole(crop_size, n))
    ds = ds.map_with_index(transform)
    if shuffle:
        ds = ds.shuffle(seed=int(np.random.SeedSequence(
            [int(seed), _SHUFFLE_STREAM]).generate_state(1)[0]))
    # Per-epoch shard; the repeat below maps epoch e of the slice to epoch e of the
    # shuffle (grain reseeds the shuffle with the epoch number).
    ds = ds[process_index:n - n % process_count:process_count]
    ds = ds.repeat(num_epochs)
    ds = ds.batch(local_batch, drop_remainder=True)
    if read_options is None:
        threads = min(8, os.cpu_count() or 1)
        read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)
    it_ds = ds.to_iter_dataset(read_options)
    if worker_count > 0:
        _absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags (its --grain_* options), which fail
    with UnparsedFlagAccessError unless a program parsed them; a program that is not
    an absl app never does, so take every flag's default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
