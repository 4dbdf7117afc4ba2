"""`jaxsr sr` on real files in every common mode, plus broken ones, through the real
command line (in-process `jaxsr.cli.main`) and a tiny random SeeSR release converted
by `jaxsr convert`; test_seesr.py's options (--upscale, --sample-times, --save-prompts,
--conditioning-scale, --start-steps, --start-point) against the Python API on the
same weights and files."""

import io
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsr.cli import build_parser
from jaxsr.cli import main as cli_main
from jaxsr.commands.sr import build_options
from jaxsr.data.image_io import load_image
from jaxsr.inference.inputs import discover, for_process, plan_jobs
from jaxsr.pipelines.seesr import SeeSROptions, SeeSRPipeline
from tests.parity import assert_within_levels, psnr_uint8
from tests.test_convert_seesr_cli import _convert, write_tiny_release

H, W = 10, 12                          # every good input: one size bucket, one compile
GOOD = ["photo.png", "photo2.jpg", "gray.png", "rgba.png", "palette.png", "deep16.png"]
BAD = {"truncated.png": "unreadable or corrupt", "notes.txt": "not an image file",
       "tiny.png": "too small"}


def _rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def write_inputs(folder):
    folder.mkdir(parents=True)
    Image.fromarray(_rgb(0)).save(folder / "photo.png")
    Image.fromarray(_rgb(1)).save(folder / "photo2.jpg", quality=90)
    Image.fromarray(_rgb(2)[..., 0]).save(folder / "gray.png")
    rgba = np.dstack([_rgb(3), np.linspace(0, 255, H * W, dtype=np.uint8).reshape(H, W)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(_rgb(4)).quantize(colors=16).save(folder / "palette.png")
    deep = np.random.default_rng(5).integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    png = io.BytesIO()
    Image.fromarray(_rgb(6)).save(png, format="PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "notes.txt").write_text("not a picture\n")
    Image.fromarray(_rgb(7)[:5, :5]).save(folder / "tiny.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I")       # really 16-bit
    assert Image.open(folder / "palette.png").mode == "P"
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = write_tiny_release(tmp_path_factory.mktemp("release"))
    assert _convert(root, root / "weights") == 0
    inputs = write_inputs(root / "inputs")
    return root, inputs


def sr(root, *args):
    """Fast settings: 2 steps, no enlargement; one device; a persistent compile cache
    shared by every run of the module."""
    argv = ["sr", *map(str, args), "--weights", str(root / "weights"), "--steps", "2",
            "--process-size", "32", "--devices", "1", "--dtype", "float32",
            "--compile-cache", str(root / "xla-cache")]
    return cli_main(argv)


# `sr`'s settings as options of the Python API.
FAST = dict(steps=2, process_size=32)


@pytest.fixture(scope="module")
def api(env):
    """The Python API on the CLI's weights (one device, float32, as `sr`). Its programs
    are the CLI's, so JAX's persistent cache, which `sr` turns on, usually has them."""
    root, _ = env
    return SeeSRPipeline.from_pretrained(root / "weights", dtype="float32",
                                         devices=jax.devices()[:1])


def assert_same_image(got, want, what: str) -> None:
    """Two uint8 images from programs compiled apart (e.g. `jaxsr sr` and the Python
    API): equal shapes, at most one grey level apart on at most 1 % of the values and
    >= 60 dB, since XLA:CPU may round differently between compilations. Prints the
    measured numbers."""
    diff = np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int))
    psnr = psnr_uint8(got, want)
    print(f"{what}: PSNR {psnr:.1f} dB, max diff {diff.max()} on "
          f"{np.count_nonzero(diff)} of {diff.size} values")
    assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 100 and psnr >= 60, what


def streams(names):
    """The CLI's random-stream ids: CRC-32 of each output file name."""
    return [zlib.crc32(n.encode("utf-8")) for n in names]


def test_folder_with_good_and_bad_files(env, capsys):
    root, inputs = env
    out = root / "out"
    assert sr(root, inputs, "--output", out, "--batch-size", "2", "--seed", "1") == 1
    err = capsys.readouterr()
    for name in GOOD:
        with Image.open(out / (name.rsplit(".", 1)[0] + ".png")) as im:
            assert (im.mode, im.size) == ("RGB", (4 * W, 4 * H)), name
    failures = [line for line in err.err.splitlines() if line.startswith("failed:")]
    assert len(failures) == len(BAD), failures
    for name, reason in BAD.items():
        assert any(name in line and reason in line for line in failures), (name, failures)
        assert not (out / (name.rsplit(".", 1)[0] + ".png")).exists()
    assert "written 6, skipped 0, failed 3" in err.out
    assert not [p for p in out.iterdir() if not p.name.endswith(".png")]   # no temp files

    # A rerun skips what exists and still reports the bad files.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sr(root, inputs, "--output", out, "--seed", "1") == 1
    err = capsys.readouterr()
    assert "written 0, skipped 6, failed 3" in err.out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    assert any((root / "xla-cache").iterdir())      # the sampling program was cached

    # The same seed, batch 1 instead of 2, and only the good files: the same images
    # (an input's noise depends on the seed and its name, not on the other inputs).
    # Not always the same bytes: XLA:CPU may tile a batch-2 convolution differently
    # from a batch-1 one on some CPUs, which moves float32 rounding by a few ulps and,
    # through 20 sampling steps, a few pixels by 1-2 grey levels (72 dB measured);
    # another seed gives a different image altogether.
    again = root / "again"
    assert sr(root, *(inputs / n for n in GOOD), "--output", again, "--batch-size", "1",
              "--seed", "1") == 0
    assert "written 6, skipped 0, failed 0" in capsys.readouterr().out
    for p in out.iterdir():
        a, b = (np.asarray(Image.open(d / p.name)).astype(np.int16) for d in (out, again))
        diff, psnr = np.abs(a - b).max(), psnr_uint8(a, b)
        assert diff <= 4 and psnr >= 60, (p.name, diff, psnr)

    # --overwrite redoes a finished file, here with another seed: a different result.
    before = (out / "photo.png").read_bytes()
    assert sr(root, inputs / "photo.png", "--output", out, "--overwrite", "--seed", "2") == 0
    assert "written 1, skipped 0, failed 0" in capsys.readouterr().out
    assert (out / "photo.png").read_bytes() != before


def test_sample_times_save_prompts_and_resume(env, api, capsys, tmp_path):
    """--sample-times 2 --save-prompts: <stem>-s0/-s1.png (0-based, as test_seesr.py's
    sample00/sample01 folders) and a .txt with the positive prompt beside each; each
    sample draws from the stream of its output name, as the API with those ids; the two
    samples differ; a rerun redoes only a deleted sample, identically."""
    root, inputs = env
    out = tmp_path / "out"
    files = [inputs / "photo.png", inputs / "photo2.jpg"]
    argv = [*files, "--output", out, "--sample-times", "2", "--save-prompts",
            "--batch-size", "1", "--seed", "1"]
    assert sr(root, *argv) == 0
    assert "written 4, skipped 0, failed 0" in capsys.readouterr().out
    names = ["photo-s0.png", "photo-s1.png", "photo2-s0.png", "photo2-s1.png"]
    texts = [n.replace(".png", ".txt") for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + texts)

    images = [load_image(f) for f in files for _ in range(2)]
    want, prompts = api.upscale(images, options=SeeSROptions(**FAST), seed=1,
                                ids=streams(names), batch_size=1, return_prompts=True)
    got = [np.asarray(Image.open(out / n)) for n in names]
    for name, text, a, b, prompt in zip(names, texts, got, want, prompts):
        with capsys.disabled():
            assert_same_image(a, b, name)
        assert (out / text).read_text(encoding="utf-8") == prompt
        assert prompt.endswith(", ,clean, high-resolution, 8k")      # the script's format
    assert psnr_uint8(got[0], got[1]) < 30 and psnr_uint8(got[2], got[3]) < 30

    (out / "photo-s1.png").unlink()
    assert sr(root, *argv) == 0
    assert "written 1, skipped 3, failed 0" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(out / "photo-s1.png")), got[1])


