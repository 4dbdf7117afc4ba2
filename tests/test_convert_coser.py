"""`jaxsr convert --coser --qformer --sd --cfw` on a tiny release with the real key names
(tests/coser_release.py): every network comes from the file the reference's load order
gives it, the folder loads back exactly, and a missing, extra or misshaped key of any
file fails with its name and file. At full size, the released listings convert without
memory (zero-stride arrays)."""

import jax
import numpy as np
import pytest
import torch

from jaxsr.cli import main as cli_main
from jaxsr.convert import coser_weights
from jaxsr.convert.cfw import load_cfw
from jaxsr.convert.coser_cognitive import PRE_SR_PREFIX, VISUAL_PREFIX, load_cognitive
from jaxsr.convert.coser_unet import convert_aia_unet, convert_controlnet
from jaxsr.convert.coser_weights import RELEASED, load_coser_folder, merge_sources, split_source
from jaxsr.convert.networks import load_clip_text, load_vae
from jaxsr.convert.tree import ConversionError
from jaxsr.models.cognitive import TINY_COGNITIVE
from tests.coser_cognitive_reference import TorchMSRResNet, TorchVisionTower
from tests.coser_release import ARCH, write_tiny_coser_release
from tests.keylists import read_listing
from tests.parity import torch_state

CONFIG_ARG = "configs/coser.py:tiny"
LAYERS = ARCH.text_encoder.num_hidden_layers


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_coser_release(tmp_path_factory.mktemp("coser_release"))


def _convert(paths, out, **replace):
    files = {**paths, **replace}
    argv = ["convert", "--coser", str(files["coser"]), "--qformer", str(files["qformer"]),
            "--sd", str(files["sd21"]), "--cfw", str(files["cfw"]),
            "--tokenizer", str(files["tokenizer"]), "--config", CONFIG_ARG,
            "--output", str(out)]
    return cli_main(argv)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("coser_weights")
    assert _convert(release[0], out) == 0
    return out


def _equal_trees(a, b) -> None:
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_tiny_config_is_the_modules_tiny_structure():
    """configs/coser.py "tiny" is the structure the module tests use."""
    assert ARCH.cognitive == TINY_COGNITIVE
    assert ARCH.unet.base.cross_attention_dim == ARCH.text_encoder.hidden_size == 32
    assert ARCH.controlnet.attention_levels == (0, 2)
    again = coser_weights.CoSeRArchitecture.from_module_configs(ARCH.module_configs())
    assert again == ARCH


def test_release_converts_into_one_folder(release, converted, capsys):
    """Every network equals its own converter's output on the file it must come from:
    the UNet, ControlNet, VAE, text tower and cognitive encoder from --coser (which
    overrides --sd's VAE/text and --qformer's encoder), the CFW decoder from --cfw."""
    paths, states, modules = release
    weights = load_coser_folder(converted)
    assert weights.architecture == ARCH
    coser = states["coser"]
    _equal_trees(weights.params["unet"], convert_aia_unet(coser, ARCH.unet))
    _equal_trees(weights.params["controlnet"], convert_controlnet(coser, ARCH.controlnet))
    _equal_trees(weights.params["vae"], load_vae(torch_state(modules["vae"]), ARCH.vae))
    _equal_trees(weights.params["text_encoder"],
                 load_clip_text(torch_state(modules["text"]), ARCH.text_encoder))
    _equal_trees(weights.params["cognitive"], load_cognitive(coser, ARCH.cognitive))
    cfw = load_cfw(modules["cfw"].ldm_state_dict(), ARCH.vae)
    _equal_trees(weights.params["cfw"], cfw.params)
    assert weights.cfw == cfw.cfw
    assert weights.tokenizer_dir is not None and (weights.tokenizer_dir / "vocab.json").is_file()
    from jaxsr.convert.cache import read_manifest

    manifest = read_manifest(converted)
    assert set(manifest["part_sources"].values()) == {f"--coser {paths['coser']}"}
    assert manifest["scheduler_config"]["beta_schedule"] == "scaled_linear"


def test_earlier_files_fill_the_parts_the_coser_file_lacks(release):
    """A CoSeR file without the cognitive encoder, VAE and text tower: the encoder
    comes from the stage-1 file, the VAE and text tower from SD, as the reference's
    load order gives them."""
    _, states, _ = release
    trimmed = {k: v for k, v in states["coser"].items()
               if not k.startswith(("pre_sr_model.", "global_adapter.", "cond_stage_model.",
                                    "first_stage_model."))}
    sources = [split_source(states["sd"], "sd", LAYERS),
               split_source(states["qformer"], "qformer", LAYERS),
               split_source(trimmed, "coser", LAYERS)]
    merged = merge_sources(sources, ARCH)
    assert merged.owners == {"visual": "qformer", "text_encoder": "qformer", "unet": "coser",
                             "controlnet": "coser", "vae": "sd", "pre_sr_model": "qformer",
                             "global_adapter": "qformer"}
    assert merged.replaced["unet"] == ["sd"]
    _equal_trees(merged.params["cognitive"], load_cognitive(states["qformer"], ARCH.cognitive))
    sd_vae = merge_sources([split_source(states["sd"], "sd", LAYERS),
                            split_source(states["coser"], "coser", LAYERS)], ARCH)
    assert not np.array_equal(sd_vae.params["vae"]["decoder"]["conv_in"]["kernel"],
                              merged.params["vae"]["decoder"]["conv_in"]["kernel"])


