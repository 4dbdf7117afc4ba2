"""SD2 weights in both PyTorch layouts -> the same Flax params -> the same outputs;
export back to diffusers; the converted-weights folder; `jaxsr convert`."""

import copy
import dataclasses
import hashlib
import json
import re
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

import jaxsr
from jaxsr.cli import main as cli_main
from jaxsr.convert import ldm
from jaxsr.convert.cache import (
    StaleWeightsError,
    StaleWeightsWarning,
    load_converted,
    read_manifest,
    save_converted,
    stale_sources,
)
from jaxsr.convert.export import export_diffusers
from jaxsr.convert.safetensors_io import write_safetensors
from jaxsr.convert.sd2 import load_sd2, load_sd2_converted, rename_legacy_vae, sd2_modules
from jaxsr.models.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsr.models.unet import UNet2DConditionModel, UNetConfig
from jaxsr.models.vae import AutoencoderKL, VAEConfig
from tests.keylists import read_listing, read_map
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err
from tests.sd2_fixtures import TEXT_TINY, build_tiny_sd2, save_diffusers_folder, single_file_state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    unet, vae, text = build_tiny_sd2()
    root = save_diffusers_folder(tmp_path_factory.mktemp("sd2") / "pipe", unet, vae, text)
    return unet, vae, text, root, load_sd2(root)


def _flat(params):
    return traverse_util.flatten_dict(params)


def assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def _outputs_match_torch(weights, unet, vae, text):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    with torch.no_grad():
        want = unet(torch.from_numpy(x), 10, torch.from_numpy(ctx)).sample.numpy()
    cfg, params = weights.unet
    got = UNet2DConditionModel(cfg).apply({"params": params}, nchw_to_nhwc(x), 10, ctx)
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5
    img = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(img)).latent_dist.mean.numpy()
    cfg, params = weights.vae
    got = AutoencoderKL(cfg).apply({"params": params}, nchw_to_nhwc(img), method="encode").mean
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5
    ids = rng.integers(0, 1000, (1, 77))
    with torch.no_grad():
        want = text(torch.from_numpy(ids)).last_hidden_state.numpy()
    cfg, params = weights.text_encoder
    assert rel_err(CLIPTextModel(cfg).apply({"params": params}, ids), want) <= 1e-5


def test_diffusers_folder_matches_pytorch(tiny):
    unet, vae, text, root, weights = tiny
    assert weights.scheduler_config["beta_schedule"] == "scaled_linear"
    _outputs_match_torch(weights, unet, vae, text)
    # The summary counts what PyTorch counts and says how the files stored it.
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        s = weights.summary[name]
        assert s["parameters"] == sum(p.numel() for p in module.parameters()), name
        assert s["source_dtypes"] == {"float32": len(module.state_dict())}, name
        assert s["source"].startswith(str(root / name))
    assert "unet" in weights.describe() and "float32" in weights.describe()


def _overrides(weights):
    return dict(unet_config=weights.unet[0], vae_config=weights.vae[0],
                text_config=weights.text_encoder[0])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_gives_the_same_params(tiny, tmp_path, suffix):
    unet, vae, text, _, weights = tiny
    state = single_file_state(unet, vae, text)
    path = tmp_path / f"v2-tiny{suffix}"
    if suffix == ".safetensors":
        write_safetensors(path, state)
    else:   # the released .ckpt files are Lightning pickles with a "state_dict"
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                    "global_step": 1}, path)
    single = load_sd2(path, **_overrides(weights))
    for name in ("unet", "vae", "text_encoder"):
        assert_same_params(getattr(single, name)[1], getattr(weights, name)[1])
        assert single.summary[name]["parameters"] == weights.summary[name]["parameters"]
    assert single.sources == [path] and single.tokenizer_dir is None
    assert single.scheduler_config["prediction_type"] == "epsilon"


def test_single_file_config_inference(tiny, tmp_path):
    """Without a config, a single file's sizes come from its tensors and the rest from
    SD2's conventions (64-channel heads, 32 norm groups)."""
    unet, vae, text, _, weights = tiny
    path = tmp_path / "v2.safetensors"
    write_safetensors(path, single_file_state(unet, vae, text))
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        # Tiny widths do not fit SD2's 32 norm groups: the load says why.
        load_sd2(path)
    got = load_sd2(path, unet_config=weights.unet[0], vae_config=weights.vae[0])
    # The tiny text encoder is 32 wide: one 64-channel-or-less head by SD2's rule.
    tiny_text = CLIPTextConfig.from_hf_config(TEXT_TINY)
    assert got.text_encoder[0] == dataclasses.replace(tiny_text, num_attention_heads=1)
    assert_same_params(got.text_encoder[1], weights.text_encoder[1])


