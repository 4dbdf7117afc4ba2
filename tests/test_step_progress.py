"""Progress per denoising step (jaxsr.inference.step_progress) through the SeeSR and
CoSeR pipelines on random tiny weights: the listener hears each step of each loop once
and in order; the images equal those without progress to the bit; without the option
the lowered program has no host callback, with it it has; `SRService.run(on_step=...)`
relays the steps, labelled per batch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxsr.app.service import SRService
from jaxsr.inference import step_progress
from jaxsr.pipelines.coser import CoSeROptions, CoSeRPipeline
from jaxsr.pipelines.seesr import SeeSROptions, SeeSRPipeline

STEPS = 3
SEESR = SeeSROptions(steps=STEPS, process_size=32)


@pytest.fixture(scope="module")
def seesr_weights(tmp_path_factory):
    from configs import seesr as seesr_config
    from jaxsr.demo import write_random_seesr

    folder = tmp_path_factory.mktemp("seesr")
    return write_random_seesr(folder, seesr_config.get_config("tiny"), log=lambda *_: None)


@pytest.fixture(scope="module")
def seesr(seesr_weights):
    return SeeSRPipeline.from_pretrained(seesr_weights, dtype="float32",
                                         devices=jax.devices()[:1])


def _image(seed, h=8, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _heard(run):
    """run() under a listener -> (its result, the (step, total, loop) reports)."""
    heard = []
    with step_progress.listening(lambda *report: heard.append(report)):
        result = run()
    return result, heard


def test_listener_reports_each_step_once_in_order():
    """Pure host logic: duplicates (one per device), a late step, a new call."""
    heard = []
    listener = step_progress.StepListener(lambda *r: heard.append(r))
    for step in (1, 1, 3, 2, 2, 3):            # device 1 ahead by two steps
        listener(step, 3, "sr")
    listener(1, 2, "reference")
    assert heard == [(1, 3, "sr"), (2, 3, "sr"), (3, 3, "sr"), (1, 2, "reference")]
    listener.new_call()
    listener(1, 3, "sr")
    assert heard[-1] == (1, 3, "sr") and len(heard) == 5


def test_seesr_steps_reported_and_images_unchanged(seesr):
    image = _image(0)
    plain = seesr.upscale([image], options=SEESR)
    tracked, heard = _heard(lambda: seesr.upscale([image], options=SeeSROptions(
        steps=STEPS, process_size=32, step_progress=True)))
    assert heard == [(s, STEPS, "denoise") for s in range(1, STEPS + 1)]
    np.testing.assert_array_equal(tracked[0], plain[0])
    # Listening without the option hears nothing: that program has no callback.
    _, silent = _heard(lambda: seesr.upscale([image], options=SEESR))
    assert silent == []


def _has_callback(lowered: str) -> bool:
    """Whether the lowered program calls the host: jax.debug.callback lowers to a custom
    call to xla_ffi_python_cpu_callback (xla_..._gpu_callback on GPUs)."""
    return re.search(r"custom_call @xla\w*python_\w*callback", lowered) is not None


def test_seesr_program_has_a_callback_only_with_the_option(seesr):
    image = _image(3)
    tags, ram = seesr.tag_prompts([image])
    options = SEESR
    text = seesr.encode_prompts([options.positive_prompt(tags[0])])
    text = jnp.stack([seesr.encode_prompts([options.negative_prompt]), text], axis=1)
    h, w = seesr.bucket_key(image, options)
    control = jnp.zeros((1, h, w, 3), jnp.float32)
    keys = jax.random.key(0)[None]
    texts = {}
    for on in (False, True):
        opts = SeeSROptions(steps=STEPS, process_size=32, step_progress=on)
        program = seesr._restore_fn(seesr._settings(opts))
        texts[on] = program.lower(seesr.params, seesr._plan(opts), control, text, ram,
                                  keys, None).as_text()
    assert not _has_callback(texts[False])
    assert _has_callback(texts[True])


def test_service_relays_steps_per_batch(seesr, tmp_path):
    """Two samples are two batches on one device; the program is the one above's."""
    path = tmp_path / "photo.png"
    Image.fromarray(_image(4)).save(path)
    service = SRService(seesr, "seesr", {}, output_dir=tmp_path / "out")
    heard, batches = [], []
    result = service.run(path, {"steps": STEPS, "process_size": 32}, seed=0, samples=2,
                         progress=lambda fraction, text: batches.append(fraction),
                         on_step=lambda *report: heard.append(report))
    assert len(result.images) == 2
    assert heard == [(s, STEPS, f"batch {k}/2, denoise step {s}/{STEPS}")
                     for k in (1, 2) for s in range(1, STEPS + 1)]
    assert batches == [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def coser(tmp_path_factory):
    from jaxsr.cli import main as cli_main
    from tests.coser_release import write_tiny_coser_release

    root = tmp_path_factory.mktemp("coser")
    paths, _, _ = write_tiny_coser_release(root / "release")
    argv = ["convert", "--coser", str(paths["coser"]), "--qformer", str(paths["qformer"]),
            "--sd", str(paths["sd21"]), "--tokenizer", str(paths["tokenizer"]),
            "--config", "configs/coser.py:tiny", "--output", str(root / "weights")]
    assert cli_main(argv) == 0
    return CoSeRPipeline.from_pretrained(root / "weights", dtype="float32",
                                         devices=jax.devices()[:1])


# Two compiles of CoSeR's reference-mode program (both loops, encode, two decodes): about
# 2 min on 2 busy cores. The smallest run: an LR of 16² (the 64-pixel multiple at ×4),
# 2 steps, the plain VAE decoder, no guidance (one UNet pass per step in each loop).
@pytest.mark.slow
def test_coser_both_loops_reported_and_images_unchanged(coser):
    base = dict(steps=2, mode="reference", decoder="vae", guidance_scale=1.0,
                reference_guidance_scale=1.0)
    image = _image(5, 16, 16)
    (plain, plain_ref), silent = _heard(lambda: coser.upscale(
        [image], options=CoSeROptions(**base), return_references=True))
    (sr, ref), heard = _heard(lambda: coser.upscale(
        [image], options=CoSeROptions(**base, step_progress=True), return_references=True))
    assert silent == []
    assert heard == [(1, 2, "reference"), (2, 2, "reference"), (1, 2, "sr"), (2, 2, "sr")]
    np.testing.assert_array_equal(sr[0], plain[0])
    np.testing.assert_array_equal(ref[0], plain_ref[0])
