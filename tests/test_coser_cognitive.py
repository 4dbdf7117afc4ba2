"""CoSeR's cognitive encoder (MSRResNet -> CLIP ViT-H/14 tokens -> Q-Former): parity
with PyTorch references on random weights (tiny configs, float32), strict conversion,
and the full-size parameter trees against the checkpoint listing.

References (tests/coser_cognitive_reference.py): MSRResNet and the open_clip vision
tower written from coser_reference.md with torch.nn modules (nn.MultiheadAttention
for the real in_proj naming); the Q-Former is transformers' Blip2QFormerModel, whose
state dict is renamed to CoSeR's LAVIS names and then goes through our converter.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from jaxsr.convert.coser_cognitive import (
    OPEN_CLIP_VISUAL_PREFIX,
    PRE_SR_PREFIX,
    QFORMER_PREFIX,
    VISUAL_PREFIX,
    cognitive_keys,
    load_clip_vision,
    load_cognitive,
    load_qformer,
    load_srresnet,
)
from jaxsr.convert.tree import ConversionError
from jaxsr.models import clip_vision, qformer, srresnet
from jaxsr.models.clip_vision import CLIPVisionTower, clip_preprocess
from jaxsr.models.cognitive import COSER_COGNITIVE, TINY_COGNITIVE, CognitiveEncoder
from jaxsr.models.qformer import BertSelfAttention, QFormer, trainable_mask
from jaxsr.models.srresnet import MSRResNet, pixel_shuffle
from tests.coser_cognitive_reference import (
    TorchMSRResNet,
    TorchVisionTower,
    blip2_qformer,
    blip2_to_coser,
    perturb_,
    torch_clip_preprocess,
)
from tests.keylists import read_listing
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state

TINY = TINY_COGNITIVE
BATCH, LR_SIZE, IMAGE_TOKENS = 2, 16, 10


@functools.cache
def _forward(kind: str, cfg, deterministic: bool = True):
    """One compiled forward per (part, config, mode), shared by the tests."""
    if kind == "sr":
        return jax.jit(MSRResNet(cfg).apply)
    if kind == "vision":
        return jax.jit(CLIPVisionTower(cfg).apply)
    if kind == "qformer":
        model = QFormer(cfg)
        return jax.jit(lambda p, x, key: model.apply(
            p, x, deterministic=deterministic, rngs={"dropout": key}))
    return jax.jit(CognitiveEncoder(cfg).apply)


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def torch_parts():
    """The three tiny torch references (seeded, perturbed) and the query tokens."""
    torch.manual_seed(0)
    sr = perturb_(TorchMSRResNet(TINY.srresnet), 1, 0.01).eval()
    tower = perturb_(TorchVisionTower(TINY.vision), 2).eval()
    qf = perturb_(blip2_qformer(TINY.qformer), 3).eval()
    q = TINY.qformer
    query_tokens = np.random.default_rng(4).normal(
        size=(1, q.num_query_tokens, q.hidden_size)).astype(np.float32)
    return sr, tower, qf, query_tokens


@pytest.fixture(scope="module")
def coser_state(torch_parts):
    """A CoSeR-layout state dict of the three references, plus keys of other parts
    (text tower, UNet, schedule) that this converter must leave alone."""
    sr, tower, qf, query_tokens = torch_parts
    state = {
        **_prefixed(PRE_SR_PREFIX, torch_state(sr)),
        **_prefixed(VISUAL_PREFIX, torch_state(tower)),
        **blip2_to_coser(torch_state(qf), TINY.qformer, query_tokens,
                         np.random.default_rng(5)),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight":
            np.zeros((96, 32), np.float32),
        "cond_stage_model.model.token_embedding.weight": np.zeros((10, 32), np.float32),
        "model.diffusion_model.out.2.weight": np.zeros((4, 320, 3, 3), np.float32),
        "betas": np.zeros(1000, np.float32),
    }
    return state


@pytest.fixture(scope="module")
def params(coser_state):
    return load_cognitive(coser_state, TINY)


def _lr(seed=0):
    return np.random.default_rng(seed).uniform(size=(BATCH, LR_SIZE, LR_SIZE, 3)).astype(
        np.float32)


# ----------------------------------------------------------------------- MSRResNet


def test_pixel_shuffle_matches_torch():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 12)).astype(np.float32)
    want = torch.nn.PixelShuffle(2)(torch.from_numpy(nhwc_to_nchw(x))).numpy()
    np.testing.assert_array_equal(pixel_shuffle(jnp.asarray(x), 2), nchw_to_nhwc(want))


def test_srresnet_matches_torch(torch_parts, params):
    sr, *_ = torch_parts
    lr = _lr()
    with torch.no_grad():
        want = nchw_to_nhwc(sr(torch.from_numpy(nhwc_to_nchw(lr))).numpy())
    got = _forward("sr", TINY.srresnet)({"params": params["pre_sr_model"]}, lr)
    assert got.shape == (BATCH, 4 * LR_SIZE, 4 * LR_SIZE, 3)
    err = rel_err(got, want)
    print(f"MSRResNet rel err {err:.2e}")
    assert err <= 1e-5


# -------------------------------------------------------------------- vision tower


@pytest.mark.parametrize("in_size,out_size", [(64, 42), (512, 224)])
def test_clip_preprocess_matches_torch(in_size, out_size):
    """Bicubic (a = -0.75, no antialias) + CLIP normalisation, on values a little
    outside [0, 1] as the unclamped SRResNet gives them; 512 -> 224 is CoSeR's size."""
    x = np.random.default_rng(in_size).uniform(-0.1, 1.1, (1, in_size, in_size, 3))
    x = x.astype(np.float32)
    want = torch_clip_preprocess(torch.from_numpy(nhwc_to_nchw(x)), out_size).numpy()
    cfg = clip_vision.CLIPVisionConfig(image_size=out_size, patch_size=14, width=32,
                                       layers=1, heads=4, mlp_dim=64, output_dim=24)
    err = rel_err(clip_preprocess(x, cfg), nchw_to_nhwc(want))
    print(f"clip_preprocess {in_size}->{out_size} rel err {err:.2e}")
    assert err <= 1e-6