def test_upscale_conditioning_and_start_steps_match_the_api(env, api, capsys, tmp_path):
    """--upscale 2 --conditioning-scale 0.5 --start-steps 500 through the CLI against
    SeeSROptions(upscale=2, conditioning_scale=0.5, start_timestep=500). A 10×12 input
    at ×2 with process size 32 has a side below 32 // 2 = 16: enlarged ×1.6 to 19×16
    (w×h), ×2 to 38×32, cropped to 32×32 (the bucket), then PIL-resized to 24×20. The
    2 DDPM steps are t = 501 and 1: t = 501 > 500 is skipped."""
    root, inputs = env
    out = tmp_path / "out"
    assert sr(root, inputs / "photo.png", "--output", out, "--upscale", "2",
              "--conditioning-scale", "0.5", "--start-steps", "500", "--batch-size", "1",
              "--seed", "3") == 0
    options = SeeSROptions(**FAST, upscale=2, conditioning_scale=0.5, start_timestep=500)
    assert api.bucket_key((H, W), options) == (32, 32)
    assert api._plan(options).timesteps.tolist() == [1]
    [want] = api.upscale([load_image(inputs / "photo.png")], options=options, seed=3,
                         ids=streams(["photo.png"]), batch_size=1)
    got = np.asarray(Image.open(out / "photo.png"))
    assert got.shape == (2 * H, 2 * W, 3)
    with capsys.disabled():
        assert_same_image(got, want, "upscale 2, conditioning 0.5, start 500")


