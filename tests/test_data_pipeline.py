"""The training input: folder -> TFDS array_record (no TensorFlow) -> grain batches,
and the quickstart sample photos.

A small folder of PIL-written images (PNG, JPEG, WebP, BMP; RGB, grayscale,
palette, RGBA, 16-bit; nested; two smaller than the crop) plus corrupt, hidden
and non-image files is prepared once per module. Expected pixels come from
`image_io.load_image` on the files themselves (or from the arrays written), and
expected crops from an exhaustive search over the image's windows, never from the
pipeline's own output.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxsr.data import samples
from jaxsr.data.image_io import load_image
from jaxsr.data.sources import (
    SourceError,
    open_source,
    parse_catalog_spec,
    resolve_catalog,
)
from jaxsr.data.tfds_folder import (
    SkippedImageWarning,
    folder_dataset_name,
    prepare_folder,
    prepared_dir,
)
from jaxsr.data.train_input import make_train_iterator

REPO = Path(__file__).resolve().parents[1]
CROP = 24
SIXTEEN_BIT = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40  # up to 63960


def _write_folder(root: Path) -> list[str]:
    """Write the test images; returns the readable, non-hidden ones, sorted."""
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rgb(48, 40)).save(root / "a_rgb.png")
    Image.fromarray(rgb(40, 56)).save(root / "b_photo.jpg", quality=95)
    Image.fromarray(rgb(44, 44)[..., 0]).save(root / "c_gray.png")
    Image.fromarray(rng.integers(0, 256, (36, 50, 4), dtype=np.uint8), "RGBA").save(
        root / "d_rgba.png")
    Image.fromarray(SIXTEEN_BIT).save(root / "e_16bit.png")
    Image.fromarray(rgb(12, 30)).save(root / "f_short.png")  # shorter than the crop
    Image.fromarray(rgb(8, 9)).save(root / "g_tiny.bmp")  # smaller in both sides
    Image.fromarray(rgb(30, 30)).save(root / "sub" / "h_nested.webp", lossless=True)
    Image.fromarray(rgb(64, 32)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "sub" / "deeper" / "i_palette.png")
    Image.fromarray(rgb(33, 27)).save(root / "j_upper.PNG")
    # Not images of the dataset:
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    Image.fromarray(rgb(64, 64)).save(root / "whole.jpg", quality=90)
    data = (root / "whole.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "whole.jpg").unlink()
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(rgb(30, 30)).save(root / ".hidden.png")
    return sorted(["a_rgb.png", "b_photo.jpg", "c_gray.png", "d_rgba.png", "e_16bit.png",
                   "f_short.png", "g_tiny.bmp", "sub/h_nested.webp",
                   "sub/deeper/i_palette.png", "j_upper.PNG"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, _write_folder(root)


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    """(image_dir, data_dir, expected file names, skip warnings, source)."""
    root, names = folder
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.warns(SkippedImageWarning) as caught:
        source = open_source(f"folder:{root}", data_dir)
    skipped = [str(w.message) for w in caught if w.category is SkippedImageWarning]
    return root, data_dir, names, skipped, source


# ----------------------------------------------------------------------------- folder


def test_folder_dataset_is_sorted_original_bytes_and_skips_corrupt_files(prepared):
    import tensorflow_datasets as tfds

    root, data_dir, names, skipped, _ = prepared
    builder = tfds.builder_from_directory(prepared_dir(data_dir, folder_dataset_name(root)))
    assert builder.info.file_format.value == "array_record"
    records = builder.as_data_source(split="train",
                                     decoders={"image": tfds.decode.SkipDecoding()})
    assert [r["file_name"].decode() for r in records] == names
    for r, name in zip(records, names):
        assert r["image"] == (root / name).read_bytes()  # stored as the file's bytes
    # One one-line warning per unreadable file, naming it; nothing else skipped.
    assert len(skipped) == 2
    assert any("broken.png" in m for m in skipped)
    assert any("truncated.jpg" in m for m in skipped)
    assert all("\n" not in m for m in skipped)


def test_decoded_images_are_uint8_rgb_as_load_image_reads_the_files(prepared):
    root, _, names, _, source = prepared
    assert len(source) == len(names) == 10
    for i, name in enumerate(names):
        got = source[i]["image"]
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[-1] == 3
        np.testing.assert_array_equal(got, load_image(root / name), err_msg=name)
    gray = source[names.index("c_gray.png")]["image"]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0],
                                                                         gray[..., 2])
    sixteen = source[names.index("e_16bit.png")]["image"]
    want = np.rint(SIXTEEN_BIT / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(sixteen, np.repeat(want[..., None], 3, axis=-1))


def test_prepare_is_idempotent(prepared, tmp_path):
    root, data_dir, names, _, _ = prepared
    target = prepared_dir(data_dir, folder_dataset_name(root))
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    extra = root / "zz_added_later.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(extra)
    try:
        prepare_folder(root, data_dir, folder_dataset_name(root))
        source = open_source(f"folder:{root}", data_dir)
    finally:
        extra.unlink()
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert len(source) == len(names)


def test_folder_names_differ_for_same_base_name(tmp_path):
    a, b = tmp_path / "x" / "photos", tmp_path / "y" / "photos"
    assert folder_dataset_name(a) != folder_dataset_name(b)
    assert folder_dataset_name(a).startswith("photos_")


def test_stale_lock_is_removed_and_live_lock_is_waited_on(folder, tmp_path):
    import socket

    root, names = folder
    lock = prepared_dir(tmp_path, "locked").parent / ".1.0.0.lock"
    lock.parent.mkdir(parents=True)
    # A live holder (this very process): wait, then fail naming the lock file.
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    with pytest.raises(TimeoutError, match=r"\.1\.0\.0\.lock"):
        prepare_folder(root, tmp_path, "locked", wait_timeout_s=0.3, poll_s=0.05)
    # A holder that is gone (a finished child's pid): the lock is stale.
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    lock.write_text(f"{socket.gethostname()} {child.stdout.strip()}\n")
    with pytest.warns(SkippedImageWarning):
        prepare_folder(root, tmp_path, "locked", wait_timeout_s=5, poll_s=0.05)
    assert (prepared_dir(tmp_path, "locked") / "dataset_info.json").is_file()
    assert not lock.exists()


_NO_TF_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaxsr.data.sources import open_source
    from jaxsr.data.train_input import make_train_iterator
    source = open_source("folder:" + sys.argv[1], sys.argv[2])
    it = make_train_iterator(source, global_batch_size=4, crop_size=16, seed=1,
                             process_index=int(sys.argv[3]), process_count=2)
    batch = next(it)
    print(json.dumps({"n": len(source), "index": batch["index"].tolist(),
                      "shape": list(batch["hr"].shape),
                      "tensorflow_imported": "tensorflow" in sys.modules}))
""")


