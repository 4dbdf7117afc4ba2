"""`jaxsr sr --model coser` end to end: a tiny CoSeR release with the real key names
(tests/coser_release.py) converted by `jaxsr convert --coser`, real image files (PNG,
JPEG, grayscale, a corrupt one, a text file), the PNGs written by the CLI compared
with the PyTorch composition of CoSeR's scripts/inference.py
(tests/coser_sampling_reference.py) on the same torch modules, with the noises the
seed gives. One size bucket (an LR of 13×30 is reflect-padded to 16×32), one batch,
one compile. Slow: the scripts' options (--upscale, --sample-times, the tiled mode's
--input-size, --patch-size, --patch-stride, --tiled-padding) through the CLI against
the Python API on the same weights and files."""

import zlib

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from jaxsr.cli import main as cli_main
from jaxsr.data.image_io import load_image
from jaxsr.models.tokenizer import load_tokenizer, tokenize
from jaxsr.pipelines.coser import NEGATIVE_PROMPT, CoSeROptions, CoSeRPipeline
from jaxsr.pipelines.coser_sampling import draw_noises
from tests import coser_sampling_reference as ref
from tests.coser_release import ARCH, write_tiny_coser_release
from tests.parity import nhwc_to_nchw, psnr_uint8
from tests.test_cli_sr import assert_same_image

STEPS, SEED = 3, 5
GOOD = {"photo.png": (16, 32), "photo2.jpg": (13, 30), "gray.png": (16, 32)}