@pytest.mark.slow        # one more sampling program on two devices: about 60 s
def test_spatial_shards_match_the_api(env, api, capsys, tmp_path):
    """--devices 2 --spatial-shards 2: the image's height split over two host devices,
    against the one-device API. Float32 sums per shard round differently, so the
    bound is the pipeline test's (tests/test_seesr_pipeline.py): at most 4 levels on
    at most 1 % of the values, >= 60 dB."""
    root, inputs = env
    out = tmp_path / "out"
    argv = ["sr", str(inputs / "photo.png"), "--output", str(out), "--weights",
            str(root / "weights"), "--steps", "2", "--process-size", "32", "--devices", "2",
            "--spatial-shards", "2", "--dtype", "float32", "--seed", "5"]
    assert cli_main(argv) == 0
    [want] = api.upscale([load_image(inputs / "photo.png")], options=SeeSROptions(**FAST),
                         seed=5, ids=streams(["photo.png"]), batch_size=1)
    got = np.asarray(Image.open(out / "photo.png"))
    with capsys.disabled():
        print(f"spatial shards 2 vs one device: PSNR {psnr_uint8(got, want):.1f} dB")
    assert_within_levels(got, want, levels=4, fraction=0.01, what="--spatial-shards 2")
    assert psnr_uint8(got, want) >= 60.0


def test_spatial_shards_must_divide_the_devices(env, capsys, tmp_path):
    root, inputs = env
    assert cli_main(["sr", str(inputs / "photo.png"), "--output", str(tmp_path / "o"),
                     "--weights", str(root / "weights"), "--devices", "2",
                     "--spatial-shards", "3"]) == 2
    assert "spatial_shards 3 must divide the 2 devices" in capsys.readouterr().err


@pytest.mark.slow        # one more sampling program: about 60 s
def test_start_point_noise_matches_the_api(env, api, capsys, tmp_path):
    """--start-point noise (pure noise, the LR not encoded) through the CLI against the
    API; it differs from the LR start with the same other options."""
    root, inputs = env
    out = tmp_path / "out"
    assert sr(root, inputs / "photo.png", "--output", out, "--start-point", "noise",
              "--start-steps", "700", "--batch-size", "1", "--seed", "3") == 0
    image = load_image(inputs / "photo.png")
    noise = SeeSROptions(**FAST, start_point="noise", start_timestep=700)
    lr_start = SeeSROptions(**FAST, start_timestep=700)
    [want] = api.upscale([image], options=noise, seed=3, ids=streams(["photo.png"]))
    [other] = api.upscale([image], options=lr_start, seed=3, ids=streams(["photo.png"]))
    got = np.asarray(Image.open(out / "photo.png"))
    with capsys.disabled():
        assert_same_image(got, want, "start point noise")
        print(f"noise vs LR start: PSNR {psnr_uint8(got, other):.1f} dB")
    # Close (the colour fix pins the colours; √ᾱ_700 ≈ 0.29 of the LR latent is all
    # the LR start adds) but most values differ.
    assert psnr_uint8(got, other) < 45 and np.count_nonzero(got != other) > got.size // 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow        # two more processes compiling the pipeline: about 80 s
def test_two_processes_share_the_inputs(env, capsys):
    """Two `jaxsr sr` processes joined by jax.distributed over localhost split the
    inputs between them and produce what one process produces."""
    root, inputs = env
    files = [str(inputs / n) for n in GOOD]
    single = root / "single"
    assert sr(root, *files, "--output", single, "--seed", "5") == 0
    capsys.readouterr()

    shared = root / "shared"
    port = _free_port()
    argv = [sys.executable, "-m", "jaxsr.cli", "sr", *files, "--weights", str(root / "weights"),
            "--output", str(shared), "--steps", "2", "--process-size", "32", "--dtype",
            "float32", "--seed", "5", "--compile-cache", str(root / "xla-cache"),
            "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    env_vars = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(argv + ["--process-id", str(i)], env=env_vars, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        assert f"process {i}/2: written 3, skipped 0, failed 0" in out, out
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in single.iterdir())
    for p in single.iterdir():
        a, b = (np.asarray(Image.open(d / p.name)) for d in (single, shared))
        # Another process (1 CPU device, its own thread pool) may round differently.
        assert psnr_uint8(a, b) >= 50.0, p.name


