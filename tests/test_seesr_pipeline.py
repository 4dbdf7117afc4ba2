"""The SeeSR pipeline's own behaviour on a tiny random release: output sizes, seeds and
batching, samplers, latent tiling against untiled sampling, devices, and a 2048²
output under a memory bound. (Parity with a PyTorch reference pipeline is in
test_seesr_pipeline_parity.py.)"""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from jaxsr.diffusion.samplers import make_sampler, sampler_init, sampler_step
from jaxsr.pipelines.seesr import SeeSROptions, SeeSRPipeline
from jaxsr.pipelines.seesr_sampling import skip_steps_above
from tests.parity import assert_within_levels, psnr_uint8
from tests.test_convert_seesr_cli import _convert, write_tiny_release
from tests.test_schedulers import (
    SD2_BASE,
    assert_trajectories_close,
    replay_step_noise,
    start_latent,
    toy_model,
)

FAST = SeeSROptions(steps=2, process_size=32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = write_tiny_release(tmp_path_factory.mktemp("release"))
    assert _convert(root, root / "weights") == 0
    return root / "weights"


@pytest.fixture(scope="module")
def pipe(weights):
    return SeeSRPipeline.from_pretrained(weights, dtype="float32", devices=jax.devices()[:1])


def _images(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]


def test_options_are_validated():
    with pytest.raises(ValueError, match="sampler 'euler'"):
        SeeSROptions(sampler="euler")
    with pytest.raises(ValueError, match="color_fix 'hist'"):
        SeeSROptions(color_fix="hist")
    with pytest.raises(ValueError, match="steps"):
        SeeSROptions(steps=0)
    with pytest.raises(ValueError, match="start_point 'x'"):
        SeeSROptions(start_point="x")


@pytest.mark.parametrize("kind, num_steps, start", [
    ("ddpm", 50, 500), ("ddpm", 50, 999), ("ddim", 20, 600), ("dpmpp", 20, 500)])
def test_start_steps_skip_like_the_pipeline_loop(kind, num_steps, start):
    """skip_steps_above against diffusers' schedulers driven as pipeline_seesr.py drives
    them with start_steps: every step at t > start_steps is passed over (`continue`), the
    others run as usual (DDPM draws its noise per step run, from the generator)."""
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler}
    ref = cls[kind].from_config(SD2_BASE)
    ref.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(3)
    x = start_latent()
    want = []
    for t in ref.timesteps.tolist():
        if t > start:
            continue
        extra = {"generator": generator} if kind == "ddpm" else {}
        x = ref.step(torch.from_numpy(toy_model(x, t)), t, torch.from_numpy(x),
                     **extra).prev_sample.numpy()
        want.append(x)

    plan = skip_steps_above(make_sampler(kind, SD2_BASE, num_steps), start)
    timesteps = plan.timesteps.tolist()
    assert timesteps == [t for t in ref.timesteps.tolist() if t <= start]
    if (kind, start) == ("ddpm", 500):
        assert (timesteps[0], len(timesteps)) == (481, 25)
    noises = replay_step_noise(timesteps, seed=3)
    x, state, got = start_latent(), sampler_init(plan, start_latent()), []
    for i, t in enumerate(timesteps):
        state, x = sampler_step(plan, state, i, x, toy_model(np.asarray(x), t), noises[i])
        got.append(np.asarray(x))
    assert_trajectories_close(got, want, f"{kind} N={num_steps} from t <= {start}")


def test_prompt_is_the_reference_format():
    # test_seesr.py: f"{tags}, {prompt}," + added_prompt
    assert (SeeSROptions().positive_prompt("cat, dog")
            == "cat, dog, ,clean, high-resolution, 8k")
    assert (SeeSROptions(prompt="sharp", added_prompt="x").positive_prompt("")
            == ", sharp,x")


def test_outputs_are_4x_and_reproducible(pipe):
    # 13×10 is not a multiple of 8 after ×4 (52×40 -> 48×40), so the final PIL resize
    # runs; 6×9 is below process_size/4 = 8 on one side, so the enlargement runs.
    ims = _images(0, (10, 13), (10, 13), (6, 9))
    out, prompts = pipe.upscale(ims, options=FAST, seed=3, return_prompts=True)
    assert [o.shape for o in out] == [(40, 52, 3), (40, 52, 3), (24, 36, 3)]
    assert all(o.dtype == np.uint8 for o in out)
    assert all(p.endswith(", ,clean, high-resolution, 8k") for p in prompts)
    again = pipe.upscale(ims, options=FAST, seed=3, batch_size=1)
    # Batching does not change a result beyond float32 rounding (programs of another
    # batch size may round a value to the other side of a level boundary).
    for a, b in zip(out, again):
        assert_within_levels(a, b, what="batch 3 vs batch 1")
    other_seed = pipe.upscale(ims[:1], options=FAST, seed=4)[0]
    other_id = pipe.upscale(ims[:1], options=FAST, seed=3, ids=[1])[0]
    assert not np.array_equal(other_seed, out[0])
    # ids pick the random stream: image 0 with id 1 equals image 1's stream on image 0's pixels
    assert not np.array_equal(other_id, out[0])
    assert_within_levels(pipe.upscale([ims[1]], options=FAST, seed=3, ids=[1])[0], out[1],
                         what="id 1 alone vs in a batch")