def test_export_loads_in_diffusers_and_transformers(tiny, tmp_path):
    unet, vae, text, root, weights = tiny
    out = export_diffusers(tmp_path / "export", unet=weights.unet, vae=weights.vae,
                           text_encoder=weights.text_encoder,
                           scheduler_config=weights.scheduler_config)
    back = {"unet": diffusers.UNet2DConditionModel.from_pretrained(out / "unet"),
            "vae": diffusers.AutoencoderKL.from_pretrained(out / "vae"),
            "text": transformers.CLIPTextModel.from_pretrained(out / "text_encoder")}
    for name, original in (("unet", unet), ("vae", vae), ("text", text)):
        got, want = back[name].state_dict(), original.state_dict()
        assert got.keys() == want.keys(), name
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
    # ... and the re-loaded PyTorch modules give the original outputs.
    _outputs_match_torch(weights, back["unet"].eval(), back["vae"].eval(), back["text"].eval())
    # Round trip through jaxsr is exact.
    again = load_sd2(out)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_params(getattr(again, name)[1], getattr(weights, name)[1])
        assert getattr(again, name)[0] == getattr(weights, name)[0]


def test_bin_files_load_like_safetensors(tiny, tmp_path):
    unet, vae, text, _, weights = tiny
    root = save_diffusers_folder(tmp_path / "bin", unet, vae, text, safe=False)
    assert (root / "unet" / "diffusion_pytorch_model.bin").exists()
    from_bin = load_sd2(root)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_params(getattr(from_bin, name)[1], getattr(weights, name)[1])


