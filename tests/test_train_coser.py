"""CoSeR training: the stage-1 target, both losses against PyTorch compositions written
from coser_reference.md section 5, the per-batch draws, the manifest input, the
stage-1 export, and both stages end to end (real photos → manifest → TFDS → grain →
on-device degradation → sharded step → orbax), resumed.

The parity tests reuse the tiny torch references of tests/coser_*_reference.py (the
stage-2 one the whole `release` fixture of tests/test_coser_sampling.py). The end-to-
end runs compile the full train steps (minutes on 2 cores) and are marked slow:

    python -m pytest -m slow tests/test_train_coser.py -s
"""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from configs import coser_train
from jaxsr.convert.coser_cognitive import (
    PRE_SR_PREFIX,
    VISUAL_PREFIX,
    load_cognitive,
    load_qformer,
    load_srresnet,
)
from jaxsr.convert.networks import load_clip_text
from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import flax_to_torch
from jaxsr.data.coser_input import _choose, make_coser_iterator, open_manifest_source
from jaxsr.data.degrade import COSER, REALESRGAN, preset_by_name
from jaxsr.data.tfds_manifest import ManifestError, coser_captions, read_manifest
from jaxsr.demo import random_params, write_tokenizer
from jaxsr.models.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsr.models.cognitive import TINY_COGNITIVE, CognitiveEncoder
from jaxsr.models.tokenizer import load_tokenizer, tokenize
from jaxsr.train import coser_objective as obj
from jaxsr.train.coser_trainer import STAGE1_FILE, export_stage1
from tests.coser_cognitive_reference import (
    TorchMSRResNet,
    TorchVisionTower,
    blip2_qformer,
    blip2_to_coser,
    perturb_,
    torch_clip_preprocess,
)
from tests.coser_reference import aia_unet_forward
from tests.coser_sampling_reference import SCALE, base_alphas_cumprod
from tests.parity import FAST_COMPILE, nhwc_to_nchw, rel_err, torch_state
from tests.test_coser_sampling import release  # noqa: F401 - the shared tiny CoSeR fixture

QUERIES = 50
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu")
EOT = TEXT["vocab_size"] - 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(n: int, seed: int) -> np.ndarray:
    """77 ids as open_clip makes them: start, n − 2 tokens, the end token (the largest
    id) at position n − 1, zero padding."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(77, np.int32)
    ids[0] = EOT - 1
    ids[1:n - 1] = rng.integers(1, EOT - 1, n - 2)
    ids[n - 1] = EOT
    return ids


def _spec_target(text: np.ndarray, ids: np.ndarray, length: int = QUERIES) -> np.ndarray:
    """Section 5, example by example: n = argmax(ids) + 1; n ≥ L: tokens [n − L, n);
    else [0, n) then the end token's embedding repeated L − n times."""
    out = []
    for c, row in zip(text, ids):
        n = int(np.argmax(row)) + 1
        if n >= length:
            out.append(c[n - length:n])
        else:
            out.append(np.concatenate([c[:n], np.repeat(c[n - 1:n], length - n, 0)]))
    return np.stack(out)


@pytest.mark.parametrize("ns", [(77, 60, 12), (50, 49, 51), (2, 3, 50)])
def test_caption_target_follows_the_spec(ns):
    ids = np.stack([_ids(n, i) for i, n in enumerate(ns)])
    text = np.random.default_rng(1).standard_normal((len(ns), 77, 5)).astype(np.float32)
    got = np.asarray(obj.caption_target(jnp.asarray(text), jnp.asarray(ids), QUERIES))
    np.testing.assert_array_equal(got, _spec_target(text, ids))
    # The last target token is always the end token's embedding.
    np.testing.assert_array_equal(got[:, -1], text[np.arange(len(ns)), np.array(ns) - 1])


# ----------------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def text_pair():
    """A tiny transformers CLIPTextModel (2 layers + final LN) and its Flax params."""
    torch.manual_seed(11)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval()
    perturb_(model, 12)
    cfg = CLIPTextConfig(**TEXT)
    return model, cfg, load_clip_text({"text_model." + k: v for k, v in
                                       torch_state(model).items()}, cfg)