def test_vision_tokens_match_torch(torch_parts, params):
    _, tower, _, _ = torch_parts
    cfg = TINY.vision
    pixels = np.random.default_rng(1).normal(size=(BATCH, cfg.image_size, cfg.image_size, 3))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        want = tower.coser_tokens(torch.from_numpy(nhwc_to_nchw(pixels))).numpy()
    visual = params["visual"]
    got = _forward("vision", cfg)({"params": visual}, pixels)
    assert got.shape == (BATCH, cfg.num_tokens, cfg.output_dim)
    err = rel_err(got, want)
    print(f"CLIP vision tokens rel err {err:.2e}")
    assert err <= 1e-5
    # ln_post is converted (strictness) but never touches the tokens.
    np.testing.assert_array_equal(visual["ln_post"]["scale"], tower.ln_post.weight.detach())
    scrambled = {**visual, "ln_post": {"scale": visual["ln_post"]["scale"] * 3 + 1,
                                       "bias": visual["ln_post"]["bias"] - 2}}
    np.testing.assert_array_equal(_forward("vision", cfg)({"params": scrambled}, pixels), got)


# ------------------------------------------------------------------------ Q-Former


def _image_tokens(seed=2):
    return np.random.default_rng(seed).normal(
        size=(BATCH, IMAGE_TOKENS, TINY.qformer.encoder_width)).astype(np.float32)


def test_qformer_matches_transformers_blip2(torch_parts, params):
    """Blip2QFormerModel gets the query tokens expanded to the batch (as BLIP-2 does);
    ours keeps them a batch of one until the first cross-attention (as CoSeR does):
    equal in eval mode."""
    _, _, qf, query_tokens = torch_parts
    tokens = _image_tokens()
    with torch.no_grad():
        queries = torch.from_numpy(query_tokens).expand(BATCH, -1, -1)
        want = qf(query_embeds=queries,
                  encoder_hidden_states=torch.from_numpy(tokens)).last_hidden_state.numpy()
    got = _forward("qformer", TINY.qformer)(
        {"params": params["global_adapter"]}, tokens, jax.random.key(0))
    assert got.shape == (BATCH, TINY.qformer.num_query_tokens, TINY.qformer.hidden_size)
    err = rel_err(got, want)
    print(f"Q-Former rel err {err:.2e}")
    assert err <= 1e-5


