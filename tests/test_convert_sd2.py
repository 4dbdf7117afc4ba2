"""SD2 weights in both PyTorch layouts -> the same Flax params -> the same outputs;
export back to diffusers; the converted-weights folder; `jaxsr convert`."""

import json

import diffusers
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from jaxsr.cli import main as cli_main
from jaxsr.convert.cache import load_converted, read_manifest, save_converted, stale_sources
from jaxsr.convert.export import export_diffusers
from jaxsr.convert.safetensors_io import write_safetensors
from jaxsr.convert.sd2 import load_sd2, load_sd2_converted, sd2_modules
from jaxsr.models.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsr.models.unet import UNet2DConditionModel, UNetConfig
from jaxsr.models.vae import AutoencoderKL
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
    unet, vae, text, _, weights = tiny
    assert weights.scheduler_config["beta_schedule"] == "scaled_linear"
    _outputs_match_torch(weights, unet, vae, text)


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


def test_single_file_config_inference_uses_sd2_head_width(tiny, tmp_path):
    unet, vae, text, _, weights = tiny
    path = tmp_path / "v2.safetensors"
    write_safetensors(path, single_file_state(unet, vae, text))
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        # Tiny widths do not fit SD2's 32 norm groups: without an explicit config the
        # load fails with a message that says why.
        load_sd2(path)
    cfg = load_sd2(path, **_overrides(weights)).text_encoder[0]
    assert cfg == CLIPTextConfig.from_hf_config(TEXT_TINY)


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


def test_converted_folder_round_trip_and_staleness(tiny, tmp_path):
    unet, vae, text, root, weights = tiny
    out = save_converted(tmp_path / "conv", sd2_modules(weights), sources=weights.sources,
                         extra={"scheduler_config": weights.scheduler_config})
    manifest = read_manifest(out)
    assert manifest["dtype"] == "float32"
    assert manifest["modules"]["unet"]["parameters"] == sum(
        p.numel() for p in unet.parameters())
    assert {s["path"] for s in manifest["sources"]} == {str(p.resolve()) for p in weights.sources}
    loaded = load_sd2_converted(out)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_params(getattr(loaded, name)[1], getattr(weights, name)[1])
        assert getattr(loaded, name)[0] == getattr(weights, name)[0]
    assert stale_sources(manifest) == []
    # A bfloat16 folder stores half the bytes and casts on save.
    bf = save_converted(tmp_path / "bf16", sd2_modules(weights), sources=[], dtype="bfloat16")
    size = lambda folder: (folder / "unet.safetensors").stat().st_size
    assert size(bf) < 0.6 * size(out)
    # Touching a source is detected.
    src = weights.sources[0]
    copy = tmp_path / "src.safetensors"
    copy.write_bytes(src.read_bytes())
    out2 = save_converted(tmp_path / "conv2", {"unet": sd2_modules(weights)["unet"]},
                          sources=[copy])
    with open(copy, "ab") as f:
        f.write(b"x")
    assert stale_sources(read_manifest(out2)) == [str(copy.resolve())]
    with pytest.raises(Exception, match="changed since conversion"):
        load_converted(out2, check_sources=True)


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


def test_unet_config_inferred_from_full_size_listing():
    """The released SD2 single file's shapes give SD2-base's UNet config."""
    from jaxsr.convert.ldm import split_single_file
    from jaxsr.convert.sd2 import _ldm_layers_per_block, infer_text_config, infer_unet_config
    from tests.keylists import read_listing

    state = {k: np.broadcast_to(np.float32(0), s) for k, s in
             read_listing("sd21_ldm_single_file.tsv").items()}
    parts = split_single_file(state, unet_layers_per_block=_ldm_layers_per_block(state))
    assert infer_unet_config(parts["unet"]) == UNetConfig()
    assert infer_text_config(parts["text_encoder"]) == CLIPTextConfig()
