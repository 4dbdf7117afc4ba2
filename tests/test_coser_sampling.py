"""CoSeR's device program (jaxsr.pipelines.coser_sampling) against the PyTorch loop of
tests/coser_sampling_reference.py: tiny random networks (the AiA UNet and ControlNet
of tests/coser_reference.py, the cognitive encoder of tests/coser_cognitive_reference.py,
a diffusers VAE), float32, N = 3 respaced steps, AdaIN colour fix.

One compiled program (the keys path) serves the parity test, which draws the noises
with `draw_noises` (the draws the per-image keys give inside the program) and injects
them into the torch loop, and the batch test, which reuses it with other images; both
are marked slow, as the default suite runs the same program end to end through the CLI
(tests/test_cli_coser.py). The CFW decode stage is checked on its own (small compile)
against tests/cfw_reference.py; the explicit-`noises` replay path needs a second full
compile and is slow too.
"""

import functools

import diffusers
import jax
import numpy as np
import pytest
import torch

from jaxsr.convert import coser_unet as convert
from jaxsr.convert.cfw import load_cfw
from jaxsr.convert.coser_cognitive import PRE_SR_PREFIX, VISUAL_PREFIX, load_cognitive
from jaxsr.convert.networks import load_vae
from jaxsr.diffusion.respace import respaced_schedule
from jaxsr.models.cfw_vae import CFWAutoencoderKL
from jaxsr.models.cognitive import TINY_COGNITIVE, CognitiveEncoder
from jaxsr.models.coser_controlnet import CoSeRControlNet, CoSeRControlNetConfig
from jaxsr.models.coser_unet import CoSeRUNet, CoSeRUNetConfig
from jaxsr.models.unet import UNetConfig
from jaxsr.models.vae import AutoencoderKL, VAEConfig
from jaxsr.pipelines.coser_sampling import (
    CoSeRNetworks,
    CoSeRSettings,
    coser_restore,
    decode_image,
    draw_noises,
)
from tests import coser_reference as aia_ref
from tests import coser_sampling_reference as ref
from tests.cfw_reference import TorchCFW
from tests.coser_cognitive_reference import (
    TorchMSRResNet,
    TorchVisionTower,
    blip2_qformer,
    blip2_to_coser,
    perturb_,
)
from tests.parity import FAST_COMPILE, nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state
from tests.test_unet import TINY as UNET_TINY
from tests.test_unet import randomize_
from tests.test_vae import TINY as VAE_TINY

STEPS, BATCH, LR_HW, TEXT_LEN = 3, 2, (16, 32), 77
WIDTH = TINY_COGNITIVE.qformer.hidden_size          # E's width = the UNet's context width
UNET_KW = {**UNET_TINY, "cross_attention_dim": WIDTH}
BASE = UNetConfig.from_diffusers_config(UNET_KW)
SETTINGS = CoSeRSettings(color_fix="adain")