def test_qformer_attention_dropout_path():
    """Train mode computes attention by einsum so that the probabilities can be
    dropped; with a rate that keeps everything (1e-9 rounds the keep probability and
    the rescale to 1 in float32) it equals the eval-mode attention backend."""
    cfg = dataclasses.replace(TINY.qformer, attention_probs_dropout_prob=1e-9)
    layer = BertSelfAttention(cfg)
    x = np.random.default_rng(0).normal(size=(BATCH, 6, cfg.hidden_size)).astype(np.float32)
    tokens = _image_tokens()
    variables = layer.init(jax.random.key(0), x, tokens)
    key = jax.random.key(1, impl="rbg")
    train = layer.apply(variables, x, tokens, False, rngs={"dropout": key})
    assert rel_err(train, layer.apply(variables, x, tokens, True)) <= 1e-6


def test_qformer_dropout_smoke(params):
    """Smoke test of train mode (CoSeR's rate 0.1, two layers to keep the compile
    short; rbg keys compile several times faster than threefry on CPU): dropout
    changes E with the key, reproducibly for one key."""
    cfg = dataclasses.replace(TINY.qformer, num_hidden_layers=2)
    tree = params["global_adapter"]
    p = {"params": {**tree, "Qformer": {**tree["Qformer"], "encoder": {
        k: v for k, v in tree["Qformer"]["encoder"].items() if k in ("layer_0", "layer_1")}}}}
    tokens = _image_tokens()
    train = _forward("qformer", cfg, False)
    key = lambda seed: jax.random.key(seed, impl="rbg")
    a, b = train(p, tokens, key(1)), train(p, tokens, key(1))
    np.testing.assert_array_equal(a, b)
    assert rel_err(train(p, tokens, key(2)), a) > 1e-2


def test_qformer_trainable_mask(params):
    """Word/position embeddings and the text FFN are present but never used."""
    flat = traverse_util.flatten_dict(params["global_adapter"])
    mask = traverse_util.flatten_dict(trainable_mask(params["global_adapter"]))
    unused = sorted("/".join(k[:-1]) for k, used in mask.items() if not used)
    q = TINY.qformer
    layers = [f"Qformer/encoder/layer_{i}/{m}" for i in range(q.num_hidden_layers)
              for m in ("intermediate/dense", "output/LayerNorm", "output/dense")]
    want = ["Qformer/embeddings/position_embeddings", "Qformer/embeddings/word_embeddings"]
    assert sorted(set(unused)) == sorted(want + layers)
    assert mask.keys() == flat.keys()


# ---------------------------------------------------------------- whole encoder


def test_cognitive_encoder_matches_torch_chain(torch_parts, params):
    """lr -> SRResNet -> bicubic 224-style resize + CLIP norm -> tokens @ proj -> Q-Former."""
    sr, tower, qf, query_tokens = torch_parts
    lr = _lr(3)
    with torch.no_grad():
        image = sr(torch.from_numpy(nhwc_to_nchw(lr)))
        tokens = tower.coser_tokens(torch_clip_preprocess(image, TINY.vision.image_size))
        queries = torch.from_numpy(query_tokens).expand(BATCH, -1, -1)
        want = qf(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state.numpy()
    got = _forward("cognitive", TINY)({"params": params}, lr)
    err = rel_err(got, want)
    print(f"cognitive encoder E rel err {err:.2e}")
    assert err <= 1e-5


# -------------------------------------------------------------------- conversion


def test_conversion_reads_only_its_prefixes(coser_state, params):
    owned = cognitive_keys(coser_state)
    assert not any(k.startswith(("cond_stage_model.model.transformer", "betas", "model."))
                   for k in owned)
    assert set(params) == {"pre_sr_model", "visual", "global_adapter"}


def test_vision_tower_from_open_clip_layout(coser_state, params):
    """Without `cond_stage_model.model.visual.*` keys the tower comes from open_clip's
    own `visual.*` file; the result is the same tree."""
    without = {k: v for k, v in coser_state.items() if not k.startswith(VISUAL_PREFIX)}
    open_clip = {OPEN_CLIP_VISUAL_PREFIX + k[len(VISUAL_PREFIX):]: v
                 for k, v in coser_state.items() if k.startswith(VISUAL_PREFIX)}
    open_clip["transformer.resblocks.0.ln_1.weight"] = np.ones(32, np.float32)  # text tower
    got = traverse_util.flatten_dict(load_cognitive(without, TINY, visual_state=open_clip))
    for path, value in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))
    with pytest.raises(ConversionError, match=r"cond_stage_model\.model\.visual\.conv1\.weight"):
        load_cognitive(without, TINY)