def test_stage1_loss_and_gradients_match_torch(text_pair):
    text_t, text_cfg, text_params = text_pair
    cfg = dataclasses.replace(TINY_COGNITIVE, qformer=dataclasses.replace(
        TINY_COGNITIVE.qformer, num_query_tokens=QUERIES))
    torch.manual_seed(0)
    sr = perturb_(TorchMSRResNet(cfg.srresnet), 1, 0.01).eval()
    tower = perturb_(TorchVisionTower(cfg.vision), 2).eval()
    qf = perturb_(blip2_qformer(cfg.qformer), 3).eval()
    queries = np.random.default_rng(4).normal(size=(1, QUERIES, 32)).astype(np.float32)
    state = {**{PRE_SR_PREFIX + k: v for k, v in torch_state(sr).items()},
             **{VISUAL_PREFIX + k: v for k, v in torch_state(tower).items()},
             **blip2_to_coser(torch_state(qf), cfg.qformer, queries, np.random.default_rng(5))}
    cog = load_cognitive(state, cfg)
    used, _ = obj.split_qformer(cog["global_adapter"])
    trainable = {"pre_sr_model": cog["pre_sr_model"], "global_adapter": used}
    frozen = {"visual": cog["visual"], "text_encoder": text_params}
    nets = obj.Stage1Nets(CognitiveEncoder(cfg), CLIPTextModel(text_cfg))
    rng = np.random.default_rng(6)
    lr = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    ids = np.stack([_ids(62, 7), _ids(20, 8)])        # one n ≥ 50, one n < 50
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: obj.stage1_loss_of(nets, p, frozen, lr, ids))).lower(trainable).compile(
        compiler_options=FAST_COMPILE)(trainable)

    q_t = torch.nn.Parameter(torch.from_numpy(queries))
    for p in list(tower.parameters()) + list(text_t.parameters()):
        p.requires_grad_(False)
    lr_t = torch.from_numpy(nhwc_to_nchw(lr))
    tokens = tower.coser_tokens(torch_clip_preprocess(sr(lr_t), cfg.vision.image_size))
    e = qf(query_embeds=q_t.expand(2, -1, -1), encoder_hidden_states=tokens).last_hidden_state
    text = text_t(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    loss_t = F.mse_loss(e, torch.from_numpy(_spec_target(text, ids)))
    loss_t.backward()

    want = {PRE_SR_PREFIX + k: p.grad.numpy() for k, p in sr.named_parameters()}
    qf_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
                for k, p in qf.named_parameters()}
    want.update(blip2_to_coser(qf_grads, cfg.qformer, q_t.grad.numpy(),
                               np.random.default_rng(0)))
    got = {PRE_SR_PREFIX + k: v for k, v in flax_to_torch(grads["pre_sr_model"]).items()}
    got.update({"global_adapter." + k.lstrip("."): v
                for k, v in flax_to_torch(grads["global_adapter"]).items()})
    # Relative to the tensor's own norm, floored at 1e-6 of the largest: the attention
    # key biases shift every logit of a query equally, so their exact gradient is 0 and
    # both sides hold only rounding noise there.
    floor = 1e-6 * max(np.linalg.norm(w) for w in want.values())
    errs = {k: float(np.linalg.norm(v - want[k]) / max(np.linalg.norm(want[k]), floor))
            for k, v in got.items()}
    worst = max(errs, key=errs.get)
    print(f"stage-1 loss {float(value):.6f} vs torch {loss_t.item():.6f} (rel err "
          f"{rel_err(value, loss_t.item()):.2e}); {len(errs)} gradient tensors, worst "
          f"{worst} {errs[worst]:.2e}")
    assert rel_err(value, loss_t.item()) <= 1e-5
    assert len(errs) == len(jax.tree.leaves(trainable))
    assert max(errs.values()) <= 1e-4
    # Every tensor but those key biases learns.
    assert all(np.linalg.norm(want[k]) > floor for k in got if not k.endswith("key.bias"))


