"""CoSeRPipeline's tiled mode (CoSeR's scripts/inference_tile.py) against the PyTorch
loop of tests/coser_sampling_reference.py on a tiny release converted by `convert_coser`:
gray reference, E of the whole LR, enlargement by s > 4 and the bicubic way back to ×4,
reflect padding to 32, two overlapping 1280-style patches (scaled down) averaged, two
Gaussian-blended latent tiles per patch, guidance, AdaIN; with jaxsr's padding and with
the script's own (tiled_padding "script"). Also: `upscale`'s ids and injected noises. The
reference mode is checked end to end through the CLI (tests/test_cli_coser.py)."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from jaxsr.convert.coser_weights import convert_coser
from jaxsr.pipelines.coser import CoSeROptions, CoSeRPipeline, patch_starts, tiled_geometry
from jaxsr.pipelines.coser_sampling import draw_noises
from tests import coser_sampling_reference as ref
from tests.coser_release import ARCH, write_tiny_coser_release
from tests.parity import nhwc_to_nchw, psnr_uint8

STEPS, SEED = 3, 11
# LR 20×12: s = 64/12 = 5.33 -> 106×64, padded to 128×64 -> patches of 96×64 at rows
# 0 and 32 -> latents 12×8 -> tiles of 8 at rows 0 and 4. The script's padding makes it
# 128×96 (the 64 side grows by 32) -> patches of 96×96 -> 2×2 latent tiles per patch.
LR_HW = (20, 12)
OPTIONS = CoSeROptions(steps=STEPS, mode="tiled", decoder="vae", color_fix="adain",
                       input_size=64, latent_tile=8, latent_tile_overlap=4, patch_size=96,
                       patch_stride=64)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("coser_tiled")
    paths, states, modules = write_tiny_coser_release(root / "release")
    folder = convert_coser(coser=paths["coser"], qformer=paths["qformer"], sd=paths["sd21"],
                           tokenizer=paths["tokenizer"], output=root / "weights", arch=ARCH,
                           log=lambda *_: None)
    return folder, modules


@pytest.mark.parametrize("length, size, stride, want", [
    (100, 128, 96, [0]), (128, 96, 64, [0, 32]), (2000, 1280, 1000, [0, 720]),
    (3000, 1280, 1000, [0, 1000, 1720]), (1280, 1280, 1000, [0])])
def test_patch_starts_match_image_spliter(length, size, stride, want):
    assert patch_starts(length, size, stride) == ref.patch_starts(length, size, stride) == want


def test_options_are_checked_and_modes_picked():
    with pytest.raises(ValueError, match="mode"):
        CoSeROptions(mode="fast")
    with pytest.raises(ValueError, match="patch size"):
        CoSeROptions(patch_size=100)
    auto = CoSeROptions()
    assert auto.pick_mode(128, 128) == "reference"        # 512² output: CoSeR's size
    assert auto.pick_mode(128, 129) == "tiled"


def _psnr_and_levels(a, b):
    """(PSNR in dB, largest difference, number of values that differ) of two uint8 images."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return psnr_uint8(a, b), int(diff.max()), int(np.count_nonzero(diff))


@pytest.mark.slow       # two sampling programs (drawn and injected noises): 142 s on 2 cores
def test_ids_and_injected_noises_replay_through_upscale(release):
    """`upscale(noises=...)` with the draws `draw_noises` makes from fold_in(key(seed), id)
    gives the `upscale(ids=...)` result; by default every image draws from key(seed)
    (the scripts reseed per image); other injected draws change only their image."""
    folder, _ = release
    pipe = CoSeRPipeline.from_pretrained(folder, dtype="float32", devices=jax.devices()[:1])
    options = CoSeROptions(steps=2, mode="reference", decoder="vae")
    images = list(np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    shape = pipe.noise_shape(images[0], options)
    assert shape == (8, 8, 4)                           # 64² output, VAE factor 8

    by_ids = pipe.upscale(images, options=options, seed=SEED, ids=[3, 7])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(SEED), i))(np.array([3, 7]))
    noises = jax.device_get(draw_noises(keys, options.steps, shape))
    replay = pipe.upscale(images, options=options, seed=0, noises=noises)   # seed unused
    default = pipe.upscale(images, options=options, seed=SEED)
    same_keys = jax.vmap(lambda _: jax.random.key(SEED))(np.arange(2))
    replay_default = pipe.upscale(images, options=options,
                                  noises=jax.device_get(draw_noises(same_keys, 2, shape)))
    other = {**noises, "start": noises["start"].copy()}
    other["start"][1] = np.random.default_rng(0).standard_normal(shape)
    changed = pipe.upscale(images, options=options, noises=other)

    for k in range(2):
        # Two programs (draws made inside vs given): equal within XLA:CPU's rounding.
        for got, want, what in ((replay[k], by_ids[k], "ids"),
                                (replay_default[k], default[k], "default")):
            psnr, levels, count = _psnr_and_levels(got, want)
            print(f"image {k}, {what}: injected vs drawn PSNR {psnr:.1f} dB, max diff "
                  f"{levels} on {count} of {got.size} values")
            assert psnr >= 60.0 and levels <= 1 and count <= got.size // 100
        assert _psnr_and_levels(default[k], by_ids[k])[0] < 40.0     # ids pick the stream
    # One program, image 0's inputs unchanged: its result too, bit for bit.
    np.testing.assert_array_equal(changed[0], replay[0])
    assert _psnr_and_levels(changed[1], replay[1])[0] < 40.0
    with pytest.raises(ValueError, match="noises: need shapes"):
        pipe.upscale(images, options=options, noises={**noises, "steps": noises["steps"][:1]})