def test_conversion_is_strict(coser_state):
    layer1 = QFORMER_PREFIX + "Qformer.encoder.layer.1."
    missing = dict(coser_state)
    del missing[layer1 + "output_query.dense.bias"]
    with pytest.raises(ConversionError, match=r"global_adapter\.Qformer\.encoder\.layer\.1\."
                                              r"output_query\.dense\.bias"):
        load_cognitive(missing, TINY)
    # layer 1 has no cross-attention (frequency 2)
    extra = {**coser_state, layer1 + "crossattention.self.query.bias": np.zeros(32, np.float32)}
    with pytest.raises(ConversionError, match=r"layer\.1\.crossattention\.self\.query\.bias"):
        load_cognitive(extra, TINY)
    bad = {**coser_state, VISUAL_PREFIX + "proj": np.zeros((32, 25), np.float32)}
    with pytest.raises(ConversionError, match=r"visual\.proj: \[32, 25\] vs \[32, 24\]"):
        load_cognitive(bad, TINY)
    # open_clip's ln_1 / ln_2 are module names, not list items
    no_ln = dict(coser_state)
    del no_ln[VISUAL_PREFIX + "transformer.resblocks.1.ln_2.bias"]
    with pytest.raises(ConversionError) as info:
        load_cognitive(no_ln, TINY)
    assert info.value.missing == [VISUAL_PREFIX + "transformer.resblocks.1.ln_2.bias"]
    # problems in several parts come back as one error naming all of them
    both = {**missing, PRE_SR_PREFIX + "body.2.conv1.weight": np.zeros((8, 8, 3, 3))}
    with pytest.raises(ConversionError) as info:
        load_cognitive(both, TINY)
    assert info.value.missing == [layer1 + "output_query.dense.bias"]
    assert info.value.unexpected == [PRE_SR_PREFIX + "body.2.conv1.weight"]


# --------------------------------------------------------------------- full size


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_full_size_param_counts():
    """coser_reference.md: MSRResNet 1.52M, Q-Former 258.6M of which ~151M used;
    ViT-H/14's vision tower is open_clip's 632.1M. eval_shape: nothing allocated."""
    assert _count(srresnet.param_shapes(COSER_COGNITIVE.srresnet)) == 1_517_571
    assert _count(clip_vision.param_shapes(COSER_COGNITIVE.vision)) == 632_076_800
    shapes = qformer.param_shapes(COSER_COGNITIVE.qformer)
    assert _count(shapes) == 258_582_528
    used = jax.tree_util.tree_map(lambda s, m: s if m else None, shapes, trainable_mask(shapes))
    assert _count(used) == 151_232_512


def _zeros(shape):
    """A read-only zero array of `shape` that owns one float: full-size conversion
    without memory."""
    return np.broadcast_to(np.zeros((), np.float32), shape)


def test_full_size_qformer_listing_converts():
    """Every entry of CoSeR's global_adapter listing fills our full-size tree (and the
    other way round); position_ids is the one documented skip."""
    listing = read_listing("coser_qformer.tsv")
    assert len(listing) == 330
    params = load_qformer({k: _zeros(s) for k, s in listing.items()})
    floats = {k: s for k, s in listing.items() if not k.endswith("position_ids")}
    assert sum(int(np.prod(s)) for s in floats.values()) == _count(params) == 258_582_528


def test_full_size_srresnet_and_vision_names():
    """The torch references at full size (meta device, no memory) convert strictly."""
    with torch.device("meta"):
        sr = TorchMSRResNet(COSER_COGNITIVE.srresnet)
        tower = TorchVisionTower(COSER_COGNITIVE.vision)
    sr_state = {PRE_SR_PREFIX + k: _zeros(v.shape) for k, v in sr.state_dict().items()}
    visual_state = {VISUAL_PREFIX + k: _zeros(v.shape) for k, v in tower.state_dict().items()}
    assert _count(load_srresnet(sr_state)) == 1_517_571
    visual = load_clip_vision(visual_state)
    assert _count(visual) == 632_076_800
    block = visual["transformer"]["resblocks_31"]["attn"]
    assert block["in_proj_weight"].shape == (3 * 1280, 1280)
    assert block["out_proj"]["kernel"].shape == (1280, 1280)
    assert visual["proj"].shape == (1280, 1024)