def _rewrite(path, out, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, out)
    return out


U, CN = "model.diffusion_model.", "structcond_stage_model."


def test_broken_coser_file_names_every_key(release, tmp_path, capsys):
    """One missing, one extra and one misshaped key in three parts, plus a key of no
    CoSeR part: one error (exit 2) naming each with the file."""
    paths = release[0]
    gone = U + "output_blocks.8.1.dubconv_lna.weight"
    bent = CN + "zero_convs.3.0.weight"
    extra = "global_adapter.Qformer.encoder.layer.0.crossattention.self.extra.weight"
    stray = "model_ema.diffusion_modeloutput_blocks0.weight"

    def edit(sd):
        sd.pop(gone)
        sd[bent] = sd[bent][:, :-1]
        sd[extra] = torch.zeros(3)
        sd[stray] = torch.zeros(3)

    broken = _rewrite(paths["coser"], tmp_path / "coser.ckpt", edit)
    assert _convert(paths, tmp_path / "out", coser=broken) == 2
    err = capsys.readouterr().err
    for key in (gone, bent, extra, stray):
        assert key in err
    assert str(broken) in err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("which, edit, key", [
    ("qformer", lambda sd: sd.__setitem__(VISUAL_PREFIX + "extra", torch.zeros(1)),
     VISUAL_PREFIX + "extra"),
    ("sd21", lambda sd: sd.pop("first_stage_model.decoder.conv_in.bias"),
     "first_stage_model.decoder.conv_in.bias"),
    ("cfw", lambda sd: sd.pop("decoder.fusion_layer_1.encode_enc_2.0.rdb1.conv1.weight"),
     "decoder.fusion_layer_1.encode_enc_2.0.rdb1.conv1.weight"),
])
def test_broken_earlier_files_are_named(release, tmp_path, capsys, which, edit, key):
    """Keys of parts a later file replaces are still checked when they are not
    replaced: here the CoSeR file lacks the part, so the earlier file's error shows."""
    paths, states, _ = release
    drop = {"qformer": "cond_stage_model.model.visual.", "sd21": "first_stage_model.",
            "cfw": None}[which]
    coser = paths["coser"]
    if drop is not None:
        coser = _rewrite(coser, tmp_path / "coser.ckpt",
                         lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(drop)])
    broken = _rewrite(paths[which], tmp_path / f"broken_{which}.ckpt", edit)
    assert _convert(paths, tmp_path / "out", coser=coser, **{which: broken}) == 2
    err = capsys.readouterr().err
    assert key in err and str(broken) in err


def test_a_part_in_no_file_is_named(release):
    _, states, _ = release
    no_cn = {k: v for k, v in states["coser"].items() if not k.startswith(CN)}
    with pytest.raises(ConversionError, match=r"structcond_stage_model\.\*"):
        merge_sources([split_source(states["sd"], "sd", LAYERS),
                       split_source(no_cn, "coser", LAYERS)], ARCH)


def test_coser_needs_the_qformer_file(release, tmp_path, capsys):
    paths = release[0]
    argv = ["convert", "--coser", str(paths["coser"]), "--sd", str(paths["sd21"]),
            "--output", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    assert "--qformer" in capsys.readouterr().err


def _zeros(shape):
    return np.broadcast_to(np.zeros((), np.float32), shape)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_full_size_release_listings_convert():
    """SD 2.1's single-file listing and a CoSeR checkpoint made of the released listings
    (AiA UNet, ControlNet, Q-Former; SRResNet and ViT-H tower from the torch references
    on the meta device; SD's VAE/text/buffers) convert strictly at full size, each
    part from the CoSeR file."""
    sd = {k: _zeros(s) for k, s in read_listing("sd21_ldm_single_file.tsv").items()}
    with torch.device("meta"):
        sr = TorchMSRResNet(RELEASED.cognitive.srresnet)
        tower = TorchVisionTower(RELEASED.cognitive.vision)
    coser = {k: _zeros(s) for name in ("coser_unet.tsv", "coser_cn.tsv", "coser_qformer.tsv")
             for k, s in read_listing(name).items()}
    coser.update({PRE_SR_PREFIX + k: _zeros(v.shape) for k, v in sr.state_dict().items()})
    coser.update({VISUAL_PREFIX + k: _zeros(v.shape) for k, v in tower.state_dict().items()})
    coser.update({k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")})
    merged = merge_sources([split_source(sd, "sd", 23), split_source(coser, "coser", 23)])
    counts = {name: _count(p) for name, p in merged.params.items()}
    assert counts == {"unet": 981_533_764, "controlnet": 344_121_280, "vae": 83_653_863,
                      "text_encoder": 340_387_840,
                      "cognitive": 1_517_571 + 632_076_800 + 258_582_528}
    assert set(merged.owners.values()) == {"coser"}
