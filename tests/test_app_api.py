"""`jaxsr app` through its API with gradio_client, against a real server process on
`jaxsr demo`'s random tiny weights: same file, same seed, same settings as `jaxsr sr`
give the same pixels and prompts; bad uploads come back as messages and the server
keeps serving.

The app and `jaxsr sr` share one persistent XLA cache (also with tests/test_app_browser.py
in the same run), so the sampling program is compiled once."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client", reason="the app extra is not installed")

STEPS, PROCESS_SIZE = 2, 32
MAX_PIXELS = 4096


def shared_compile_cache(tmp_path_factory):
    """One XLA cache for the app tests of a run: the session's temp root (the parent of
    the per-worker roots under pytest-xdist)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / "jaxsr-app-xla"
    folder.mkdir(exist_ok=True)
    return folder


def demo_weights(folder):
    from configs import seesr as seesr_config
    from jaxsr.demo import write_random_seesr

    return write_random_seesr(folder, seesr_config.get_config("tiny"), log=lambda *_: None)


def real_photo(path, size):
    """scikit-image's chelsea photo (a cat, CC0), resized to `size` (w, h)."""
    from jaxsr.data.samples import SAMPLES, package_data_dir

    with Image.open(package_data_dir() / SAMPLES["chelsea"]) as im:
        im.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(weights, compile_cache, workdir, timeout=120):
    """`jaxsr app` in its own process on a free port; yields its URL."""
    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(workdir / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(workdir / "app.log", "w")          # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxsr.cli", "app", "--weights", str(weights), "--port",
         str(port), "--steps", str(STEPS), "--process-size", str(PROCESS_SIZE), "--dtype",
         "float32", "--compile-cache", str(compile_cache), "--max-pixels", str(MAX_PIXELS),
         "--output", str(workdir / "results")], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError("jaxsr app exited: "
                                     + (workdir / "app.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("jaxsr app did not answer: "
                                     + (workdir / "app.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def api_values(**changes):
    """The /upscale inputs after the image, in order: the page's initial values as
    `jaxsr app --steps 2 --process-size 32` sets them, with `changes`."""
    from jaxsr.app.ui import defaults, input_names

    values = {**defaults("seesr", {"steps": STEPS, "process_size": PROCESS_SIZE}), **changes}
    return [values[name] for name in input_names("seesr")[1:]]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_api")
    weights = demo_weights(root / "weights")
    cache = shared_compile_cache(tmp_path_factory)
    with running_app(weights, cache, root) as url:
        yield root, weights, cache, gradio_client.Client(url, verbose=False)


def _upscale(client, path, **changes):
    return client.predict(gradio_client.handle_file(str(path)), *api_values(**changes),
                          api_name="/upscale")


def test_app_equals_jaxsr_sr(app):
    root, weights, cache, client = app
    photo = real_photo(root / "cat.png", (32, 24))
    status, _, gallery, _, prompts, seconds, files = _upscale(client, photo, seed=7, samples=2)
    assert "done, 2 image(s) of 128x96 px" in status, status
    assert seconds.endswith(" s")
    assert [os.path.basename(f) for f in files] == ["cat-s0.png", "cat-s1.png"]
    assert len(gallery) == 2

    # `jaxsr sr` as a user runs it: its own process, as the app's (the test process
    # has 8 host devices and other XLA settings).
    out = root / "sr"
    done = subprocess.run(
        [sys.executable, "-m", "jaxsr.cli", "sr", str(photo), "--weights", str(weights),
         "--output", str(out), "--steps", str(STEPS), "--process-size", str(PROCESS_SIZE),
         "--seed", "7", "--sample-times", "2", "--save-prompts", "--dtype", "float32",
         "--compile-cache", str(cache)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for got, name in zip(files, ("cat-s0", "cat-s1")):
        expected = np.asarray(Image.open(out / f"{name}.png"))
        np.testing.assert_array_equal(np.asarray(Image.open(got)), expected, err_msg=name)
    a, b = (np.asarray(Image.open(f)) for f in files)
    assert not np.array_equal(a, b)                   # two samples, two streams
    assert prompts.split("\n") == [(out / f"{n}.txt").read_text() for n in ("cat-s0", "cat-s1")]

    # Another seed changes the picture; the program stays warm.
    status, *_, other = _upscale(client, photo, seed=8)
    assert "warm program" in status, status
    assert not np.array_equal(np.asarray(Image.open(other[0])), a)


@pytest.mark.parametrize("name, make, message", [
    ("notes.png", lambda p: p.write_text("not a picture\n"), "not an image file"),
    ("tiny.png", lambda p: Image.new("RGB", (5, 5)).save(p), "too small"),
    ("big.png", lambda p: Image.new("RGB", (80, 80)).save(p), "too large (80x80 px"),
])
def test_bad_uploads_are_messages(app, name, make, message):
    root, _, _, client = app
    path = root / name
    make(path)
    status, compare, gallery, _, _, _, files = _upscale(client, path)
    assert "**error:**" in status and name in status and message in status, status
    assert compare is None and files is None and not gallery


@pytest.mark.parametrize("model", ["seesr", "coser"])
def test_controls_are_the_pipeline_options(model):
    """Every control but seed/samples/turbo is a field of the model's options, and the
    page's initial values give exactly the pipeline's default options."""
    from jaxsr.app.service import SRService
    from jaxsr.app.ui import NOT_OPTIONS, controls, defaults
    from jaxsr.pipelines.coser import CoSeROptions
    from jaxsr.pipelines.seesr import SeeSROptions

    service = SRService(None, model, {})        # no pipeline: options only
    settings = {k: v for k, v in defaults(model).items() if k not in NOT_OPTIONS}
    expected = CoSeROptions() if model == "coser" else SeeSROptions()
    assert service.options(settings) == expected
    names = {c.name for c in controls(model)}
    wanted = {"steps", "guidance_scale", "prompt", "negative_prompt", "upscale", "color_fix",
              "latent_tile", "latent_tile_overlap", "seed", "samples"}
    wanted |= ({"reference_guidance_scale", "decoder", "fusion_weight", "mode"}
               if model == "coser" else {"sampler", "added_prompt", "turbo"})
    assert wanted <= names
    with pytest.raises(ValueError, match="sd-turbo|turbo"):
        service.options(settings, turbo=True)
