"""load_image / save_image on real files written here."""

import os
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxsr.data.image_io import ImageError, load_image, save_image


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (21, 34, 3), dtype=np.uint8)


def test_png_round_trip_exact(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png")
    assert got.dtype == np.uint8 and got.shape == (21, 34, 3)
    np.testing.assert_array_equal(got, rgb)


def test_jpeg_is_what_pil_decodes(tmp_path, rgb):
    p = tmp_path / "a.jpg"
    Image.fromarray(rgb).save(p, quality=90)
    with Image.open(p) as im:
        want = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(load_image(p), want)


def test_grayscale_expands_to_three_equal_channels(tmp_path, rgb):
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    got = load_image(tmp_path / "g.png")
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], gray)


def test_rgba_drops_alpha_like_convert_rgb(tmp_path, rgb):
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)  # not composited


def test_la_drops_alpha(tmp_path, rgb):
    gray = rgb[..., 1]
    Image.fromarray(np.dstack([gray, rgb[..., 2]]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), np.dstack([gray] * 3))


def test_palette_image_is_looked_up(tmp_path, rgb):
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as reopened:
        assert reopened.mode == "P"
        table = np.asarray(reopened.getpalette(), np.uint8).reshape(-1, 3)
        want = table[np.asarray(reopened)]
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), want)


def _palette_with_byte_transparency(tmp_path, rgb):
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    alphas = bytes(np.random.default_rng(2).integers(0, 256, 16, dtype=np.uint8))
    pal.save(tmp_path / "pt.png", transparency=alphas)
    return tmp_path / "pt.png"


def test_palette_with_byte_transparency_is_looked_up_without_a_warning(tmp_path, rgb):
    path = _palette_with_byte_transparency(tmp_path, rgb)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and isinstance(reopened.info["transparency"], bytes)
        table = np.asarray(reopened.getpalette(), np.uint8).reshape(-1, 3)
        want = table[np.asarray(reopened)]  # the alpha is dropped, not composited
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's direct P -> RGB conversion warns here
        got = load_image(path)
    np.testing.assert_array_equal(got, want)


def test_decoding_in_threads_loses_no_warning_raised_meanwhile(tmp_path, rgb):
    """Folder preparation decodes in worker threads while the main thread warns about
    each skipped file. Decoding must not touch the process-wide warning filters (a
    `catch_warnings` block in a thread swallows what other threads warn meanwhile)."""
    paths = [_palette_with_byte_transparency(tmp_path, rgb)]
    for mode in ("L", "RGBA", "LA"):
        paths.append(tmp_path / f"{mode}.png")
        Image.fromarray(rgb).convert(mode).save(paths[-1])
    stop = threading.Event()

    def decode_until_stopped():
        while not stop.is_set():
            for p in paths:
                load_image(p)

    workers = [threading.Thread(target=decode_until_stopped) for _ in range(2)]
    count = 2000
    with pytest.warns(UserWarning) as caught:
        for w in workers:
            w.start()
        try:
            for i in range(count):
                warnings.warn(f"skipping file {i}", UserWarning, stacklevel=1)
                if i % 50 == 0:
                    time.sleep(0.001)  # let the decoders run between warnings
        finally:
            stop.set()
            for w in workers:
                w.join()
    got = {str(w.message) for w in caught if str(w.message).startswith("skipping file")}
    assert len(got) == count


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 257, 1000], [32767, 40000, 65278, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    got = load_image(tmp_path / "deep.png")
    want = np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)
    assert want.tolist() == [[0, 0, 1, 4], [127, 156, 254, 255]]
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)


def test_exif_orientation_is_applied(tmp_path, rgb):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "o.png"), np.rot90(rgb, k=-1))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_file_raises(tmp_path, ext):
    noise = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    p = tmp_path / f"t.{ext}"
    Image.fromarray(noise).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="t\\." + ext):
        load_image(p)


def test_text_file_named_png_raises(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(p)


def test_zero_byte_file_raises(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError):
        load_image(p)


def test_missing_file_and_directory_raise(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError):
        load_image(tmp_path)


def test_error_message_is_one_line(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 5)
    with pytest.raises(ImageError) as info:
        load_image(p)
    assert "\n" not in str(info.value)


def test_save_round_trip_and_no_leftovers(tmp_path, rgb):
    save_image(tmp_path / "out.png", rgb)
    with Image.open(tmp_path / "out.png") as im:
        np.testing.assert_array_equal(np.asarray(im), rgb)
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_save_format_follows_extension(tmp_path, rgb):
    save_image(tmp_path / "out.jpg", rgb, quality=95)
    save_image(tmp_path / "noext", rgb)
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.format == "JPEG"
    assert (tmp_path / "noext").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="extension"):
        save_image(tmp_path / "out.xyz", rgb)


def test_save_respects_umask(tmp_path, rgb):
    umask = os.umask(0o022)
    try:
        save_image(tmp_path / "perm.png", rgb)
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "perm.png").st_mode & 0o777 == 0o644


def test_save_rejects_non_uint8(tmp_path):
    with pytest.raises(TypeError):
        save_image(tmp_path / "f.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        save_image(tmp_path / "f.png", np.zeros((4, 4, 4), np.uint8))


def test_failed_save_keeps_old_file_and_cleans_up(tmp_path, rgb, monkeypatch):
    target = tmp_path / "keep.png"
    save_image(target, rgb)
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageError, match="disk full"):
        save_image(target, rgb[::-1])
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]
