"""DAPE (RAM Swin + tagging head + LoRA) parity with a PyTorch reference, LoRA merged
vs unmerged, preprocessing, and the hard prompt.

The PyTorch reference (tests/ram_reference.py) is written from the description of
RAM/SeeSR (window attention with a relative position bias table, shifted windows
masked with -100, patch merging, mean token + tokens, Query2Label cross-attention
head), with module names equal to the RAM checkpoint's. Its LoRA is applied by
computing W + B·A/8 explicitly, independently of jaxsr.nn.lora.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from jaxsr.convert.ram import load_ram
from jaxsr.models.dape import DAPE, DAPEConfig, merge_dape_lora, ram_preprocess
from jaxsr.models.ram_head import TagHeadConfig
from jaxsr.models.swin import SwinConfig
from jaxsr.models.tags import hard_prompt, load_tag_list, load_thresholds
from jaxsr.nn.lora import LoRADense, merge_grouped_lora, merge_lora
from tests.parity import rel_err
from tests.ram_reference import (
    DEPTHS,
    HEADS,
    HIDDEN,
    IMG,
    RANK,
    WINDOW,
    apply_lora_explicitly,
    build_reference,
    lora_dict,
    ram_state,
)

ASSETS = Path(__file__).resolve().parents[1] / "jaxsr" / "assets" / "ram"


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, IMG, IMG, 3)).astype(np.float32)
    model = build_reference()
    state = ram_state(model)
    lora = lora_dict(model)
    with torch.no_grad():
        plain = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    apply_lora_explicitly(model, lora)
    with torch.no_grad():
        merged = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    return images, state, lora, plain, merged


def _nhwc_tokens(x):
    b, h, w, c = x.shape
    return np.asarray(x).reshape(b, h * w, c)


def _outputs(m, images):
    """(Swin stage outputs, soft prompt, logits) in one pass."""
    feats, stages = m.visual_encoder(images, True, True)
    embeds = m.image_proj(feats)
    return stages, embeds, m.tag_logits_from_embeds(embeds)


@functools.cache
def _forward(cfg):
    """One compiled forward per config (compiling dominates these tests' time)."""
    return jax.jit(lambda params, images: DAPE(cfg).apply({"params": params}, images,
                                                          method=_outputs))


# ------------------------------------------------------------------------ parity
def test_plain_ram_matches_torch_stage_by_stage(case):
    images, state, _, (stages, embeds, logits), _ = case
    cfg, params = load_ram(state, None)   # img size read from the attn_mask buffer
    assert cfg.swin.img_size == IMG and cfg.swin.window_size == WINDOW
    assert cfg.swin.depths == DEPTHS and cfg.swin.num_heads == HEADS and cfg.lora_rank == 0
    got_stages, got_embeds, got_logits = _forward(cfg)(params, images)
    errs = [rel_err(_nhwc_tokens(g), w.numpy()) for g, w in zip(got_stages, stages)]
    errs += [rel_err(got_embeds, embeds.numpy()), rel_err(got_logits, logits.numpy())]
    print("plain RAM rel errs (stages 0-3, soft prompt, logits):", errs)
    assert max(errs) <= 1e-5


def test_merged_lora_matches_torch_explicit_merge(case):
    images, state, lora, _, (stages, embeds, logits) = case
    cfg, params = load_ram(state, lora)
    got_stages, got_embeds, got_logits = _forward(cfg)(params, images)
    errs = [rel_err(_nhwc_tokens(g), w.numpy()) for g, w in zip(got_stages, stages)]
    errs += [rel_err(got_embeds, embeds.numpy()), rel_err(got_logits, logits.numpy())]
    print("merged DAPE rel errs (stages 0-3, soft prompt, logits):", errs)
    assert max(errs) <= 1e-5
    # The LoRA changes the outputs by far more than the tolerance (so it is tested).
    assert rel_err(got_embeds, case[3][1].numpy()) > 1e-3
    assert rel_err(got_logits, case[3][2].numpy()) > 1e-3


def test_unmerged_lora_equals_merged(case):
    images, state, lora, _, _ = case
    cfg_m, merged = load_ram(state, lora)
    cfg_u, unmerged = load_ram(state, lora, merge=False)
    assert cfg_u.lora_rank == RANK and cfg_m.lora_rank == 0
    flat = traverse_util.flatten_dict(unmerged)
    assert ("visual_encoder", "layers_0", "blocks_1", "attn", "qkv", "lora_A") in flat
    assert flat[("tagging_head", "encoder", "layer_1", "crossattention", "self", "key",
                 "lora_B")].shape == (HIDDEN, RANK)
    out_m = _forward(cfg_m)(merged, images)[1:]
    out_u = _forward(cfg_u)(unmerged, images)[1:]
    errs = [rel_err(u, m) for u, m in zip(out_u, out_m)]
    cfg_f, folded = merge_dape_lora(unmerged, cfg_u)
    assert cfg_f == cfg_m
    fm, ff = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(folded)
    assert fm.keys() == ff.keys()
    errs.append(max(rel_err(ff[k], fm[k]) for k in fm))
    print("unmerged vs merged rel errs (soft prompt, logits, params):", errs)
    assert max(errs) <= 1e-5


def test_fresh_lora_starts_as_plain_ram(case):
    images, state, _, _, _ = case
    cfg_p, plain = load_ram(state, None)
    cfg_t, train = load_ram(state, None, merge=False)
    assert cfg_t.lora_rank == RANK
    assert np.abs(traverse_util.flatten_dict(train)[
        ("visual_encoder", "layers_0", "blocks_0", "attn", "qkv", "lora_A")]).max() > 0
    out_p = _forward(cfg_p)(plain, images)[1:]
    out_t = _forward(cfg_t)(train, images)[1:]
    assert max(rel_err(t, p) for t, p in zip(out_t, out_p)) <= 1e-6


@pytest.mark.parametrize("groups", [(True,), (True, False, True)])
def test_lora_dense_unmerged_equals_merged(groups):
    rng = np.random.default_rng(0)
    n_in, rows, r = 12, 10, 4
    out = rows * len(groups)
    layer = LoRADense(out, lora_rank=r, lora_alpha=2.0, lora_groups=groups)
    x = rng.standard_normal((3, 5, n_in)).astype(np.float32)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    params = {k: rng.standard_normal(v.shape).astype(np.float32)
              for k, v in traverse_util.flatten_dict(shapes).items()}
    assert params[("lora_B",)].shape == (rows * sum(groups), r)
    assert params[("lora_A",)].shape == (r * sum(groups), n_in)
    unmerged = layer.apply({"params": traverse_util.unflatten_dict(params)}, x)
    w = np.asarray(params[("kernel",)]).T
    a, b = np.asarray(params[("lora_A",)]), params[("lora_B",)]
    merged_w = (merge_grouped_lora(w, a, b, 2.0 / r, groups) if len(groups) > 1
                else merge_lora(w, a, b, 2.0 / r))
    # Independent expectation of the merged weight: per enabled group, rows += B_j A_j·s.
    want_w, j = w.copy(), 0
    for g, enabled in enumerate(groups):
        if enabled:
            want_w[g * rows:(g + 1) * rows] += (b[j * rows:(j + 1) * rows]
                                                @ a[j * r:(j + 1) * r]) * (2.0 / r)
            j += 1
    assert rel_err(merged_w, want_w) <= 1e-6
    plain = LoRADense(out)
    merged = plain.apply({"params": {"kernel": merged_w.T, "bias": params[("bias",)]}}, x)
    err = rel_err(unmerged, merged)
    print(f"LoRADense groups={groups}: unmerged vs merged rel err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(unmerged, plain.apply({"params": {"kernel": w.T, "bias": params[("bias",)]}},
                                         x)) > 1e-3