def test_stage1_export_loads_back_with_the_cognitive_converter(tmp_path):
    cog = random_params(CognitiveEncoder(TINY_COGNITIVE), np.zeros((1, 8, 8, 3), np.float32),
                        seed=0)
    used, unused = obj.split_qformer(cog["global_adapter"])
    assert jax.tree.leaves(unused)                  # the text path is left out of training
    path = export_stage1({"pre_sr_model": cog["pre_sr_model"], "global_adapter": used},
                         unused, tmp_path / STAGE1_FILE, step=3)
    state = read_state_dict(path)
    back = {"pre_sr_model": load_srresnet(state, TINY_COGNITIVE.srresnet),
            "global_adapter": load_qformer(state, TINY_COGNITIVE.qformer)}   # strict
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(
            {k: cog[k] for k in ("pre_sr_model", "global_adapter")})):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def stage2(release, text_pair):  # noqa: F811 - the imported fixture
    """(torch modules, Stage2Nets, trainable, frozen, per-example loss program)."""
    torch_modules, nets, params = release
    text_t, text_cfg, text_params = text_pair
    s2 = obj.Stage2Nets(
        cognitive=nets.cognitive, text_encoder=CLIPTextModel(text_cfg), unet=nets.unet,
        controlnet=nets.controlnet, vae=nets.vae,
        alphas_cumprod=base_alphas_cumprod().numpy().astype(np.float32),
        empty_ids=_ids(2, 0))
    base, lna = obj.split_lna(params["unet"])
    trainable = {"unet_lna": lna, "controlnet": params["controlnet"]}
    frozen = {"unet": base, "vae": params["vae"], "text_encoder": text_params,
              "cognitive": params["cognitive"]}
    fn = lambda tr, fz, *args: obj.stage2_example_losses(s2, tr, fz, *args)
    args = _stage2_inputs(0, False)
    program = jax.jit(fn).lower(trainable, frozen, *args).compile(compiler_options=FAST_COMPILE)
    return torch_modules, text_t, s2, trainable, frozen, program


def _stage2_inputs(seed: int, drop: bool, batch: int = 3):
    """(lr [B,16,16,3], gt, ref [B,64,64,3], ids [B,77], Stage2Draws)."""
    rng = np.random.default_rng(seed)
    u = lambda *s: rng.uniform(size=s).astype(np.float32)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)
    ids = np.stack([_ids(int(k), seed + i) for i, k in enumerate(rng.integers(5, 70, batch))])
    draws = obj.Stage2Draws(posterior=n(batch, 8, 8, 4), t=rng.integers(0, 1000, batch)
                            .astype(np.int32), noise=n(batch, 8, 8, 4),
                            drop_text=np.bool_(drop), gt_as_lr=np.bool_(False))
    return u(batch, 16, 16, 3), u(batch, 64, 64, 3), u(batch, 64, 64, 3), ids, draws


def _torch_stage2(m, text_t, empty_ids, lr, gt, ref, ids, draws):
    """Section 5's stage-2 step in torch, example losses [B] (same draws)."""
    with torch.no_grad():
        c = lambda x: torch.from_numpy(nhwc_to_nchw(x))
        b = lr.shape[0]
        ids = np.repeat(empty_ids[None], b, 0) if draws.drop_text else ids
        text = text_t(torch.from_numpy(ids).long()).last_hidden_state
        tokens = m["tower"].coser_tokens(torch_clip_preprocess(m["sr"](c(lr)),
                                                               m["vision_size"]))
        e = m["qformer"](query_embeds=m["query_tokens"].expand(b, -1, -1),
                         encoder_hidden_states=tokens).last_hidden_state
        ctx = torch.cat([text, e], dim=1)
        vae = m["vae"]
        post = vae.encode(2 * c(gt) - 1).latent_dist
        z_gt = SCALE * (post.mean + post.std * c(draws.posterior))
        lq = F.interpolate(2 * c(lr) - 1, size=gt.shape[1:3], mode="bicubic",
                           align_corners=False)
        z_lr = SCALE * vae.encode(lq).latent_dist.mode()
        z_ref = SCALE * vae.encode(2 * c(ref) - 1).latent_dist.mode()
        t = torch.from_numpy(np.asarray(draws.t)).long()
        ac = base_alphas_cumprod()[t].float().view(-1, 1, 1, 1)
        eps = c(draws.noise)
        z_t = ac.sqrt() * z_gt + (1 - ac).sqrt() * eps
        feats_lr, feats_ref = m["cn"](z_t, z_lr, t, ctx), m["cn"](z_t, z_ref, t, ctx)
        pred = aia_unet_forward(m["unet"], z_t, t, ctx, feats_lr, feats_ref)
        return ((pred - eps) ** 2).mean(dim=(1, 2, 3)).numpy()