def _rgb(seed, hw):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("coser_cli")
    paths, _, modules = write_tiny_coser_release(root / "release")
    argv = ["convert", "--coser", str(paths["coser"]), "--qformer", str(paths["qformer"]),
            "--sd", str(paths["sd21"]), "--tokenizer", str(paths["tokenizer"]),
            "--config", "configs/coser.py:tiny", "--output", str(root / "weights")]
    assert cli_main(argv) == 0
    inputs = root / "inputs"
    inputs.mkdir()
    Image.fromarray(_rgb(0, GOOD["photo.png"])).save(inputs / "photo.png")
    Image.fromarray(_rgb(1, GOOD["photo2.jpg"])).save(inputs / "photo2.jpg", quality=90)
    Image.fromarray(_rgb(2, GOOD["gray.png"])[..., 0]).save(inputs / "gray.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (inputs / "notes.txt").write_text("not a picture\n")
    return root, inputs, modules, paths


def sr(root, *args, batch=3):
    argv = ["sr", *map(str, args), "--weights", str(root / "weights"), "--model", "coser",
            "--steps", str(STEPS), "--seed", str(SEED), "--color-fix", "adain",
            "--decoder", "vae", "--devices", "1", "--batch-size", str(batch),
            # Explicit: the default (auto) is bfloat16 on CPUs with native bfloat16.
            "--dtype", "float32",
            # Off: JAX sets up its persistent cache once per process, and the SeeSR CLI
            # test checks that its own cache folder fills.
            "--compile-cache", ""]
    return cli_main(argv)


# `sr`'s settings as CoSeR options of the Python API.
FAST = dict(steps=STEPS, color_fix="adain", decoder="vae")


def _api(root):
    return CoSeRPipeline.from_pretrained(root / "weights", dtype="float32",
                                         devices=jax.devices()[:1])


def _torch_result(lr_uint8, modules, tokenizer_dir):
    """CoSeR's inference.py on the LR reflect-padded to a multiple of 16, cropped."""
    h, w = lr_uint8.shape[:2]
    ph, pw = -(-h // 16) * 16, -(-w // 16) * 16
    padded = np.pad(lr_uint8, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    lr = torch.from_numpy(nhwc_to_nchw(padded[None].astype(np.float32) / 255.0).copy())
    tok = load_tokenizer(tokenizer_dir)
    with torch.no_grad():
        embed = lambda p: modules["text"](torch.from_numpy(
            tokenize(tok, [p]).astype(np.int64))).last_hidden_state
        prompt, negative = embed(""), embed(NEGATIVE_PROMPT)
    keys = jax.vmap(lambda _: jax.random.key(SEED))(np.arange(1))
    noises = jax.device_get(draw_noises(keys, STEPS, (ph // 2, pw // 2, 4)))
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(a)))
    out = ref.reference_coser(
        lr, sr=modules["sr"], tower=modules["tower"], qformer=modules["qformer"],
        query_tokens=torch.from_numpy(modules["query_tokens"]),
        vision_size=ARCH.cognitive.vision.image_size, vae=modules["vae"],
        unet=modules["unet"], cn=modules["controlnet"], prompt=prompt, negative=negative,
        noises={"start": tt(noises["start"]),
                "reference_steps": [tt(n) for n in noises["reference_steps"]],
                "steps": [tt(n) for n in noises["steps"]]},
        steps=STEPS, cfg=3.0, cfg_ref=3.0, fix="adain")
    crop = lambda a: a[0, :4 * h, :4 * w]
    return crop(out["image"]), crop(out["reference_image"])


def test_coser_cli_matches_torch_and_reports_bad_files(env, capsys, tmp_path):
    root, inputs, modules, paths = env
    out = tmp_path / "out"
    assert sr(root, inputs, "--output", out, "--save-reference") == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "notes.txt" in err
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["gray.png", "photo.png", "photo2.png"]
    assert sorted(p.name for p in (out / "reference").iterdir()) == written
    for name, (h, w) in GOOD.items():
        stem = name.rsplit(".", 1)[0]
        got = np.asarray(Image.open(out / f"{stem}.png"))
        got_ref = np.asarray(Image.open(out / "reference" / f"{stem}.png"))
        assert got.shape == got_ref.shape == (4 * h, 4 * w, 3)
        if name == "gray.png":
            continue
        want, want_ref = _torch_result(load_image(inputs / name), modules, paths["tokenizer"])
        sr_psnr, ref_psnr = psnr_uint8(got, want), psnr_uint8(got_ref, want_ref)
        diff = np.abs(got.astype(int) - want.astype(int))
        with capsys.disabled():
            print(f"\n{name}: SR PSNR {sr_psnr:.2f} dB (max diff {diff.max()}), reference "
                  f"image PSNR {ref_psnr:.2f} dB")
        assert sr_psnr >= 40.0 and ref_psnr >= 40.0

    # A rerun skips the finished inputs (and reports the bad ones again).
    assert sr(root, inputs, "--output", out) == 1
    assert "skipping 3 output(s)" in capsys.readouterr().err


@pytest.mark.slow       # the CLI's and the API's reference-mode programs: about 3 min
def test_coser_upscale_and_sample_times_match_the_api(env, capsys, tmp_path):
    """--upscale 2 --sample-times 2 in reference mode against the Python API: inference.py
    samples at 2× (the 16×32 and 13×30 LRs reflect-padded to 32×32, whose 2× is a
    multiple of 64); with 2 samples each output draws from the stream of its name
    (fold_in(key(seed), crc32(name))), so the samples differ."""
    root, inputs, _, _ = env
    out = tmp_path / "out"
    files = [inputs / "photo.png", inputs / "photo2.jpg"]
    assert sr(root, *files, "--output", out, "--upscale", "2", "--sample-times", "2",
              "--save-reference", batch=4) == 0
    names = ["photo-s0.png", "photo-s1.png", "photo2-s0.png", "photo2-s1.png"]
    assert sorted(p.name for p in out.glob("*.png")) == names
    pipe = _api(root)
    options = CoSeROptions(**FAST, upscale=2)
    assert [pipe.bucket_key(hw, options) for hw in GOOD.values()] == [("reference", 32, 32)] * 3
    images = [load_image(f) for f in files for _ in range(2)]
    want, want_refs = pipe.upscale(images, options=options, seed=SEED,
                                   ids=[zlib.crc32(n.encode()) for n in names], batch_size=4,
                                   return_references=True)
    got = [np.asarray(Image.open(out / n)) for n in names]
    with capsys.disabled():
        for name, image, a, b, ref_b in zip(names, images, got, want, want_refs):
            assert a.shape == (2 * image.shape[0], 2 * image.shape[1], 3)
            assert_same_image(a, b, name)
            assert_same_image(np.asarray(Image.open(out / "reference" / name)), ref_b,
                               f"reference/{name}")
    assert psnr_uint8(got[0], got[1]) < 30 and psnr_uint8(got[2], got[3]) < 30


@pytest.mark.slow       # the CLI's and the API's tiled programs: about 3 min
def test_coser_tiled_options_match_the_api(env, capsys, tmp_path):
    """--mode tiled with --upscale 3 --input-size 64 --patch-size 96 --patch-stride 64
    --tiled-padding script (and small latent tiles) against the Python API. A 20×12 LR:
    s = max(64/12, 3) = 5.33 -> 106×64; the script pads both sides (128×96, the 64 side
    too), two 96×96 patches at rows 0 and 32, and resizes to int(128·3/5.33) ×
    int(96·3/5.33) = 72×54 (exact padding would give 60×36)."""
    root, _, _, _ = env
    lr = _rgb(9, (20, 12))
    Image.fromarray(lr).save(tmp_path / "tall.png")
    out = tmp_path / "out"
    flags = ["--mode", "tiled", "--upscale", "3", "--input-size", "64", "--patch-size", "96",
             "--patch-stride", "64", "--tiled-padding", "script", "--latent-tile", "8",
             "--latent-tile-overlap", "4"]
    assert sr(root, tmp_path / "tall.png", "--output", out, *flags, batch=2) == 0
    got = np.asarray(Image.open(out / "tall.png"))
    options = CoSeROptions(**FAST, mode="tiled", upscale=3, input_size=64, patch_size=96,
                           patch_stride=64, tiled_padding="script", latent_tile=8,
                           latent_tile_overlap=4)
    [want] = _api(root).upscale([lr], options=options, seed=SEED, batch_size=2)
    assert got.shape == (72, 54, 3)
    with capsys.disabled():
        assert_same_image(got, want, "tiled, script padding, upscale 3")


def test_coser_flags_and_folder_are_checked(env, capsys, tmp_path):
    root, inputs, _, _ = env
    assert sr(root, inputs / "photo.png", "--output", tmp_path / "o", "--sampler", "ddim") == 2
    assert "--sampler" in capsys.readouterr().err
    argv = ["sr", str(inputs / "photo.png"), "--weights", str(root / "weights"),
            "--model", "seesr", "--output", str(tmp_path / "o")]
    assert cli_main(argv) == 2
    assert "coser" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