def test_training_mode_is_stochastic_and_seeded():
    # A 2-stage model is enough for drop-path / dropout plumbing (and compiles fast).
    cfg = DAPEConfig(swin=SwinConfig(img_size=24, embed_dim=8, depths=(2, 2), num_heads=(1, 2),
                                     window_size=3, drop_path_rate=0.5),
                     head=TagHeadConfig(hidden_size=16, intermediate_size=32, encoder_width=8,
                                        num_hidden_layers=1),
                     num_classes=5, embed_width=8, lora_rank=2)
    model = DAPE(cfg)
    images = np.random.default_rng(0).standard_normal((2, 24, 24, 3)).astype(np.float32)
    # Random params from the shapes (model.init's RNG code is slow to compile on CPU).
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32),
        jax.eval_shape(model.init, jax.random.key(0), images)["params"])
    run = jax.jit(lambda p, x, seed: model.apply({"params": p}, x, False,
                                                 rngs={"dropout": jax.random.key(seed)}))
    a, b, c = run(params, images, 0), run(params, images, 0), run(params, images, 1)
    d = jax.jit(model.apply)({"params": params}, images)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert rel_err(a[1], c[1]) > 1e-4 and rel_err(a[0], d[0]) > 1e-4


def test_ram_preprocess_is_imagenet_normalisation():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = ((torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std).permute(0, 2, 3, 1)
    assert rel_err(ram_preprocess(jnp.asarray(x)), want.numpy()) <= 1e-6


# ----------------------------------------------------------------------- tags
def _files():
    names = (ASSETS / "ram_tag_list.txt").read_text(encoding="utf-8").split("\n")
    thresholds = [float(s) for s in (ASSETS / "ram_tag_list_threshold.txt").read_text().split()]
    return names, thresholds


def _direct(logits, names, thresholds):
    """sigmoid in float64 rounded to float32 > float32(threshold), tag-list order."""
    out = []
    for row in logits:
        picked = []
        for c, (z, t) in enumerate(zip(row, thresholds)):
            p = np.float32(1.0 / (1.0 + np.exp(-np.float64(z)))) if z > -700 else np.float32(0)
            if p > np.float32(t):
                picked.append(names[c])
        out.append(", ".join(picked))
    return out


def test_tag_files_load():
    names, thresholds = _files()
    assert load_tag_list() == names and len(names) == 4585
    np.testing.assert_array_equal(load_thresholds(), np.asarray(thresholds, np.float32))


def test_hard_prompt_matches_direct_computation():
    names, thresholds = _files()
    tags, th = load_tag_list(), load_thresholds()
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (3, len(names))).astype(np.float32)
    # Logits right at and just above each class's threshold (in logit space).
    t64 = np.asarray(thresholds, np.float64).clip(1e-6, 1 - 1e-7)
    at = np.log(t64 / (1 - t64)).astype(np.float32)
    logits[1] = at
    logits[2] = np.nextafter(at, np.float32(np.inf))
    got = hard_prompt(logits, tags, th)
    assert got == _direct(logits, names, thresholds)
    assert got[0] and ", " in got[0]
    # Away from float32 ties the original's float32 torch computation agrees.
    fired = torch.sigmoid(torch.from_numpy(logits[:1])) > torch.tensor(thresholds)
    assert got[0] == ", ".join(n for n, f in zip(names, fired[0].tolist()) if f)


def test_threshold_one_never_fires():
    names, thresholds = _files()
    ones = [i for i, t in enumerate(thresholds) if t == 1.0]
    assert len(ones) == 10
    logits = np.full((2, len(names)), -50.0, np.float32)
    logits[0, ones] = 100.0
    logits[1, ones] = 1e30
    assert not torch.sigmoid(torch.tensor(100.0)) > 1.0   # the original cannot fire them
    assert hard_prompt(logits, load_tag_list(), load_thresholds()) == ["", ""]
    logits[0, 0] = 100.0  # an ordinary class does fire
    assert hard_prompt(logits, load_tag_list(), load_thresholds())[0] == names[0]