@pytest.mark.slow   # the fixture compiles VAE + ControlNet + AiA UNet: ~40 s on 2 cores
@pytest.mark.parametrize("drop", [False, True], ids=["caption", "empty_caption"])
def test_stage2_example_losses_match_torch(stage2, drop):
    torch_modules, text_t, nets, trainable, frozen, program = stage2
    inputs = _stage2_inputs(1, drop)
    got = np.asarray(program(trainable, frozen, *inputs))
    want = _torch_stage2(torch_modules, text_t, nets.empty_ids, *inputs)
    print(f"stage-2 example losses {got} vs torch {want}: rel err {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got.mean(), want.mean()) <= 1e-5


@pytest.mark.slow   # shares the parity test's compiled program
def test_stage2_examples_keep_their_own_conditioning_reference_and_target(stage2):
    *_, trainable, frozen, program = stage2
    lr, gt, ref, ids, draws = _stage2_inputs(2, False)
    base = np.asarray(program(trainable, frozen, lr, gt, ref, ids, draws))
    perm = np.array([0, 2, 1])            # not a rotation: a shifted pairing would show
    take = lambda x: x[perm]
    permuted = np.asarray(program(trainable, frozen, take(lr), take(gt), take(ref),
                                  take(ids), draws._replace(posterior=take(draws.posterior),
                                                            t=take(draws.t),
                                                            noise=take(draws.noise))))
    np.testing.assert_allclose(permuted, base[perm], rtol=1e-5)
    # Example 0 with other partners: its loss does not change.
    o_lr, o_gt, o_ref, o_ids, _ = _stage2_inputs(3, False)
    mix = lambda a, b: np.concatenate([a[:1], b[1:]])
    partners = np.asarray(program(trainable, frozen, mix(lr, o_lr), mix(gt, o_gt),
                                  mix(ref, o_ref), mix(ids, o_ids), draws))
    np.testing.assert_allclose(partners[0], base[0], rtol=1e-5)
    assert np.all(np.abs(partners[1:] - base[1:]) > 1e-6)
    # Each input matters for its own example only: another reference for example 1.
    other_ref = ref.copy()
    other_ref[1] = o_ref[1]
    moved = np.asarray(program(trainable, frozen, lr, gt, other_ref, ids, draws))
    assert abs(moved[1] - base[1]) > 1e-7
    np.testing.assert_allclose(moved[[0, 2]], base[[0, 2]], rtol=1e-6)


def test_caption_dropout_and_no_degradation_are_one_draw_per_batch():
    def draws(step):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(
            jax.random.key(0), step), i))(jnp.arange(4))
        d = obj.stage2_draws(keys, (1, 1), 1000, 0.5, 0.01)
        return d.drop_text, d.gt_as_lr, d.t
    drop, gt_as_lr, t = jax.jit(jax.vmap(draws))(jnp.arange(4000))
    assert drop.shape == gt_as_lr.shape == (4000,)     # one boolean per batch
    assert abs(float(drop.mean()) - 0.5) < 0.036       # 4.5 σ
    assert abs(float(gt_as_lr.mean()) - 0.01) < 0.007
    assert len(np.unique(np.asarray(t[0]))) > 1        # timesteps are per example


