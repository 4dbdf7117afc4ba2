"""`jaxsr sr` on real files in every common mode, plus broken ones, through the real
command line (in-process `jaxsr.cli.main`) and a tiny random SeeSR release converted
by `jaxsr convert`."""

import io
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxsr.cli import build_parser
from jaxsr.cli import main as cli_main
from jaxsr.commands.sr import build_options
from jaxsr.inference.inputs import discover, for_process, plan_jobs
from tests.parity import psnr_uint8
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