def test_two_processes_prepare_and_read_without_tensorflow(folder, tmp_path):
    """Two processes start on an unprepared data dir at once: one builds, the other
    waits; both read, and neither ever imports TensorFlow."""
    root, names = folder
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _NO_TF_SCRIPT, str(root),
                               str(tmp_path), str(p)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for p in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r == {**r, "n": len(names), "shape": [2, 16, 16, 3],
                     "tensorflow_imported": False}
    assert not set(results[0]["index"]) & set(results[1]["index"])
    versions = list((tmp_path / "jaxsr_image_folder" / folder_dataset_name(root)).iterdir())
    assert [v.name for v in versions] == ["1.0.0"]  # one dataset, no leftovers or lock


# ----------------------------------------------------------------------------- catalog


@pytest.mark.parametrize("spec, dataset, config, version, split", [
    ("div2k/bicubic_x4:train", "div2k", "bicubic_x4", None, "train"),
    ("div2k/realistic_wild_x4:validation", "div2k", "realistic_wild_x4", None, "validation"),
    ("div2k/bicubic_x4:2.0.0:train", "div2k", "bicubic_x4", "2.0.0", "train"),
    ("coco/2017:train", "coco", "2017", None, "train"),
    ("coco/2017", "coco", "2017", None, "train"),
])
def test_catalog_names_resolve_to_their_builders(spec, dataset, config, version, split):
    catalog = parse_catalog_spec(spec)
    assert (catalog.dataset, catalog.config, catalog.version, catalog.split) == (
        dataset, config, version, split)
    cls = resolve_catalog(catalog)
    assert cls.name == dataset and config in cls.builder_configs


def test_catalog_errors_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match="no config 'bicubic_x5'.*bicubic_x4"):
        open_source("div2k/bicubic_x5:train", tmp_path)
    with pytest.raises(SourceError, match="not a TFDS dataset.*did you mean div2k"):
        open_source("div2:train", tmp_path)
    with pytest.raises(SourceError, match="expected"):
        parse_catalog_spec("div2k/a/b:train")


@pytest.mark.parametrize("spec, name", [("div2k/bicubic_x4:train", "div2k/bicubic_x4"),
                                        ("coco/2017:train", "coco/2017")])
def test_unprepared_catalog_dataset_says_how_to_prepare_it(spec, name, tmp_path):
    with pytest.raises(SourceError) as e:
        open_source(spec, tmp_path)
    msg = str(e.value)
    assert "not prepared" in msg and str(tmp_path) in msg
    assert f"tfds build {name} --data_dir={tmp_path} --file_format=array_record" in msg
    assert not any(tmp_path.iterdir())  # nothing downloaded or written


