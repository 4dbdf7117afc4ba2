"""CoSeR's AiA UNet and ControlNet against the PyTorch reference in
tests/coser_reference.py (tiny configs, random weights with non-zero zero convs,
float32), converted through jaxsr.convert.coser_unet from LDM-named state dicts;
plus the argmax rule, the "paper" reference attention, strict conversion against
the full-size key listings, and the stage-2 initialisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from jaxsr.convert import coser_unet as convert
from jaxsr.convert.coser_init import aia_unet_params_from_sd, controlnet_params_from_sd
from jaxsr.convert.networks import load_unet
from jaxsr.convert.tree import ConversionError
from jaxsr.models.aia import AiATransformer2D
from jaxsr.models.coser_controlnet import CoSeRControlNet, CoSeRControlNetConfig
from jaxsr.models.coser_unet import (
    CoSeRUNet,
    CoSeRUNetConfig,
    control_feature_shapes,
    coser_context,
)
from jaxsr.models.unet import UNetConfig
from jaxsr.nn.hard_attention import argmax_attention
from tests import coser_reference as ref_lib
from tests.keylists import read_listing
from tests.parity import FAST_COMPILE, nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state
from tests.test_unet import TINY, randomize_

U, CN = convert.UNET_PREFIX, convert.CONTROLNET_PREFIX
BASE = UNetConfig.from_diffusers_config(TINY)
UCFG, CCFG = CoSeRUNetConfig(base=BASE), CoSeRControlNetConfig(base=BASE)


@pytest.fixture(scope="module")
def torch_models():
    torch.manual_seed(0)
    unet = ref_lib.aia_unet(TINY).eval()
    cn = ref_lib.CoSeRControlNetRef(TINY).eval()
    # Torch default init (not zero) for every zero conv, plus noise on everything.
    randomize_(unet, seed=1)
    randomize_(cn, seed=2)
    return unet, cn


@pytest.fixture(scope="module")
def ldm_states(torch_models):
    unet, cn = torch_models
    return ref_lib.ldm_state(torch_state(unet), U), ref_lib.ldm_state(torch_state(cn), CN)


@pytest.fixture(scope="module")
def params(ldm_states):
    return convert.convert_aia_unet(ldm_states[0], UCFG), convert.convert_controlnet(
        ldm_states[1], CCFG)


def _inputs(seed=0, batch=2, size=16):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    x = f32(batch, 4, size, size)
    t = np.array([981, 3][:batch])
    ctx = np.array(coser_context(f32(batch, 5, 24), f32(batch, 4, 24)))     # [prompt; E]
    shapes = control_feature_shapes(BASE, batch, size, size)
    lr = [f32(b, c, h, w) for b, h, w, c in shapes]
    ref = [f32(b, c, h, w) for b, h, w, c in shapes]
    return x, t, ctx, lr, ref


_COMPILED: dict = {}


def _run(name, fn, *args):
    """fn(*args), compiled once per `name` (every call under one name has the same
    shapes) with the fast-compile options."""
    if name not in _COMPILED:
        _COMPILED[name] = jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)
    return _COMPILED[name](*args)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jax_unet(p, x, t, ctx, lr=None, ref=None):
    model = CoSeRUNet(UCFG)
    if lr is None:
        out = _run("unet_gen", model.apply, {"params": p}, nchw_to_nhwc(x), t, ctx)
    else:
        out = _run("unet_sr", model.apply, {"params": p}, nchw_to_nhwc(x), t, ctx,
                   [nchw_to_nhwc(f) for f in lr], [nchw_to_nhwc(f) for f in ref])
    return nhwc_to_nchw(out)


def _torch_unet(unet, x, t, ctx, lr=None, ref=None):
    tt = lambda a: torch.from_numpy(np.array(a))
    with torch.no_grad():
        return ref_lib.aia_unet_forward(
            unet, tt(x), tt(t), tt(ctx), None if lr is None else [tt(f) for f in lr],
            None if ref is None else [tt(f) for f in ref]).numpy()


def test_aia_unet_matches_reference(torch_models, params):
    x, t, ctx, lr, ref = _inputs()
    want = _torch_unet(torch_models[0], x, t, ctx, lr, ref)
    got = _jax_unet(params[0], x, t, ctx, lr, ref)
    err = rel_err(got, want)
    print(f"AiA UNet rel_err {err:.2e}")
    assert err <= 1e-5


def test_gen_mode_matches_reference_and_aia_branches_matter(torch_models, params):
    x, t, ctx, lr, ref = _inputs(1)
    want = _torch_unet(torch_models[0], x, t, ctx)
    gen = _jax_unet(params[0], x, t, ctx)
    err = rel_err(gen, want)
    print(f"gen-mode UNet rel_err {err:.2e}")
    assert err <= 1e-5
    # The control branches change the output, and the reference features reach it.
    sr = _jax_unet(params[0], x, t, ctx, lr, ref)
    other_ref = _jax_unet(params[0], x, t, ctx, lr, [2 * f for f in ref])
    assert rel_err(sr, gen) > 1e-2
    assert rel_err(other_ref, sr) > 1e-3


def test_controlnet_lr_and_reference_in_one_batch_match_two_reference_calls(
        torch_models, params):
    x, t, ctx, _, _ = _inputs(2)
    rng = np.random.default_rng(3)
    lr_lat, ref_lat = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
    tt = torch.from_numpy
    with torch.no_grad():
        want = [torch_models[1](tt(x), tt(h), tt(t), tt(ctx)) for h in (lr_lat, ref_lat)]
    apply = functools.partial(CoSeRControlNet(CCFG).apply, method="lr_and_reference")
    got = _run("controlnet", apply, {"params": params[1]}, nchw_to_nhwc(x), t, ctx,
               nchw_to_nhwc(lr_lat), nchw_to_nhwc(ref_lat))
    errors = [rel_err(nhwc_to_nchw(g), w.numpy())
              for gs, ws in zip(got, want) for g, w in zip(gs, ws)]
    print(f"ControlNet max rel_err {max(errors):.2e} over 2 x 13 features")
    assert len(errors) == 26 and max(errors) <= 1e-5, errors


def test_argmax_takes_the_first_maximum_and_scales_by_the_raw_logit():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
    v = rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
    k[:, 1] *= 10.0
    k[:, 4] = k[:, 1]                      # keys 1 and 4 tie for every query ...
    q = np.repeat(k[:, 1:2], 3, axis=1)    # ... and are its maxima
    out = np.asarray(argmax_attention(q, k, v))
    s = np.einsum("bqhd,bqhd->bqh", q, q) / 2.0          # scale 1/sqrt(4)
    np.testing.assert_allclose(out, s[..., None] * v[:, 1:2], rtol=1e-6)
    assert not np.allclose(v[:, 1], v[:, 4])
    # torch.max(dim) picks the same one (the reference's rule)
    sim = torch.einsum("bqhd,bkhd->bhqk", torch.from_numpy(q), torch.from_numpy(k))
    assert (sim.max(dim=-1).indices == 1).all()
    # All logits negative: the chosen value is scaled by the (negative) maximum.
    q1 = np.zeros((1, 1, 1, 4), np.float32)
    q1[..., 0] = -1.0
    k1 = np.zeros((1, 2, 1, 4), np.float32)
    k1[0, :, 0, 0] = [1.0, 2.0]
    v1 = rng.standard_normal((1, 2, 1, 4)).astype(np.float32)
    np.testing.assert_allclose(argmax_attention(q1, k1, v1), -0.5 * v1[:, :1], rtol=1e-6)


def test_argmax_chunked_equals_unchunked():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 1100, 2, 4)).astype(np.float32)
    k, v = (rng.standard_normal((1, 7, 2, 4)).astype(np.float32) for _ in range(2))
    both = jax.jit(lambda q: {(sel, c): argmax_attention(q, k, v, selection=sel, chunk=c)
                              for sel in ("released", "paper") for c in (128, 2048)})(q)
    for sel in ("released", "paper"):
        np.testing.assert_allclose(both[sel, 128], both[sel, 2048], rtol=1e-6, atol=1e-6)
    # "paper" selects the value itself (one-hot forward)
    paper = np.asarray(argmax_attention(q[:, :5], k, v, selection="paper"))
    best = np.einsum("bqhd,bkhd->bqhk", q[:, :5], k).argmax(-1)
    picked = np.stack([v[0, best[0, :, h], h] for h in range(2)], axis=1)[None]
    np.testing.assert_allclose(paper, picked, rtol=1e-6)


def _random_like(tree, seed):
    """Random params (norm scales kept near 1), so that the zero convs are not zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape) + (
        np.asarray(x) if x.ndim == 1 else 0)).astype(np.float32), tree)


