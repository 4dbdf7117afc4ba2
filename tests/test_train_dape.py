"""DAPE distillation: the loss and its LoRA gradients against a PyTorch computation,
the input chain against torch's resizes, per-example dropout, the exported LoRA file,
and the trainer end to end (real photos → TFDS folder → grain → on-device
degradation → sharded step → orbax), resumed, with the non-finite guard."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from configs import dape_train
from jaxsr.convert.ram import LORA_IGNORED, load_ram
from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import path_to_torch_key
from jaxsr.models.dape import DAPE, DAPEConfig, ram_preprocess
from jaxsr.nn.resize import torch_resize_bicubic
from jaxsr.train.dape_objective import (
    DAPETrainNets,
    binary_cross_entropy,
    distillation_inputs,
    distillation_loss,
    join_lora,
    split_lora,
    student_forward,
)
from jaxsr.train.dape_trainer import LORA_FILE, export_dape_lora, fresh_lora, lora_state_dict
from jaxsr.train.seesr_objective import quantize8
from tests.keylists import read_listing
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err
from tests.ram_reference import IMG, RANK, build_reference, ram_state


def _no_dropout(cfg: DAPEConfig) -> DAPEConfig:
    return dataclasses.replace(
        cfg, swin=dataclasses.replace(cfg.swin, drop_path_rate=0.0),
        head=dataclasses.replace(cfg.head, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0))


def _nets(cfg):
    return DAPETrainNets(student=DAPE(cfg), teacher=DAPE(dataclasses.replace(cfg, lora_rank=0)))


@pytest.fixture(scope="module")
def ram():
    """(torch reference RAM, its state, student config, frozen params, trained-like LoRA)."""
    model = build_reference(0)
    state = ram_state(model)
    cfg, params = load_ram(state, None, merge=False)
    frozen, lora = split_lora(params)
    rng = np.random.default_rng(5)   # non-zero B, as after training, so A gets gradients
    lora = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), lora)
    return model, state, cfg, frozen, lora


def _torch_student_weights(model, lora_t):
    """W + ΔW per adapted module, written out: q/v rows of qkv += B_j A_j / 8; head
    query/key += B A / 8 (r = 8, alpha = 1)."""
    params = dict(model.named_parameters())
    out = {}
    for module, (a, b) in lora_t.items():
        w = params[f"{module}.weight"]
        if module.endswith("attn.qkv"):
            d = w.shape[1]
            delta = torch.cat([b[:d] @ a[:RANK], torch.zeros(d, d), b[d:] @ a[RANK:]]) / 8
        else:
            delta = b @ a / 8
        out[f"{module}.weight"] = w + delta
    return out


def test_distillation_loss_and_lora_gradients_match_torch(ram):
    model, _, cfg, frozen, lora = ram
    cfg = _no_dropout(cfg)          # dropout off on both sides, so the draws match
    nets = _nets(cfg)
    rng = np.random.default_rng(0)
    lq, gt = (rng.standard_normal((2, IMG, IMG, 3)).astype(np.float32) for _ in range(2))
    keys = jax.random.split(jax.random.key(0), 2)

    def loss(lora):
        t_embeds, t_logits = nets.teacher.apply({"params": frozen}, gt)
        return distillation_loss(*student_forward(nets, lora, frozen, lq, keys),
                                 t_embeds, t_logits)

    (value, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

    flat = traverse_util.flatten_dict(lora)
    lora_t = {path_to_torch_key(p[:-1]): (
        torch.tensor(np.asarray(flat[p[:-1] + ("lora_A",)]), requires_grad=True),
        torch.tensor(np.asarray(flat[p[:-1] + ("lora_B",)]), requires_grad=True))
        for p in flat if p[-1] == "lora_A"}
    with torch.no_grad():
        _, f_gt, l_gt = model(torch.from_numpy(nhwc_to_nchw(gt)))
    _, f_lq, l_lq = torch.func.functional_call(model, _torch_student_weights(model, lora_t),
                                               (torch.from_numpy(nhwc_to_nchw(lq)),))
    mse_t = F.mse_loss(f_lq, f_gt)
    bce_t = F.binary_cross_entropy(torch.sigmoid(l_lq), torch.sigmoid(l_gt))
    (mse_t + bce_t).backward()

    errs = {"loss": rel_err(value, (mse_t + bce_t).item()), "mse": rel_err(parts["mse"],
            mse_t.item()), "bce": rel_err(parts["bce"], bce_t.item())}
    gflat = traverse_util.flatten_dict(grads)
    grad_errs = []
    for module, (a, b) in lora_t.items():
        path = tuple(re.sub(r"\.(\d+)", r"_\1", module).split("."))
        grad_errs.append(rel_err(gflat[path + ("lora_A",)], a.grad.numpy()))
        grad_errs.append(rel_err(gflat[path + ("lora_B",)], b.grad.numpy()))
    print("loss parts rel err", errs, "max LoRA grad rel err", max(grad_errs),
          "over", len(grad_errs), "tensors")
    assert len(grad_errs) == 24      # 8 Swin qkv + 2 head layers × query/key, A and B
    assert max(errs.values()) <= 1e-5
    assert max(grad_errs) <= 1e-4
    # Only LoRA is trained: the loss differs from the plain RAM's, so gradients are real.
    assert all(float(jnp.abs(g).max()) > 0 for g in gflat.values())


def test_bce_equals_torch_and_stays_finite_when_saturated():
    logits = np.linspace(-15, 15, 61, dtype=np.float32)[None]
    target = np.random.default_rng(1).uniform(size=logits.shape).astype(np.float32)
    ours = float(binary_cross_entropy(jnp.asarray(logits), jnp.asarray(target)))
    # float64 torch: in float32, 1 - σ(ℓ) loses digits as σ nears 1 (log-sigmoid does not)
    want = F.binary_cross_entropy(torch.sigmoid(torch.from_numpy(logits).double()),
                                  torch.from_numpy(target).double()).item()
    assert rel_err(ours, want) <= 1e-6
    # Far past float32's sigmoid range torch clamps log(0) to -100; so does this.
    big = jnp.asarray([[-500.0, 500.0]])
    value, grad = jax.value_and_grad(binary_cross_entropy)(big, jnp.asarray([[1.0, 0.0]]))
    assert np.isfinite(float(value)) and float(value) == pytest.approx(100.0)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_inputs_follow_the_released_resize_chain():
    """sr_bicubic = bicubic ×4 of the 8-bit LR, stored as 8 bits; then both images
    bilinear (antialias off) to the tagger size and ImageNet-normalised.

    The 8-bit sr_bicubic is compared as levels: a bicubic value within float32 rounding
    of a level boundary lands on either side depending on the CPU's instruction
    selection (AVX2 vs AVX-512), so at most one level on at most 4 of its 6,144 values
    (measured: 1 on an Intel Xeon; none on the AMD EPYC where an exact comparison used
    to pass). The rest of the chain is compared
    before any rounding, from that 8-bit image, to 1e-5."""
    rng = np.random.default_rng(2)
    hr = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)

    def degrade_fn(keys, x):   # a fixed "degradation": 4x4 box average
        b, h, w, c = x.shape
        return x.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4)), x

    lq, gt = distillation_inputs(jnp.asarray(hr), jax.random.split(jax.random.key(0), 2),
                                 degrade_fn, 40)
    q8 = lambda t: torch.round(t.clamp(0, 1) * 255) / 255
    lr_t = q8(torch.from_numpy(nhwc_to_nchw(degrade_fn(None, hr)[0])))
    sr_t = q8(F.interpolate(lr_t, size=(32, 32), mode="bicubic", align_corners=False))
    ours_8bit = np.asarray(quantize8(torch_resize_bicubic(quantize8(
        jnp.asarray(degrade_fn(None, hr)[0])), (32, 32))))
    levels = np.rint(np.abs(ours_8bit - nchw_to_nhwc(sr_t.numpy())) * 255)
    assert levels.max() <= 1 and np.count_nonzero(levels) <= 4, np.count_nonzero(levels)
    to_ram = lambda t: nchw_to_nhwc(F.interpolate(t, size=(40, 40), mode="bilinear",
                                                  align_corners=False, antialias=False).numpy())
    want_lq = np.asarray(ram_preprocess(to_ram(torch.from_numpy(nhwc_to_nchw(ours_8bit).copy()))))
    want_gt = np.asarray(ram_preprocess(to_ram(q8(torch.from_numpy(nhwc_to_nchw(hr))))))
    assert rel_err(lq, want_lq) <= 1e-5 and rel_err(gt, want_gt) <= 1e-5


def test_student_dropout_is_active_and_per_example(ram):
    _, _, cfg, frozen, lora = ram
    assert cfg.swin.drop_path_rate > 0 and cfg.head.hidden_dropout_prob > 0
    nets = _nets(cfg)
    x = np.random.default_rng(3).standard_normal((2, IMG, IMG, 3)).astype(np.float32)
    k = jax.random.split(jax.random.key(1), 3)
    fwd = jax.jit(lambda images, keys: student_forward(nets, lora, frozen, images, keys))
    pair = fwd(x, k[:2])                                  # (x0, k0) beside (x1, k1)
    again = fwd(np.stack([x[0], x[0]]), k[jnp.array([0, 2])])  # (x0, k0) beside (x0, k2)
    plain = jax.jit(lambda images: nets.student.apply({"params": join_lora(frozen, lora)},
                                                      images))(x)
    for i in range(2):
        # example 0's result does not depend on its batch partner
        np.testing.assert_allclose(np.asarray(pair[i][0]), np.asarray(again[i][0]),
                                   rtol=1e-5, atol=1e-5)
        assert rel_err(again[i][1], again[i][0]) > 1e-3  # another key, other drops
        assert rel_err(pair[i][0], plain[i][0]) > 1e-3   # train mode differs from eval


def test_exported_lora_loads_as_dape_and_equals_the_student(ram, tmp_path):
    _, state, cfg, frozen, lora = ram
    path = export_dape_lora(lora, tmp_path / LORA_FILE, step=7)
    merged_cfg, merged = load_ram(state, read_state_dict(path))   # strict LoRA check
    x = np.random.default_rng(4).standard_normal((1, IMG, IMG, 3)).astype(np.float32)
    want = DAPE(cfg).apply({"params": join_lora(frozen, lora)}, x)
    got = DAPE(merged_cfg).apply({"params": merged}, x)
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    print("exported LoRA merged vs student (soft prompt, logits):", errs)
    assert max(errs) <= 1e-5


def test_exported_names_and_shapes_are_the_released_dape_pth():
    """At full size (Swin-L 384): every exported tensor is a DAPE.pth key with its shape,
    and every DAPE.pth key left out is LoRA of a module SeeSR never runs."""
    released = read_listing("dape_lora.tsv")
    exported = {k: tuple(v.shape) for k, v in
                lora_state_dict(fresh_lora(DAPEConfig(lora_rank=8), 0)).items()}
    assert {k: released[k] for k in exported} == exported
    ignored = [re.compile(p) for p in LORA_IGNORED]
    left_out = set(released) - set(exported)
    assert all(any(r.fullmatch(k.rsplit(".", 1)[0]) for r in ignored) for k in left_out)
    assert len(exported) == 2 * (24 + 2 * 2 * 2)     # 24 Swin qkv + head q/k ×2 (+ twins)


def _tiny_config(tmp_path, photos, **overrides):
    config = dape_train.get_config("tiny")
    config.data.source = f"folder:{photos}"
    config.data.data_dir = str(tmp_path / "tfds")
    config.optim.learning_rate = 1e-3
    config.total_steps, config.checkpoint_every, config.log_every = 8, 4, 1
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def _fixed_batch_losses(config, photos, result):
    """The loss of 8 photos (resized whole to the crop size, fixed keys) with the
    initial LoRA and with the trained one."""
    from PIL import Image

    from jaxsr.data.degrade import degrade_batch, preset_by_name
    from jaxsr.train.dape_objective import dape_loss
    from jaxsr.train.dape_trainer import load_dape_weights

    student_cfg, _, lora0 = load_dape_weights(config)
    nets = _nets(student_cfg)
    size = config.data.crop_size
    files = sorted(photos.iterdir())[:8]
    hr = np.stack([np.asarray(Image.open(f).convert("RGB").resize(
        (size, size), Image.Resampling.LANCZOS)) for f in files]).astype(np.float32) / 255
    keys = jax.random.split(jax.random.key(123), len(files))
    preset = preset_by_name(config.degradation)
    frozen = jax.device_get(result.frozen)
    loss = jax.jit(lambda lora: dape_loss(nets, lora, frozen, jnp.asarray(hr), keys,
                                          lambda k, x: degrade_batch(k, x, preset))[0])
    return float(loss(lora0)), float(loss(jax.device_get(result.state.params)))


@pytest.mark.slow   # three compiles of the train step and loss: ~3-4 min on 2 cores
def test_dape_trainer_trains_exports_resumes_and_stops_on_divergence(tmp_path, capsys):
    from jaxsr.data.samples import sample_image_folder
    from jaxsr.train.dape_trainer import train

    photos, _ = sample_image_folder(tmp_path / "photos")
    work = tmp_path / "run"
    config = _tiny_config(tmp_path, photos)
    result = train(config, work)
    assert result.status == 0 and result.step == 8
    rows = [json.loads(s) for s in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["nonfinite_params"] == 0 for r in rows)
    np.testing.assert_allclose([r["loss"] for r in rows], [r["mse"] + r["bce"] for r in rows],
                               rtol=1e-5)
    print("DAPE tiny losses:", [round(r["loss"], 5) for r in rows])
    # Each step sees other photos and degradations, so 8 training losses are noisy;
    # the distillation loss of one fixed batch (same inputs, same draws) must fall.
    before, after = _fixed_batch_losses(config, photos, result)
    print(f"fixed-batch loss: fresh LoRA {before:.5f} -> trained {after:.5f}")
    assert after < before
    # Only LoRA is in the train state; the exported file holds exactly it.
    flat = traverse_util.flatten_dict(jax.device_get(result.state.params))
    assert flat and all(p[-1] in ("lora_A", "lora_B") for p in flat)
    exported = read_state_dict(work / LORA_FILE)
    for p, v in flat.items():
        np.testing.assert_array_equal(exported[f"{path_to_torch_key(p[:-1])}.{p[-1]}"], v)
    assert float(np.abs(flat[next(p for p in flat if p[-1] == "lora_B")]).max()) > 0

    # Resume to step 12 with a rate that turns to NaN from the 10th step: steps 9 and
    # 10 were computed with a finite rate (their checkpoints are kept), the 10th
    # update is NaN, and the run stops there without saving it.
    capsys.readouterr()
    bad = _tiny_config(tmp_path, photos, total_steps=12, checkpoint_every=1)
    bad.optim.milestones, bad.optim.gamma = [9], float("nan")
    with pytest.raises(FloatingPointError, match="at step 10"):
        train(bad, work)
    assert "resumed from step 8" in capsys.readouterr().out
    kept = sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit())
    assert kept[-1] == 9 and 10 not in kept