# ----------------------------------------------------------------------- input


def test_coser_preset_has_the_stablesr_numbers():
    assert preset_by_name("coser") is COSER
    for k in (COSER.kernel1, COSER.kernel2):
        assert (k.betag_range, k.betap_range, k.size_range, k.sinc_prob) == (
            (0.5, 2.0), (1.0, 1.5), (7, 21), 0.1)
        assert k.type_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (COSER.kernel1.sigma_range, COSER.kernel2.sigma_range) == ((0.2, 1.5), (0.2, 1.0))
    f, s = COSER.first, COSER.second
    assert (f.resize_probs, f.resize_range, f.noise_range, f.poisson_scale_range,
            f.gray_noise_prob, f.jpeg_range) == ((0.2, 0.7, 0.1), (0.3, 1.5), (1.0, 15.0),
                                                 (0.05, 2.0), 0.4, (60.0, 95.0))
    assert (s.resize_probs, s.resize_range, s.noise_range, s.poisson_scale_range,
            s.jpeg_range) == ((0.3, 0.4, 0.3), (0.6, 1.2), (1.0, 12.0), (0.05, 1.0),
                              (60.0, 100.0))
    assert (COSER.second_blur_prob, COSER.final_sinc_prob, COSER.usm_sharpen,
            COSER.round_lr, COSER.round_target) == (0.5, 0.8, True, False, False)
    assert COSER.first == REALESRGAN.first and COSER.second == REALESRGAN.second


def test_weighted_choice_frequencies():
    rng = np.random.default_rng(0)
    picks = np.array([_choose(rng, [1.0, 0.0, 3.0]) for _ in range(20000)])
    assert not np.any(picks == 1)
    assert abs(np.mean(picks == 2) - 0.75) < 0.015


def test_coser_captions_and_manifest_checks(tmp_path):
    caps, w = coser_captions("tench", ["a man holding a fish", "green water"], [0.31, 0.2])
    assert caps == ["a photo of tench", "a photo of tench, a man holding a fish",
                    "a photo of tench, a man holding a fish"]
    assert w == [0.5, 0.31, pytest.approx(0.31)]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "a.png", "caption": "x", "references": ["b.png"]}) + "\n")
    with pytest.raises(ManifestError, match="not images of the manifest"):
        read_manifest(m)
    m.write_text(json.dumps({"image": "a.png", "captions": ["x", "y"],
                             "caption_weights": [1]}) + "\n")
    with pytest.raises(ManifestError, match="list of 2 numbers"):
        read_manifest(m)