def test_tiled_sizes_follow_the_script():
    """tiled_geometry against tests/coser_sampling_reference.tile_sizes (written from
    inference_tile.py) for both paddings, and the script's two quirks by number."""
    for h, w in [(50, 70), (20, 12), (128, 128), (130, 200), (64, 97), (300, 301), (9, 400)]:
        for input_size in (64, 512):
            for upscale in (2, 3, 4):
                for padding in ("exact", "script"):
                    opts = CoSeROptions(input_size=input_size, upscale=upscale,
                                        tiled_padding=padding)
                    g = tiled_geometry(h, w, opts)
                    s, big, pad, final = ref.tile_sizes(h, w, input_size, upscale, padding)
                    assert (g.scale, g.enlarged, g.output) == (s, big, final)
                    assert g.padded == (big[0] + pad[0], big[1] + pad[1])
    script = CoSeROptions(tiled_padding="script")
    # 50×70: s = 10.24, enlarged 512×716; a 512 side gets 32 more; final from 544×736.
    assert tiled_geometry(50, 70, script) == (10.24, (512, 716), (544, 736), (212, 287))
    assert tiled_geometry(50, 70, CoSeROptions()).padded == (512, 736)
    assert tiled_geometry(50, 70, CoSeROptions()).output == (200, 280)
    # Both sides multiples of 32: no padding in either mode.
    assert tiled_geometry(128, 128, script).padded == (512, 512)
    with pytest.raises(ValueError, match="tiled_padding"):
        CoSeROptions(tiled_padding="reflect")


@pytest.mark.slow       # one more compile of a whole sampling program per case (~2 min each)
@pytest.mark.parametrize("padding", ["exact", "script"])
def test_tiled_mode_matches_torch(release, padding):
    """LR 20×12, input_size 64: s = 5.33, enlarged 106×64. "exact": padded to 128×64,
    output 80×48. "script": the 64 side is padded too (128×96) and the output is sized
    from the padded image, 96×72."""
    folder, modules = release
    pipe = CoSeRPipeline.from_pretrained(folder, dtype="float32", devices=jax.devices()[:1])
    options = dataclasses.replace(OPTIONS, tiled_padding=padding)
    rng = np.random.default_rng(3)
    lr = rng.integers(0, 256, (*LR_HW, 3), dtype=np.uint8)
    [got] = pipe.upscale([lr], options=options, seed=SEED)
    size = {"exact": (80, 48), "script": (96, 72)}[padding]
    assert got.shape == (*size, 3) and got.dtype == np.uint8

    # Every patch draws from key(seed) (the script reseeds per patch): the same noises.
    keys = jax.vmap(lambda _: jax.random.key(SEED))(np.arange(1))
    noises = jax.device_get(draw_noises(keys, STEPS, pipe.noise_shape(lr, options)))
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(a)))
    text = modules["text"]
    ids = lambda p: torch.from_numpy(np.asarray(
        pipe.tokenizer([p], padding="max_length", max_length=77, truncation=True)["input_ids"]))
    with torch.no_grad():
        prompt = text(ids(options.prompt)).last_hidden_state
        negative = text(ids(options.negative_prompt)).last_hidden_state
    want = ref.reference_coser_tiled(
        torch.from_numpy(nhwc_to_nchw(lr[None].astype(np.float32) / 255.0).copy()),
        sr=modules["sr"], tower=modules["tower"], qformer=modules["qformer"],
        query_tokens=torch.from_numpy(modules["query_tokens"]),
        vision_size=ARCH.cognitive.vision.image_size, vae=modules["vae"],
        unet=modules["unet"], cn=modules["controlnet"], prompt=prompt, negative=negative,
        noises={"start": tt(noises["start"]), "steps": [tt(n) for n in noises["steps"]]},
        steps=STEPS, cfg=options.guidance_scale, fix="adain", input_size=options.input_size,
        tile=options.latent_tile, overlap=options.latent_tile_overlap,
        patch=options.patch_size, stride=options.patch_stride, padding=padding)[0]
    psnr, levels, count = _psnr_and_levels(got, want)
    print(f"\ntiled CoSeR ({padding} padding) vs torch: PSNR {psnr:.2f} dB, max diff "
          f"{levels} ({count} of {got.size} values differ)")
    assert psnr >= 60.0 and levels <= 1