def test_prepared_dataset_opens_by_catalog_name(prepared):
    root, data_dir, names, _, source = prepared
    by_name = open_source(f"jaxsr_image_folder/{folder_dataset_name(root)}:train", data_dir)
    assert len(by_name) == len(names)
    np.testing.assert_array_equal(by_name[3]["image"], source[3]["image"])
    with pytest.raises(SourceError, match="no split 'validation'; splits: train"):
        open_source(f"jaxsr_image_folder/{folder_dataset_name(root)}:validation", data_dir)


# ----------------------------------------------------------------------------- grain


def _iterator(source, **kw):
    args = dict(global_batch_size=4, crop_size=CROP, seed=7, process_index=0,
                process_count=1)
    return make_train_iterator(source, **{**args, **kw})


def _reflect101(image, h, w):
    """Pad bottom/right to at least (h, w) by reflection without edge repetition,
    written from the index formula (period 2n - 2)."""
    def index(size, n):
        period = max(2 * n - 2, 1)
        i = np.arange(size) % period
        return np.where(i < n, i, period - i)
    H, W = max(h, image.shape[0]), max(w, image.shape[1])
    return image[index(H, image.shape[0])][:, index(W, image.shape[1])]


def _locate(crop, image):
    """All (top, left, flipped) where `crop` is a window of `image` (reflect-padded)."""
    padded = _reflect101(image, CROP, CROP)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (CROP, CROP, 3))[..., 0, :, :, :]
    hits = []
    for flipped, c in ((False, crop), (True, crop[:, ::-1])):
        for top, left in zip(*np.nonzero((windows == c).all(axis=(2, 3, 4)))):
            hits.append((int(top), int(left), flipped))
    return hits


def test_batches_are_random_windows_with_random_flips(prepared):
    root, _, names, _, source = prepared
    it = _iterator(source, global_batch_size=5)
    images = [load_image(root / n) for n in names]
    placements = {}
    for _ in range(8):  # 40 examples: 4 epochs of 10
        batch = next(it)
        assert batch["hr"].dtype == np.uint8 and batch["hr"].shape == (5, CROP, CROP, 3)
        assert batch["index"].dtype == np.int64 and batch["index"].shape == (5,)
        for hr, k in zip(batch["hr"], batch["index"]):
            hits = _locate(hr, images[k])
            assert len(hits) == 1, (names[k], hits)
            placements.setdefault(int(k), []).append(hits[0])
    assert sorted(placements) == list(range(10))  # every image, once per epoch
    assert all(len(v) == 4 for v in placements.values())
    flips = [f for v in placements.values() for (_, _, f) in v]
    assert 5 <= sum(flips) <= 35  # p = 1/2 over 40 draws
    big = names.index("b_photo.jpg")  # 40 x 56: 17 x 33 offsets
    assert len({(top, left) for top, left, _ in placements[big]}) > 1


def test_resize_augment_is_the_whole_image_lanczos_without_flips(prepared):
    """DAPE's input: every image resized whole to crop x crop with PIL's Lanczos."""
    root, _, names, _, source = prepared
    it = _iterator(source, global_batch_size=5, augment="resize", shuffle=False, num_epochs=1)
    seen = 0
    for batch in it:
        assert batch["hr"].shape == (5, CROP, CROP, 3)
        for hr, k in zip(batch["hr"], batch["index"]):
            want = Image.fromarray(load_image(root / names[k])).resize(
                (CROP, CROP), Image.Resampling.LANCZOS)
            np.testing.assert_array_equal(hr, np.asarray(want))
            seen += 1
    assert seen == 10
    with pytest.raises(ValueError, match="augment"):
        _iterator(source, augment="rotate")


def test_same_seed_same_batches_other_seed_other_order(prepared):
    source = prepared[4]
    a, b, c = _iterator(source), _iterator(source), _iterator(source, seed=8)
    got_a = [next(a) for _ in range(6)]
    got_b = [next(b) for _ in range(6)]
    got_c = [next(c) for _ in range(6)]
    for x, y in zip(got_a, got_b):
        np.testing.assert_array_equal(x["hr"], y["hr"])
        np.testing.assert_array_equal(x["index"], y["index"])
    assert [x["index"].tolist() for x in got_a] != [x["index"].tolist() for x in got_c]