def test_fp16_variant_sharded_unet_and_legacy_vae_names(tiny, tmp_path):
    """Folder variants found in the wild: only `.fp16.` text-encoder weights, a
    sharded UNet, and a VAE saved with diffusers' deprecated attention names."""
    unet, vae, text, _, weights = tiny
    root = save_diffusers_folder(tmp_path / "variants", unet, vae, text)
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(root / "unet", max_shard_size="300KB")
    assert len(list((root / "unet").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    (root / "text_encoder" / "model.safetensors").unlink()
    copy.deepcopy(text).half().save_pretrained(root / "text_encoder", variant="fp16")
    assert (root / "text_encoder" / "model.fp16.safetensors").exists()
    legacy = {cur: old for old, cur, _ in read_map("sd2_base_vae_legacy_names.txt")}
    state = {legacy.get(k, k): v.numpy() for k, v in vae.state_dict().items()}
    # Some old files even kept LDM's 1x1-conv shape for these.
    state["encoder.mid_block.attentions.0.query.weight"] = state[
        "encoder.mid_block.attentions.0.query.weight"][:, :, None, None]
    write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", state)

    got = load_sd2(root)
    assert_same_params(got.unet[1], weights.unet[1])
    assert_same_params(got.vae[1], weights.vae[1])
    # fp16 storage: exactly the float16-rounded weights, widened back to float32.
    want = {k: np.asarray(v).astype(np.float16).astype(np.float32)
            for k, v in _flat(weights.text_encoder[1]).items()}
    got_text = _flat(got.text_encoder[1])
    assert got_text.keys() == want.keys()
    for k in want:
        assert got_text[k].dtype == np.float32
        np.testing.assert_array_equal(got_text[k], want[k], err_msg=str(k))
    assert got.summary["text_encoder"]["source_dtypes"] == {"float16": len(text.state_dict())}
    assert got.summary["text_encoder"]["source"].endswith("model.fp16.safetensors")
    shards = {p.resolve() for p in (root / "unet").glob("diffusion_pytorch_model-*")}
    assert shards <= {p.resolve() for p in got.sources}


def test_legacy_vae_names_cover_the_full_size_listing():
    listing = read_listing("sd2_base_vae_diffusers.tsv")
    rows = read_map("sd2_base_vae_legacy_names.txt")
    assert len(rows) == 16
    legacy = {cur: old for old, cur, _ in rows}
    state = {legacy.get(k, k): np.broadcast_to(np.float32(0), s) for k, s in listing.items()}
    assert len(set(state) - set(listing)) == 16
    renamed = rename_legacy_vae(state)
    assert {k: v.shape for k, v in renamed.items()} == listing


def test_converted_folder_round_trip_and_staleness(tiny, tmp_path):
    unet, vae, text, root, weights = tiny
    out = save_converted(tmp_path / "conv", sd2_modules(weights), sources=weights.sources,
                         extra={"scheduler_config": weights.scheduler_config})
    manifest = read_manifest(out)
    assert manifest["dtype"] == "float32"
    assert manifest["jaxsr_version"] == jaxsr.__version__
    assert manifest["scheduler_config"] == weights.scheduler_config
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        entry = manifest["modules"][name]
        assert entry["parameters"] == sum(p.numel() for p in module.parameters()), name
        assert entry["config"] == json.loads(json.dumps(sd2_modules(weights)[name][0]))
    # Every source: the weights and the configs, each with its size and sha256.
    want_sources = {str(p.resolve()) for p in weights.sources}
    assert {s["path"] for s in manifest["sources"]} == want_sources
    assert str((root / "unet" / "config.json").resolve()) in want_sources
    for src in manifest["sources"]:
        data = open(src["path"], "rb").read()
        assert src["size"] == len(data)
        assert src["sha256"] == hashlib.sha256(data).hexdigest()
    # Second load: the same params and configs, from the folder alone.
    loaded = load_sd2_converted(out)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_params(getattr(loaded, name)[1], getattr(weights, name)[1])
        assert getattr(loaded, name)[0] == getattr(weights, name)[0]
    assert loaded.scheduler_config == weights.scheduler_config
    assert stale_sources(manifest) == [] and stale_sources(manifest, full=True) == []
    # A bfloat16 folder stores half the bytes and loads as bfloat16.
    bf = save_converted(tmp_path / "bf16", sd2_modules(weights), sources=[], dtype="bfloat16")
    size = lambda folder: (folder / "unet.safetensors").stat().st_size
    assert size(bf) < 0.6 * size(out)
    bf_unet = _flat(load_converted(bf, ["unet"])["unet"][1])
    for k, v in _flat(weights.unet[1]).items():
        assert str(bf_unet[k].dtype) == "bfloat16"
        np.testing.assert_array_equal(bf_unet[k].astype(np.float32),
                                      v.astype(bf_unet[k].dtype).astype(np.float32))


def test_stale_sources_are_detected(tiny, tmp_path):
    *_, weights = tiny
    src = tmp_path / "src.safetensors"
    src.write_bytes(weights.sources[0].read_bytes())
    out = save_converted(tmp_path / "conv", {"unet": sd2_modules(weights)["unet"]},
                         sources=[src])
    # Rewritten with identical bytes (new mtime): hashed, still fresh.
    src.write_bytes(src.read_bytes())
    assert stale_sources(read_manifest(out)) == []
    # Same size, one byte changed: the hash catches it.
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF
    src.write_bytes(bytes(data))
    assert stale_sources(read_manifest(out)) == [str(src.resolve())]
    with pytest.warns(StaleWeightsWarning, match="src.safetensors"):
        load_converted(out)
    with pytest.raises(StaleWeightsError, match="changed since"):
        load_converted(out, check_sources="raise")
    load_converted(out, check_sources="ignore")
    # A source that is gone is not an error: converted folders outlive their sources.
    src.unlink()
    assert stale_sources(read_manifest(out)) == []


def test_converted_folder_loads_without_torch(tiny, tmp_path):
    *_, weights = tiny
    out = save_converted(tmp_path / "conv", sd2_modules(weights), sources=weights.sources)
    script = ("import sys; from jaxsr.convert.sd2 import load_sd2_converted; "
              f"w = load_sd2_converted({str(out)!r}); "
              "print(sorted(m for m in ('torch', 'diffusers', 'transformers') "
              "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "[]"


def test_cli_convert(tiny, tmp_path, capsys):
    *_, root, weights = tiny
    out = tmp_path / "weights"
    assert cli_main(["convert", "--sd", str(root), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    n = sum(int(np.prod(v.shape)) for v in _flat(weights.unet[1]).values())
    assert f"{n:,d}" in printed and "text_encoder" in printed
    assert json.loads((out / "manifest.json").read_text())["modules"].keys() == {
        "unet", "vae", "text_encoder"}
    # A second run refuses to overwrite; --overwrite replaces.
    assert cli_main(["convert", "--sd", str(root), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert", "--sd", str(root), "--output", str(out), "--overwrite"]) == 0
    assert cli_main(["convert", "--sd", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "o2")]) == 2
    assert "nope does not exist" in capsys.readouterr().err


def _full_size_single_file() -> dict:
    """The released SD 2.x single file's keys and shapes, as zero-cost broadcast views."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in
            read_listing("sd21_ldm_single_file.tsv").items()}


def test_configs_inferred_from_full_size_listing():
    """The released SD2 single file's shapes give SD2-base's configs."""
    state = _full_size_single_file()
    assert ldm.unet_layers_per_block(state) == 2
    parts = ldm.split_single_file(state)
    assert ldm.infer_unet_config(parts["unet"]) == UNetConfig()
    assert ldm.infer_vae_config(parts["vae"]) == VAEConfig()
    assert ldm.infer_text_config(parts["text_encoder"]) == CLIPTextConfig()


def test_ldm_rules_reproduce_recorded_maps():
    """Every row of the maps traced through diffusers' converter is reproduced by the
    rules, and the rules produce nothing else: the renamed full-size single file is
    exactly the diffusers/transformers listings, shapes included."""
    unet_rows = read_map("ldm_to_diffusers_unet_map.tsv")
    vae_rows = read_map("ldm_to_diffusers_vae_map.tsv")
    text_rows = read_map("ldm_to_diffusers_text_encoder_map.tsv")
    assert (len(unet_rows), len(vae_rows), len(text_rows)) == (686, 248, 372)
    for key, name in unet_rows:
        assert ldm.unet_key(key.removeprefix(ldm.UNET_PREFIX), 2) == name, key
    for key, name, how in vae_rows:
        assert ldm.vae_key(key.removeprefix(ldm.VAE_PREFIX), 4) == (
            name, how.startswith("squeeze")), key
    listing = read_listing("sd21_ldm_single_file.tsv")
    for key, name, how in text_rows:
        shape = listing[key]
        if how.startswith("rows"):
            # Distinct row ids, so a split that takes the wrong rows cannot pass.
            value = np.broadcast_to(np.arange(shape[0], dtype=np.float32).reshape(
                (-1,) + (1,) * (len(shape) - 1)), shape)
            got = dict(ldm.text_keys(key.removeprefix(ldm.TEXT_PREFIX), value))
            lo, hi = (int(x) for x in how.split("[")[1].split("]")[0].split(":"))
            np.testing.assert_array_equal(got[name], value[lo:hi], err_msg=key)
        else:
            assert how == "copy", how
            value = np.broadcast_to(np.float32(0), shape)
            got = dict(ldm.text_keys(key.removeprefix(ldm.TEXT_PREFIX), value))
            assert got[name] is value, key

    parts = ldm.split_single_file(_full_size_single_file())
    for part, rows, listing_name in (
            ("unet", unet_rows, "sd2_base_unet_diffusers.tsv"),
            ("vae", vae_rows, "sd2_base_vae_diffusers.tsv"),
            ("text_encoder", text_rows, "sd2_base_text_encoder_transformers.tsv")):
        names = {r[1] for r in rows}
        assert set(parts[part]) == names, part
        target = read_listing(listing_name)
        target.pop("text_model.embeddings.position_ids", None)   # a buffer, not a weight
        assert {k: v.shape for k, v in parts[part].items()} == target, part
    # What the maps leave out is exactly the documented ignore list.
    mapped = {r[0] for r in unet_rows + vae_rows + text_rows}
    left = set(listing) - mapped
    ignore = [*ldm.IGNORED_LDM_KEYS, ldm.last_text_block_pattern(23)]
    assert all(any(re.fullmatch(p, k) for p in ignore) for k in left)
    assert sum(1 for k in left if ".resblocks.23." in k) == 12
    assert len(left) == 12 + 12 + 2     # schedule buffers, last block, CLIP head
    assert not any(any(re.fullmatch(p, k) for p in ignore) for k in mapped)