@pytest.mark.parametrize("mode", ["released", "paper"])
def test_reference_attention_gradients(mode):
    """'paper' projects the reference tokens (proj_in_cref_lna) and trains every key
    through the straight-through softmax; 'released' never touches proj_in_cref_lna."""
    rng = np.random.default_rng(6)
    h, lr, ref = (jnp.asarray(rng.standard_normal((1, 4, 4, 16)), jnp.float32)
                  for _ in range(3))
    ctx = jnp.asarray(rng.standard_normal((1, 5, 24)), jnp.float32)
    model = AiATransformer2D(heads=2, head_dim=8, groups=8, reference_attention=mode)
    p = _random_like(jax.jit(model.init)(jax.random.key(0), h, ctx, lr, ref)["params"], 7)
    loss = lambda p, r: jnp.sum(jnp.sin(model.apply({"params": p}, h, ctx, lr, r)))
    gp, gref = _run(f"grad_{mode}", jax.grad(loss, argnums=(0, 1)), p, ref)
    norm = lambda t: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))
    assert norm(gref) > 0
    assert norm(gp["transformer_blocks_0"]["attn4_ref_lna"]["to_k"]) > 0
    cref = norm(gp["proj_in_cref_lna"])
    assert cref > 0 if mode == "paper" else cref == 0
    if mode == "paper":
        released = AiATransformer2D(heads=2, head_dim=8, groups=8)
        both = jax.jit(lambda p: (model.apply({"params": p}, h, ctx, lr, ref),
                                  released.apply({"params": p}, h, ctx, lr, ref)))
        assert rel_err(*both(p)) > 1e-3