def test_no_shuffle_reads_in_record_order(prepared):
    source = prepared[4]
    it = _iterator(source, shuffle=False, global_batch_size=5, num_epochs=1)
    assert [b["index"].tolist() for b in it] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_cover_each_epoch(prepared, process_count):
    source = prepared[4]
    n = len(source)
    per_epoch = n // process_count
    shards = []
    for p in range(process_count):
        it = _iterator(source, global_batch_size=process_count, process_index=p,
                       process_count=process_count, num_epochs=2)
        stream = [int(k) for b in it for k in b["index"]]
        assert len(stream) == 2 * per_epoch
        shards.append((stream[:per_epoch], stream[per_epoch:]))
    for epoch in range(2):
        union = [k for s in shards for k in s[epoch]]
        assert len(set(union)) == len(union) == per_epoch * process_count  # disjoint
        if n % process_count == 0:
            assert sorted(union) == list(range(n))  # exactly one epoch
    assert [s[0] for s in shards] != [s[1] for s in shards]  # reshuffled per epoch


def test_crops_do_not_depend_on_the_process_count(prepared):
    source = prepared[4]
    single = {}
    for b in _iterator(source, global_batch_size=5, num_epochs=1):
        single.update({int(k): hr for k, hr in zip(b["index"], b["hr"])})
    for p in range(2):
        for b in _iterator(source, global_batch_size=2, process_index=p, process_count=2,
                           num_epochs=1):
            for k, hr in zip(b["index"], b["hr"]):
                np.testing.assert_array_equal(hr, single[int(k)])


def test_iterator_state_resumes_exactly_through_json_and_orbax(prepared, tmp_path):
    import orbax.checkpoint as ocp

    source = prepared[4]
    it = _iterator(source)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert isinstance(state, dict)
    want = [next(it) for _ in range(2)]

    via_json = _iterator(source)
    via_json.set_state(json.loads(json.dumps(state)))
    ckpt = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    ckpt.save(tmp_path / "data", args=ocp.args.JsonSave(state))
    via_orbax = _iterator(source)
    via_orbax.set_state(ckpt.restore(tmp_path / "data", args=ocp.args.JsonRestore()))
    for resumed in (via_json, via_orbax):
        for w in want:
            got = next(resumed)
            np.testing.assert_array_equal(got["hr"], w["hr"])
            np.testing.assert_array_equal(got["index"], w["index"])


def test_iterator_argument_errors(prepared):
    source = prepared[4]
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        _iterator(source, global_batch_size=4, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        _iterator(source, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="fewer than the 16 processes"):
        _iterator(source, global_batch_size=16, process_count=16)


# ----------------------------------------------------------------------------- samples


def test_sample_images_ship_inside_the_installed_package():
    paths = samples.sample_image_paths()
    assert [p.name for p in paths] == list(samples.SAMPLES.values())
    dist = importlib.metadata.distribution("scikit-image")
    in_wheel = {Path(dist.locate_file(f)).resolve() for f in dist.files
                if str(f).startswith("skimage/data/")}
    package_dir = samples.package_data_dir().parent
    for p in paths:
        assert p.resolve() in in_wheel, p  # installed from the wheel's RECORD
        assert p.resolve().is_relative_to(package_dir)
        image = load_image(p)
        assert image.dtype == np.uint8 and image.shape[-1] == 3
        assert min(image.shape[:2]) >= 256, (p.name, image.shape)
        spread = image.astype(int).max(axis=-1) - image.astype(int).min(axis=-1)
        assert spread.mean() > 10, p.name  # a colour photo, not gray stored as RGB


def test_sample_folder_holds_one_out_and_feeds_the_pipeline(tmp_path):
    dest = tmp_path / "samples"
    train_dir, held_out = samples.sample_image_folder(dest)
    assert train_dir == dest / "train" and held_out == dest / "eval" / "chelsea.png"
    train = sorted(p.name for p in train_dir.iterdir())
    assert train == ["astronaut.png", "coffee.png", "rocket.jpg"]
    assert [p.name for p in (dest / "eval").iterdir()] == ["chelsea.png"]
    originals = {p.name: p.read_bytes() for p in samples.sample_image_paths()}
    for p in [*(dest / "train").iterdir(), *(dest / "eval").iterdir()]:
        assert p.read_bytes() == originals[p.name]
    again, none = samples.sample_image_folder(dest, held_out=None)
    assert len(list(again.iterdir())) == 4 and none is None
    assert not list((dest / "eval").iterdir())
    with pytest.raises(ValueError, match="held_out"):
        samples.sample_image_folder(tmp_path / "other", held_out="lena")

    source = open_source(f"folder:{train_dir}", tmp_path / "tfds")
    batch = next(make_train_iterator(source, global_batch_size=2, crop_size=256, seed=0,
                                     process_index=0, process_count=1))
    assert batch["hr"].shape == (2, 256, 256, 3)


def test_missing_sample_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(samples.SamplesUnavailableError, match=r"jaxsr\[quickstart\]"):
        samples.sample_image_paths()