def _compiled(fn, *args):
    """jit(fn) compiled for args with the fast-compile options."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def release():
    """(torch modules for the reference, jaxsr nets, jaxsr params) of one tiny CoSeR."""
    torch.manual_seed(0)
    unet = aia_ref.aia_unet(UNET_KW).eval()
    cn = aia_ref.CoSeRControlNetRef(UNET_KW).eval()
    vae = diffusers.AutoencoderKL(**VAE_TINY).eval()
    randomize_(unet, seed=1)      # every zero conv non-zero, so X and R matter
    randomize_(cn, seed=2)
    randomize_(vae, seed=3)
    sr = perturb_(TorchMSRResNet(TINY_COGNITIVE.srresnet), 4, 0.01).eval()
    tower = perturb_(TorchVisionTower(TINY_COGNITIVE.vision), 5).eval()
    qf = perturb_(blip2_qformer(TINY_COGNITIVE.qformer), 6).eval()
    q = TINY_COGNITIVE.qformer
    query_tokens = np.random.default_rng(7).normal(
        size=(1, q.num_query_tokens, q.hidden_size)).astype(np.float32)

    cog_state = {**{PRE_SR_PREFIX + k: v for k, v in torch_state(sr).items()},
                 **{VISUAL_PREFIX + k: v for k, v in torch_state(tower).items()},
                 **blip2_to_coser(torch_state(qf), q, query_tokens, np.random.default_rng(8))}
    ucfg, ccfg = CoSeRUNetConfig(base=BASE), CoSeRControlNetConfig(base=BASE)
    vcfg = VAEConfig.from_diffusers_config(dict(vae.config))
    params = {
        "cognitive": load_cognitive(cog_state, TINY_COGNITIVE),
        "unet": convert.convert_aia_unet(
            aia_ref.ldm_state(torch_state(unet), convert.UNET_PREFIX), ucfg),
        "controlnet": convert.convert_controlnet(
            aia_ref.ldm_state(torch_state(cn), convert.CONTROLNET_PREFIX), ccfg),
        "vae": load_vae(torch_state(vae), vcfg),
    }
    nets = CoSeRNetworks(CognitiveEncoder(TINY_COGNITIVE), CoSeRUNet(ucfg),
                         CoSeRControlNet(ccfg), AutoencoderKL(vcfg))
    torch_modules = dict(sr=sr, tower=tower, qformer=qf,
                         query_tokens=torch.from_numpy(query_tokens),
                         vision_size=TINY_COGNITIVE.vision.image_size, vae=vae, unet=unet, cn=cn)
    return torch_modules, nets, params


def _inputs(seed):
    rng = np.random.default_rng(seed)
    lr = rng.uniform(size=(BATCH, *LR_HW, 3)).astype(np.float32)
    prompt = rng.standard_normal((BATCH, TEXT_LEN, WIDTH)).astype(np.float32)
    negative = rng.standard_normal((BATCH, TEXT_LEN, WIDTH)).astype(np.float32)
    return lr, prompt, negative


@pytest.fixture(scope="module")
def run(release):
    """run(lr, prompt, negative, keys) -> CoSeROutput (numpy): coser_restore for SETTINGS
    and the test shapes, compiled once (the keys path)."""
    _, nets, params = release
    schedule = respaced_schedule(STEPS)
    lr, prompt, negative = _inputs(0)
    keys = jax.random.split(jax.random.key(0), BATCH)
    program = _compiled(functools.partial(coser_restore, nets, SETTINGS), params, schedule, lr,
                        prompt, negative, keys)
    return lambda *args: jax.device_get(program(params, schedule, *args))


# The default suite checks the same program end to end through `jaxsr sr --model coser`
# against the same PyTorch composition (tests/test_cli_coser.py); this program-level
# check (latents too) costs one more compile of the whole sampler, so it is slow.
@pytest.mark.slow
def test_restore_matches_torch_loop(release, run):
    torch_modules = release[0]
    lr, prompt, negative = _inputs(0)
    keys = jax.random.split(jax.random.key(0), BATCH)
    got = run(lr, prompt, negative, keys)

    latent_shape = got.latent.shape[1:]
    assert latent_shape == (LR_HW[0] // 2, LR_HW[1] // 2, 4)
    noises = jax.device_get(draw_noises(keys, STEPS, latent_shape))
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(a)))
    want = ref.reference_coser(
        torch.from_numpy(nhwc_to_nchw(lr).copy()), **torch_modules,
        prompt=torch.from_numpy(prompt), negative=torch.from_numpy(negative),
        noises={"start": tt(noises["start"]),
                "reference_steps": [tt(n) for n in noises["reference_steps"]],
                "steps": [tt(n) for n in noises["steps"]]},
        steps=STEPS, cfg=SETTINGS.guidance_scale, cfg_ref=SETTINGS.reference_guidance_scale,
        fix=SETTINGS.color_fix)

    assert want["timesteps"] == [0, 500, 999]
    ref_err = rel_err(got.reference_latent, nchw_to_nhwc(want["reference_latent"].numpy()))
    lat_err = rel_err(got.latent, nchw_to_nhwc(want["latent"].numpy()))
    img_diff = np.abs(got.image.astype(int) - want["image"])
    refimg_diff = np.abs(got.reference_image.astype(int) - want["reference_image"])
    print(f"\nreference latent rel_err {ref_err:.2e}, SR latent rel_err {lat_err:.2e}; "
          f"uint8 image max diff {img_diff.max()} ({np.count_nonzero(img_diff)} of "
          f"{img_diff.size}), reference image max diff {refimg_diff.max()}")
    assert ref_err <= 1e-4 and lat_err <= 1e-4
    assert got.image.shape == got.reference_image.shape == (BATCH, 4 * LR_HW[0],
                                                            4 * LR_HW[1], 3)
    assert img_diff.max() <= 1 and refimg_diff.max() <= 1
    # The SR pass is not the reference pass: the control features change the result.
    assert rel_err(got.latent, got.reference_latent) > 1e-2


@pytest.mark.slow       # shares test_restore_matches_torch_loop's compiled program
def test_results_do_not_depend_on_the_batch(run):
    """Image a with key k_a gives the same result next to any other image, in any slot;
    other keys give other results."""
    lr, prompt, negative = _inputs(0)
    lr2, prompt2, negative2 = _inputs(1)
    k = jax.random.split(jax.random.key(0), BATCH)
    k_other = jax.random.split(jax.random.key(1), BATCH)
    first = run(lr, prompt, negative, k)
    # image 0 of the first batch now in slot 1, beside a different image and key
    swap = lambda a, b: np.stack([b[0], a[0]])
    second = run(swap(lr, lr2), swap(prompt, prompt2), swap(negative, negative2),
                  jax.numpy.stack([k_other[0], k[0]]))
    for name in ("latent", "reference_latent"):
        err = rel_err(getattr(second, name)[1], getattr(first, name)[0])
        # Not bitwise: XLA may round differently in another batch slot.
        assert err <= 1e-5, (name, err)
    assert np.abs(second.image[1].astype(int) - first.image[0]).max() <= 1
    # The same image with another key: another sample.
    third = run(lr, prompt, negative, k_other)
    assert rel_err(third.latent[0], first.latent[0]) > 1e-2
    assert rel_err(third.reference_latent[0], first.reference_latent[0]) > 1e-2


def test_cfw_decode_with_colour_fix_matches_torch(release):
    """The decode stage with nets.cfw: CFW decoder (w = 0.5) fed the CFW encoder's
    features of im_lq, AdaIN against im_lq in [−1, 1], truncation to uint8."""
    _, nets, params = release
    torch.manual_seed(9)
    torch_cfw = TorchCFW(diffusers.AutoencoderKL(**VAE_TINY), rrdb_blocks=1, grow=8).eval()
    randomize_(torch_cfw, seed=10)
    weights = load_cfw(torch_cfw.ldm_state_dict(), nets.vae.config)
    nets = nets._replace(cfw=CFWAutoencoderKL(weights.config, cfw=weights.cfw))
    rng = np.random.default_rng(11)
    z = rng.standard_normal((BATCH, LR_HW[0] // 2, LR_HW[1] // 2, 4)).astype(np.float32)
    im_lq = rng.uniform(-1, 1, (BATCH, 4 * LR_HW[0], 4 * LR_HW[1], 3)).astype(np.float32)
    cfw_params = {**params, "cfw": weights.params}
    decode = lambda p, z, im: decode_image(nets, SETTINGS, p, z, im, True, True)
    got = np.asarray(_compiled(decode, cfw_params, z, im_lq)(cfw_params, z, im_lq))
    with torch.no_grad():
        im = torch.from_numpy(nhwc_to_nchw(im_lq).copy())
        _, feats = torch_cfw.encode(im)
        image = torch_cfw.decode(torch.from_numpy(nhwc_to_nchw(z).copy()) / ref.SCALE, feats,
                                 SETTINGS.fusion_weight)
        want = ref.to_uint8(ref.adain(image, im))
    diff = np.abs(got.astype(int) - want)
    print(f"\nCFW decode + AdaIN: uint8 max diff {diff.max()} ({np.count_nonzero(diff)} of "
          f"{diff.size})")
    assert diff.max() <= 1
    # The fusion layers matter.
    plain = lambda p, z, im: decode_image(nets, SETTINGS, p, z, im, False, True)
    plain_image = np.asarray(_compiled(plain, params, z, im_lq)(params, z, im_lq))
    assert np.abs(plain_image.astype(int) - want).max() > 8


@pytest.mark.slow
def test_explicit_noises_replay_the_keys(release, run):
    """`noises` = draw_noises(keys) reproduces the keys' run (the replay path). Slow: a
    second compile of the whole program (about 40 s on 2 cores)."""
    _, nets, params = release
    lr, prompt, negative = _inputs(0)
    keys = jax.random.split(jax.random.key(0), BATCH)
    schedule = respaced_schedule(STEPS)
    want = run(lr, prompt, negative, keys)
    noises = draw_noises(keys, STEPS, want.latent.shape[1:])
    args = (params, schedule, lr, prompt, negative, None, noises)
    fn = functools.partial(coser_restore, nets, SETTINGS)
    got = jax.device_get(_compiled(fn, *args)(*args))
    for name in ("latent", "reference_latent"):
        err = rel_err(getattr(got, name), getattr(want, name))
        print(f"\nexplicit noises vs keys: {name} rel_err {err:.2e}")
        # Two programs: the same draws, float32 rounding may differ.
        assert err <= 1e-5, (name, err)