def test_missing_inputs_and_wrong_weights(env, capsys, tmp_path):
    root, inputs = env
    assert sr(root, tmp_path / "nowhere.png", "--output", tmp_path / "o") == 1
    assert "nowhere.png: no such file or folder" in capsys.readouterr().err

    # An SD2-only conversion is not a SeeSR weights folder: a usage error, exit 2.
    sd_only = tmp_path / "sd2-weights"
    assert cli_main(["convert", "--sd", str(root / "sd2"), "--output", str(sd_only)]) == 0
    capsys.readouterr()
    argv = ["sr", str(inputs / "photo.png"), "--weights", str(sd_only),
            "--output", str(tmp_path / "o2")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(sd_only) in err, err
    assert not (tmp_path / "o2" / "photo.png").exists()


def test_options_from_flags():
    parse = build_parser().parse_args
    base = ["sr", "x.png", "--weights", "w", "--output", "o"]
    opts = build_options(parse(base))
    assert (opts.steps, opts.guidance_scale, opts.sampler) == (50, 5.5, "ddpm")
    opts = build_options(parse(base + ["--turbo"]))
    assert (opts.steps, opts.guidance_scale, opts.latent_tile_overlap,
            opts.timestep_spacing) == (2, 1.0, 32, "trailing")
    opts = build_options(parse(base + ["--turbo", "--steps", "4", "--sampler", "ddim",
                                       "--color-fix", "wavelet", "--guidance", "3"]))
    assert (opts.steps, opts.sampler, opts.color_fix, opts.guidance_scale) == (
        4, "ddim", "wavelet", 3.0)
    with pytest.raises(SystemExit):
        parse(base + ["--steps", "0"])
    with pytest.raises(SystemExit):
        parse(base + ["--sample-times", "0"])

    # The scripts' options: each flag reaches its field; defaults stay the pipelines'.
    opts = build_options(parse(base))
    assert (opts.upscale, opts.conditioning_scale, opts.start_timestep, opts.start_point) == (
        4, 1.0, 999, "lr")
    opts = build_options(parse(base + ["--upscale", "2", "--conditioning-scale", "0.5",
                                       "--start-steps", "500", "--start-point", "noise"]))
    assert (opts.upscale, opts.conditioning_scale, opts.start_timestep, opts.start_point) == (
        2, 0.5, 500, "noise")
    coser = build_options(parse(base + ["--upscale", "3", "--input-size", "256",
                                        "--patch-size", "640", "--patch-stride", "500",
                                        "--tiled-padding", "script"]), "coser")
    assert (coser.upscale, coser.input_size, coser.patch_size, coser.patch_stride,
            coser.tiled_padding) == (3, 256, 640, 500, "script")
    defaults = build_options(parse(base), "coser")
    assert (defaults.upscale, defaults.input_size, defaults.patch_size, defaults.patch_stride,
            defaults.tiled_padding) == (4, 512, 1280, 1000, "exact")
    seesr_only = [["--save-prompts"], ["--start-point", "lr"], ["--start-steps", "9"],
                  ["--conditioning-scale", "1"]]
    coser_only = [["--input-size", "64"], ["--patch-size", "64"], ["--patch-stride", "9"],
                  ["--tiled-padding", "script"]]
    for model, flags in (("coser", seesr_only), ("seesr", coser_only)):
        for flag in flags:
            with pytest.raises(ValueError, match=f"{flag[0]}: not an option of {model}"):
                build_options(parse(base + flag), model)
    with pytest.raises(ValueError, match="start_timestep"):
        build_options(parse(base + ["--start-steps", "1000"]))


def test_sample_jobs_have_their_own_names_and_streams():
    files = [Path("/in/a.png"), Path("/in/b.jpg"), Path("/in/b.png")]
    one = plan_jobs(files, "out")
    assert [j.output.name for j in one] == ["a.png", "b.jpg.png", "b.png.png"]
    two = plan_jobs(files, "out", samples=2)
    assert [j.output.name for j in two] == [
        "a-s0.png", "a-s1.png", "b.jpg-s0.png", "b.jpg-s1.png", "b.png-s0.png", "b.png-s1.png"]
    assert [j.index for j in two] == [0, 0, 1, 1, 2, 2]
    assert [j.source for j in two[:2]] == [files[0]] * 2
    assert len({j.stream for j in two}) == 6
    assert two[0].stream == zlib.crc32(b"a-s0.png")


def test_incomplete_multi_process_flags(capsys, tmp_path):
    argv = ["sr", "x.png", "--weights", str(tmp_path), "--output", str(tmp_path / "o"),
            "--coordinator", "localhost:1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "--num-processes, --process-id missing" in err, err


def test_inputs_are_shared_between_processes(env):
    _, inputs = env
    jobs = plan_jobs(discover([str(inputs)]).files, "out")
    shares = [for_process(jobs, p, 3) for p in range(3)]
    assert sorted(j.index for s in shares for j in s) == list(range(len(jobs)))
    assert [j.index for j in shares[1]] == list(range(1, len(jobs), 3))