# --- conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("listing, fn, prefix, count", [
    ("coser_unet.tsv", convert.convert_aia_unet, U, 981_533_764),
    ("coser_cn.tsv", convert.convert_controlnet, CN, 344_121_280)])
def test_full_size_listing_converts_exactly(listing, fn, prefix, count):
    """Every key of the CoSeR checkpoint listing maps, at full size, without memory
    (zero-stride views); error names invert to the same keys."""
    shapes = read_listing(listing)
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    out = fn(state)
    leaves = jax.tree.leaves(out)
    assert len(leaves) == len(shapes)
    assert sum(x.size for x in leaves) == sum(int(np.prod(s)) for s in shapes.values()) == count
    rename = convert.aia_unet_key if prefix == U else convert.controlnet_key
    assert all(prefix + convert.ldm_key(rename(k[len(prefix):])) == k for k in shapes)


@pytest.mark.parametrize("which", ["unet", "controlnet"])
def test_conversion_names_missing_extra_and_misshaped_keys(ldm_states, which):
    state = dict(ldm_states[0] if which == "unet" else ldm_states[1])
    fn = convert.convert_aia_unet if which == "unet" else convert.convert_controlnet
    cfg = UCFG if which == "unet" else CCFG
    if which == "unet":
        gone = U + "output_blocks.5.1.dubconv_lna.weight"
        bent = U + "middle_block.1.transformer_blocks.0.attn4_ref_lna.to_k.weight"
        extra = U + "output_blocks.4.1.proj_in_cref_lna2.weight"
    else:
        gone = CN + "zero_convs.11.0.bias"
        bent = CN + "hint_zero_conv.weight"
        extra = CN + "input_blocks.4.1.norm.weight"
    state.pop(gone)
    state[bent] = state[bent][..., :1]
    state[extra] = np.zeros(3, np.float32)
    state["first_stage_model.decoder.conv_in.weight"] = np.zeros(3)   # other modules: ignored
    with pytest.raises(ConversionError) as info:
        fn(state, cfg)
    err = info.value
    assert err.missing == [gone] and err.unexpected == [extra]
    assert len(err.mismatched) == 1 and err.mismatched[0].startswith(bent + ": ")
    with pytest.raises(ValueError, match="no "):
        fn({"first_stage_model.x": np.zeros(1)}, cfg)


# --- stage-2 initialisation ---------------------------------------------------------------


def test_stage2_init_copies_sd_and_starts_as_sd(torch_models, params):
    """At stage-2 init the zero convs silence both AiA branches: the AiA UNet equals
    its own gen mode (the SD UNet with CoSeR's context), and the ControlNet is zero."""
    import diffusers

    torch.manual_seed(8)
    sd = diffusers.UNet2DConditionModel(**TINY).eval()
    randomize_(sd, seed=9)
    sd_params = load_unet(torch_state(sd), BASE)
    p = aia_unet_params_from_sd(sd_params, UCFG, jax.random.key(1))
    flat = traverse_util.flatten_dict(p, sep="/")
    sdf = traverse_util.flatten_dict(sd_params, sep="/")
    blk = "up_blocks_1/attentions_2/"
    for new, old in (("transformer_blocks_0/attn3_lr_lna/to_q/kernel",
                      "transformer_blocks_0/attn1/to_q/kernel"),
                     ("transformer_blocks_0/attn4_ref_lna/to_out_0/bias",
                      "transformer_blocks_0/attn1/to_out_0/bias"),
                     ("transformer_blocks_0/norm4_lna/scale", "transformer_blocks_0/norm1/scale"),
                     ("norm_cref_lna/bias", "norm/bias"), ("proj_in_clr_lna/kernel",
                                                           "proj_in/kernel")):
        np.testing.assert_array_equal(flat[blk + new], sdf[blk + old])
    assert not np.any(flat[blk + "transformer_blocks_0/zero_conv_r_lna/kernel"])
    bound = 1 / np.sqrt(3 * 3 * BASE.block_out_channels[0])
    dub = np.asarray(flat["up_blocks_2/attentions_2/dubconv_lna/kernel"])
    assert 0.5 * bound < np.abs(dub).max() <= bound
    assert all(np.array_equal(flat[k], sdf[k]) for k in sdf)

    x, t, ctx, lr, ref = _inputs(10)
    err = rel_err(_jax_unet(p, x, t, ctx, lr, ref), _jax_unet(p, x, t, ctx))
    assert err <= 1e-6, err

    cp = controlnet_params_from_sd(sd_params, CCFG)
    cflat = traverse_util.flatten_dict(cp, sep="/")
    assert set(cflat) == set(traverse_util.flatten_dict(params[1], sep="/"))
    for k, v in cflat.items():
        if k.startswith(("hint_zero_conv", "controlnet_")):
            assert not np.any(v), k
        else:
            np.testing.assert_array_equal(v, sdf[k], err_msg=k)