def test_pil_inputs_of_any_mode(pipe):
    from PIL import Image

    gray = Image.fromarray(_images(1, (10, 13))[0][..., 0])
    rgba = Image.fromarray(np.dstack([_images(2, (10, 13))[0], np.full((10, 13), 7, np.uint8)]))
    out = pipe.upscale([gray, rgba], options=FAST)
    assert [o.shape for o in out] == [(40, 52, 3), (40, 52, 3)]


# A smoke test of the other samplers through the whole pipeline (their steps are matched
# to diffusers in test_schedulers.py): two more sampling compiles, so marked slow.
@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_other_samplers(pipe, sampler):
    ims = _images(0, (10, 13))
    ddpm = pipe.upscale(ims, options=FAST)[0]
    out = pipe.upscale(ims, options=SeeSROptions(steps=2, process_size=32, sampler=sampler))[0]
    assert out.shape == ddpm.shape
    assert not np.array_equal(out, ddpm)


def test_latent_tiling_close_to_untiled(pipe):
    """An image just over the threshold: 104² px -> 13×13 latent > 12², so tiles of 12
    with overlap 4 (2×2 tiles) run; untiled sampling (tile 96) is the reference."""
    ims = _images(5, (26, 26))
    base = dict(steps=2, process_size=32)
    untiled = pipe.upscale(ims, options=SeeSROptions(**base))[0]
    tiled = pipe.upscale(ims, options=SeeSROptions(**base, latent_tile=12,
                                                   latent_tile_overlap=4))[0]
    value = psnr_uint8(tiled, untiled)
    print(f"tiled vs untiled sampling, 104x104 output: PSNR {value:.1f} dB")
    assert not np.array_equal(tiled, untiled)     # the tiled path really ran
    assert value >= 30.0


def test_two_devices_agree_with_one(weights, pipe):
    two = SeeSRPipeline.from_pretrained(weights, dtype="float32", devices=jax.devices()[:2])
    ims = _images(7, (10, 13), (10, 13))
    a = two.upscale(ims, options=FAST)
    b = pipe.upscale(ims, options=FAST)
    for x, y in zip(a, b):
        assert psnr_uint8(x, y) >= 50.0


def test_spatial_shards_match_the_unsharded_image(weights, pipe):
    """4 devices as data 2 x space 2: two images split the batch and each image's
    height is split over 2 devices (the partitioner exchanges conv halos and gathers
    attention K/V). The images are the one-device ones up to float32 rounding: the
    sums that now run per shard (norm statistics, attention rows) round differently,
    and two sampling steps and the decoder carry that to a few output values (measured:
    3 of 22,464 values, by up to 2 levels). Untiled: 26x18 LR -> 104x72 output, a
    13x9 latent whose 13 rows do not divide by 2 (the partitioner pads)."""
    sharded = SeeSRPipeline.from_pretrained(weights, dtype="float32",
                                            devices=jax.devices()[:4], spatial_shards=2)
    assert sharded.batch_multiple == 2
    assert dict(sharded.mesh.shape) == {"data": 2, "space": 2}
    ims = _images(11, (26, 18), (26, 18))
    options = SeeSROptions(steps=2, process_size=32)
    got = sharded.upscale(ims, options=options)
    want = pipe.upscale(ims, options=options)
    for x, y in zip(got, want):
        assert x.shape == y.shape == (104, 72, 3)
        assert_within_levels(x, y, levels=4, fraction=0.01, what="spatial vs unsharded")
        assert psnr_uint8(x, y) >= 60.0


def test_spatial_shards_must_divide_the_devices(weights):
    with pytest.raises(ValueError, match="spatial_shards 3 must divide the 2 devices"):
        SeeSRPipeline.from_pretrained(weights, dtype="float32", devices=jax.devices()[:2],
                                      spatial_shards=3)


@pytest.mark.slow
def test_2048_output_fits_a_memory_bound(weights):
    """A 512² LR -> 2048² output (latent 256², 9 latent tiles; tiled VAE encode and
    decode) at tiny scale, in a fresh process so its peak RSS is its own."""
    script = textwrap.dedent(f"""
        import json, resource, numpy as np
        from jaxsr.pipelines.seesr import SeeSROptions, SeeSRPipeline
        pipe = SeeSRPipeline.from_pretrained({str(weights)!r}, dtype="float32")
        lr = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        out = pipe.upscale([lr], options=SeeSROptions(steps=2))[0]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps({{"shape": out.shape, "maxrss_gib": rss}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"2048x2048 output, tiny SeeSR: peak RSS {result['maxrss_gib']:.2f} GiB")
    assert result["shape"] == [2048, 2048, 3]
    assert result["maxrss_gib"] < 4.0