def _manifest(folder, weights=None) -> list[str]:
    """A manifest of the photos in `folder`: two captions each, every other photo as a
    reference (weights `weights` if given)."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    with open(folder / "train.jsonl", "w") as f:
        for n in names:
            refs = [r for r in names if r != n]
            line = {"image": n, "captions": [f"a photo of {n[:-4]}",
                                             f"a photo of {n[:-4]}, a long caption that "
                                             "runs past fifty characters"],
                    "caption_weights": [0.5, 0.5], "references": refs}
            if weights:
                line["reference_weights"] = weights[:len(refs)]
            f.write(json.dumps(line) + "\n")
    return names


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from jaxsr.data.samples import sample_image_folder

    root = tmp_path_factory.mktemp("coser_photos")
    folder, _ = sample_image_folder(root / "photos", held_out=None)
    write_tokenizer(root / "tokenizer")
    return root, folder


def test_manifest_input_pairs_each_image_with_its_captions_and_references(photos):
    from PIL import Image

    from jaxsr.data.coser_input import square_image

    root, folder = photos
    names = _manifest(folder, weights=[1.0, 0.0, 1.0])
    tok = load_tokenizer(root / "tokenizer")
    source = open_manifest_source(folder / "train.jsonl", root / "tfds")
    size = 32
    squares = [square_image(np.asarray(Image.open(folder / n).convert("RGB")), size)
               for n in names]
    make = functools.partial(make_coser_iterator, source, tok, global_batch_size=2, size=size,
                             seed=3, process_index=0, process_count=1, with_reference=True)
    it = make()
    seen_refs = set()
    batches = [next(it) for _ in range(6)]           # three epochs
    for b in batches:
        for hr, ids, ref, i in zip(b["hr"], b["ids"], b["ref"], b["index"]):
            assert np.array_equal(hr, squares[i]) or np.array_equal(hr, squares[i][:, ::-1])
            captions = [f"a photo of {names[i][:-4]}", f"a photo of {names[i][:-4]}, a long "
                        "caption that runs past fifty characters"]
            assert any(np.array_equal(ids, tokenize(tok, c)[0]) for c in captions)
            j = next(k for k, s in enumerate(squares) if np.array_equal(ref, s))
            others = [k for k in range(len(names)) if k != i]
            assert j != i and j != others[1]          # weight 0 never drawn
            seen_refs.add((int(i), j))
    assert len(seen_refs) > len(names)               # references vary
    # Deterministic and resumable.
    again = make()
    first = next(again)
    state = again.get_state()
    np.testing.assert_array_equal(first["ref"], batches[0]["ref"])
    resumed = make()
    resumed.set_state(state)
    for b in batches[1:3]:
        got = next(resumed)
        assert all(np.array_equal(got[k], b[k]) for k in b)


# ----------------------------------------------------------------------- end to end


def _tiny(variant, tmp_path, manifest, **overrides):
    config = coser_train.get_config(variant)
    config.data.source = str(manifest)
    config.data.data_dir = str(tmp_path / "tfds")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _losses(workdir):
    rows = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _fixed_batch(config, folder, names, tok):
    """4 photos squared to the crop size, their first caption and next photo as
    reference, fixed keys."""
    from PIL import Image

    from jaxsr.data.coser_input import square_image

    s = config.data.crop_size
    sq = [square_image(np.asarray(Image.open(folder / n).convert("RGB")), s) for n in names]
    hr = jnp.asarray(np.stack(sq).astype(np.float32) / 255)
    ref = jnp.asarray(np.stack(sq[1:] + sq[:1]))
    ids = jnp.asarray(tokenize(tok, [f"a photo of {n[:-4]}" for n in names]))
    return hr, ids, ref, jax.random.split(jax.random.key(123), len(names))


def _train_and_resume(variant, photos, tmp_path, capsys):
    from jaxsr.train.coser_trainer import coser_task, train

    root, folder = photos
    names = _manifest(folder)
    config = _tiny(variant, tmp_path, folder / "train.jsonl")
    devices = jax.devices()[:2]
    straight = tmp_path / "straight"
    result = train(config, straight, devices=devices)
    assert result.status == 0 and result.step == config.total_steps
    want = _losses(straight)
    print(f"{variant} losses:", [round(want[s], 5) for s in sorted(want)])

    # Resume: a workdir holding only the step-4 checkpoint continues to step 8 and
    # computes the uninterrupted run's steps 5-8 (same data, same draws) exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / str(config.total_steps))
    capsys.readouterr()
    again = train(config, resumed, devices=devices)
    assert "resumed from step 4" in capsys.readouterr().out
    got = _losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == want[step], (step, got[step], want[step])
    for a, b in zip(jax.tree.leaves(jax.device_get(again.state.params)),
                    jax.tree.leaves(jax.device_get(result.state.params))):
        np.testing.assert_array_equal(a, b)

    # The loss of one fixed batch with fixed draws, before and after training.
    task, tok = coser_task(config, tmp_path / "fresh")
    hr, ids, ref, keys = _fixed_batch(config, folder, names, tok)
    extra = {"ids": ids} if variant.startswith("stage1") else {"ids": ids, "ref": ref}
    loss = jax.jit(lambda p, fz: task.loss_fn(p, fz, hr, keys, **extra)[0])
    frozen = jax.device_get(result.frozen)
    before = float(loss(task.trainable, frozen))
    after = float(loss(jax.device_get(result.state.params), frozen))
    print(f"{variant} fixed-batch loss: initial {before:.5f} -> trained {after:.5f}")
    return before, after, straight, jax.device_get(result.state.params)


@pytest.mark.slow
def test_stage1_trains_resumes_and_exports(photos, tmp_path, capsys):
    before, after, workdir, _ = _train_and_resume("stage1_tiny", photos, tmp_path, capsys)
    assert after < before
    # The exported file is what stage 2 reads as init.cognitive: strict conversion.
    from jaxsr.train.coser_trainer import cognitive_config

    state = read_state_dict(workdir / STAGE1_FILE)
    cfg = cognitive_config(coser_train.get_config("stage1_tiny"))
    load_srresnet(state, cfg.srresnet)
    load_qformer(state, cfg.qformer)


@pytest.mark.slow
def test_stage2_trains_resumes_and_exports(photos, tmp_path, capsys):
    before, after, workdir, trained = _train_and_resume("stage2_tiny", photos, tmp_path,
                                                        capsys)
    assert after < before
    # The exported folder is a CoSeR weights folder: the trained ControlNet and *_lna
    # layers inside, and CoSeRPipeline super-resolves with it.
    from jaxsr.convert.coser_weights import load_coser_folder
    from jaxsr.pipelines.coser import CoSeROptions, CoSeRPipeline
    from jaxsr.train.coser_objective import split_lna
    from jaxsr.train.coser_trainer import STAGE2_FOLDER

    folder = workdir / STAGE2_FOLDER
    weights = load_coser_folder(folder)
    config = coser_train.get_config("stage2_tiny")
    assert weights.architecture.unet.base.layers_per_block == config.model.unet.layers_per_block
    for name, tree in (("controlnet", weights.params["controlnet"]),
                       ("unet_lna", split_lna(weights.params["unet"])[1])):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(trained[name])):
            np.testing.assert_array_equal(a, b)
    pipe = CoSeRPipeline.from_pretrained(folder, devices=jax.devices()[:1])
    lr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    [sr], [ref] = pipe.upscale([lr], options=CoSeROptions(steps=2), return_references=True)
    assert sr.shape == ref.shape == (64, 64, 3)


# The evaluator and the pipeline do the same float32 work on different meshes; a value
# that sits near an 8-bit level boundary may round to the other level on some CPUs (a
# few of the 24,576 output values). The scores must agree within what this many
# flipped levels can move them.
LEVEL_FLIPS = 16


def _level_flip_tolerance(metrics, sr, hr, scores) -> dict[str, float]:
    """The sum of the moves of each score when one of LEVEL_FLIPS fixed output values
    is one 8-bit level off (a first-order bound on flipping all of them)."""
    assert sr.dtype == np.uint8
    flat = sr.reshape(-1)
    moved = dict.fromkeys(scores, 0.0)
    for i in np.random.default_rng(0).choice(flat.size, LEVEL_FLIPS, replace=False):
        flipped = flat.copy()
        flipped[i] = flipped[i] + 1 if flipped[i] < 255 else flipped[i] - 1
        for name, value in metrics(flipped.reshape(sr.shape), hr).items():
            moved[name] += abs(value - scores[name])
    return moved


def _pipeline_scores(config, workdir) -> tuple[dict[str, float], dict[str, float]]:
    """Mean PSNR and SSIM of config.eval's held-out pairs super-resolved by
    CoSeRPipeline from WORKDIR's exported folder, as the evaluator is configured
    (float32, plain VAE decoder, eval.steps, every image from key(eval.seed)), and how
    far LEVEL_FLIPS flipped output levels move each."""
    from jaxsr.metrics.registry import HeldOutMetrics
    from jaxsr.pipelines.coser import CoSeROptions, CoSeRPipeline
    from jaxsr.train.coser_trainer import STAGE2_FOLDER
    from jaxsr.train.held_out import held_out_pairs

    pairs = held_out_pairs(config, "eval")
    assert len(pairs) == 2 and pairs[0][0].shape == (16, 16, 3)
    pipe = CoSeRPipeline.from_pretrained(workdir / STAGE2_FOLDER, dtype="float32",
                                         devices=jax.devices()[:1])
    options = CoSeROptions(steps=int(config.eval.steps), decoder="vae")
    sr = pipe.upscale([lr for lr, _ in pairs], options=options, seed=int(config.eval.seed))
    metrics = HeldOutMetrics(["psnr", "ssim"])
    sr, hr = np.stack(sr), np.stack([hr for _, hr in pairs])
    scores = metrics(sr, hr)
    return scores, _level_flip_tolerance(metrics, sr, hr, scores)


@pytest.mark.slow
def test_stage2_logs_held_out_metrics_of_the_weights_it_exports(photos, tmp_path):
    """Two steps with config.eval every 2: metrics.jsonl holds eval/psnr and eval/ssim at
    step 2, and they are the scores `jaxsr sr`'s pipeline gets from the weights exported
    at that step (float32, plain VAE decoder, the eval's steps and seed) on the same
    degraded held-out photos: the evaluator samples with the weights being trained.
    About 4 minutes (it compiles the train step); the default suite runs the
    evaluator alone (the next test)."""
    from jaxsr.train.coser_trainer import train

    _, folder = photos
    _manifest(folder)
    config = _tiny("stage2_tiny", tmp_path, folder / "train.jsonl", total_steps=2,
                   checkpoint_every=2)
    config.eval.update(every=2, source=str(folder), count=2, steps=2, seed=5,
                       metrics="psnr,ssim")
    workdir = tmp_path / "run"
    result = train(config, workdir, devices=jax.devices()[:2])
    assert result.status == 0
    rows = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in rows if "eval/psnr" in r]
    assert [r["step"] for r in held] == [2] and "eval/ssim" in held[0]

    want, flips = _pipeline_scores(config, workdir)
    print("held-out scores:", {k: held[0][f"eval/{k}"] for k in want}, "pipeline:", want,
          f"{LEVEL_FLIPS} flipped levels move them by", flips)
    for name, value in want.items():
        assert abs(held[0][f"eval/{name}"] - value) <= flips[name] + 1e-6 * abs(value), name


def test_stage2_evaluator_scores_what_the_pipeline_gives_the_same_weights(photos, tmp_path):
    """The stage-2 Task's evaluator (config.eval: two photos, 2 steps, seed 5, psnr and
    ssim) on the initial weights, on a 2-device mesh, against CoSeRPipeline on the folder
    the Task's `finish` exports from the same weights: the same scores, so the evaluator
    samples as `jaxsr sr` does with the weights it is given. The loop's call every
    eval.every steps and the eval/<metric> rows are shared with SeeSR (its quickstart
    test) and checked for CoSeR by the slow test above."""
    from types import SimpleNamespace

    from jax.sharding import Mesh

    from jaxsr.train.coser_trainer import coser_task

    _, folder = photos
    _manifest(folder)
    config = _tiny("stage2_tiny", tmp_path, folder / "train.jsonl")
    config.eval.update(every=2, source=str(folder), count=2, steps=2, seed=5,
                       metrics="psnr,ssim")
    workdir = tmp_path / "run"
    task, _ = coser_task(config, workdir)
    evaluate = task.make_evaluator(Mesh(np.array(jax.devices()[:2]), ("data",)), None)
    got = evaluate(0, task.trainable, task.frozen)
    assert set(got) == {"psnr", "ssim"}

    task.finish(SimpleNamespace(params=task.trainable), 0)
    want, flips = _pipeline_scores(config, workdir)
    print("held-out scores:", got, "pipeline:", want,
          f"{LEVEL_FLIPS} flipped levels move them by", flips)
    for name, value in want.items():
        assert abs(got[name] - value) <= flips[name] + 1e-6 * abs(value), name
