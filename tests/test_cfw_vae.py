"""StableSR's CFW autoencoder (jaxsr.models.cfw_vae) against the PyTorch reference in
tests/cfw_reference.py (random weights, float32), and its strict checkpoint
conversion (jaxsr.convert.cfw)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsr.convert.cfw import cfw_key, checkpoint_name, infer_cfw_config, load_cfw
from jaxsr.convert.tree import ConversionError
from jaxsr.models.cfw_vae import CFWAutoencoderKL, CFWConfig, fusion_param_count
from jaxsr.models.vae import SD2_VAE, AutoencoderKL, VAEConfig
from tests.cfw_reference import FuseBlock, TorchCFW
from tests.keylists import read_listing
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err
from tests.test_unet import randomize_
from tests.test_vae import TINY

GROW, RRDB_BLOCKS = 8, 2   # grow 8 (not 32) so no fusion conv shape is square by accident
WEIGHTS = (0.5, 1.0, 0.0)
# What a Lightning checkpoint of AutoencoderKLResi carries besides the model.
LOSS_KEYS = ("loss.logvar", "loss.perceptual_loss.net.slice1.0.weight",
             "loss.perceptual_loss.lin0.model.1.weight", "loss.discriminator.main.0.weight")


@pytest.fixture(scope="module")
def tiny():
    """Torch reference, its checkpoint-named state dict, the converted Flax weights."""
    torch.manual_seed(0)
    ref = TorchCFW(diffusers.AutoencoderKL(**TINY), RRDB_BLOCKS, GROW).eval()
    randomize_(ref, seed=3)
    state = ref.ldm_state_dict()
    cfg = VAEConfig.from_diffusers_config(dict(ref.vae.config))
    ckpt = {"state_dict": {**state, **{k: np.ones(2, np.float32) for k in LOSS_KEYS}},
            "epoch": 11}
    weights = load_cfw(ckpt, cfg)
    return ref, state, weights


@pytest.fixture(scope="module")
def outputs(tiny):
    """Both sides on one 64×48 image pair (non-square) and one latent, every fusion
    weight in one compiled program (the first through the default, w=None)."""
    ref, _, (cfg, cfw, params) = tiny
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32)
    z = rng.standard_normal((2, 4, 8, 6)).astype(np.float32)
    model, plain = CFWAutoencoderKL(cfg, cfw=cfw), AutoencoderKL(cfg)
    vae_params = {k: v for k, v in params.items() if not k.startswith("fusion_layer_")}

    @jax.jit
    def run(params, vae_params, x, z):
        post, feats = model.apply({"params": params}, x, method="encode_with_features")
        only = model.apply({"params": params}, x, method="encode_features")
        decode = lambda w: model.apply({"params": params}, z, feats, w, method="decode_cfw")
        # WEIGHTS[0] is CFWConfig's default; the others share one compiled decoder body.
        assert WEIGHTS[0] == cfw.fusion_weight
        dec = [decode(None), *jax.lax.map(decode, jnp.asarray(WEIGHTS[1:]))]
        return dict(feats=feats, only=only, mean=post.mean, dec=dec,
                    plain_mean=plain.apply({"params": vae_params}, x, method="encode").mean,
                    plain_dec=plain.apply({"params": vae_params}, z, method="decode"))

    got = run(params, vae_params, nchw_to_nhwc(image), nchw_to_nhwc(z))
    with torch.no_grad():
        moments, feats = ref.encode(torch.from_numpy(image))
        tz = torch.from_numpy(z)
        want = dict(feats=[f.numpy() for f in feats], mean=moments[:, :4].numpy(),
                    dec=[ref.decode(tz, feats, w).numpy() for w in WEIGHTS],
                    diffusers_dec=ref.vae.decode(tz).sample.numpy(),
                    diffusers_mean=ref.vae.encode(torch.from_numpy(image)).latent_dist.mean)
    return jax.device_get(got), want


def test_reference_without_fusion_is_diffusers(outputs):
    """The reference re-runs diffusers' modules step by step; w = 0 must give back
    diffusers' own decode, and its posterior mean diffusers' encode."""
    _, want = outputs
    np.testing.assert_array_equal(want["dec"][2], want["diffusers_dec"])
    np.testing.assert_array_equal(want["mean"], want["diffusers_mean"].numpy())


def test_encoder_features_match_torch(outputs):
    got, want = outputs
    assert [f.shape for f in got["feats"]] == [(2, 32, 24, 16), (2, 16, 12, 32)]
    errors = [rel_err(nhwc_to_nchw(g), w) for g, w in zip(got["feats"], want["feats"])]
    errors.append(rel_err(nhwc_to_nchw(got["mean"]), want["mean"]))
    assert max(errors) <= 1e-5, errors
    for a, b in zip(got["only"], got["feats"], strict=True):
        np.testing.assert_array_equal(a, b)
    # The feature pass leaves the posterior as the plain VAE's.
    np.testing.assert_array_equal(got["mean"], got["plain_mean"])


@pytest.mark.parametrize("k", [0, 1], ids=["w=0.5", "w=1.0"])
def test_cfw_decode_matches_torch(outputs, k):
    got, want = outputs
    err = rel_err(nhwc_to_nchw(got["dec"][k]), want["dec"][k])
    assert err <= 1e-5, err
    # The fusion really changes the image (so the check above is not the plain decoder's).
    assert rel_err(want["dec"][k], want["dec"][2]) > 0.05


def test_zero_weight_is_the_plain_decoder(outputs):
    got, _ = outputs
    np.testing.assert_array_equal(got["dec"][2], got["plain_dec"])


def test_checkpoint_names_round_trip(tiny):
    _, state, _ = tiny
    for key in state:
        assert checkpoint_name(cfw_key(key, 4)[0], 4) == key


def test_fusion_shape_is_read_off_the_tensors(tiny):
    _, state, (cfg, cfw, params) = tiny
    assert cfw == CFWConfig(rrdb_blocks=RRDB_BLOCKS, grow_channels=GROW)
    assert sorted(params) == ["decoder", "encoder", "fusion_layer_1", "fusion_layer_2",
                              "post_quant_conv", "quant_conv"]
    # StableSR's loader also takes the SD-style prefix.
    prefixed = load_cfw({f"first_stage_model.{k}": v for k, v in state.items()}, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, prefixed.params, params)
    renamed = {cfw_key(k, 4)[0]: v for k, v in state.items()}
    assert infer_cfw_config(renamed) == cfw


def test_conversion_is_strict(tiny):
    _, state, (cfg, _, _) = tiny
    state = dict(state)
    gone = ["decoder.fusion_layer_2.encode_enc_2.1.rdb3.conv5.bias",
            "decoder.fusion_layer_1.encode_enc_1.conv_out.weight",
            "decoder.mid.attn_1.q.weight", "decoder.up.1.block.0.nin_shortcut.weight"]
    for k in gone:
        del state[k]
    extra = ["decoder.fusion_layer_3.encode_enc_1.conv1.weight", "encoder.extra.weight",
             "decoder.fusion_layer_1.encode_enc_2.2.rdb1.conv1.weight"]
    for k in extra:
        state[k] = np.zeros(3, np.float32)
    bad = "decoder.fusion_layer_1.encode_enc_2.0.rdb2.conv3.weight"
    state[bad] = np.zeros((GROW, 16 + 2 * GROW, 3, 1), np.float32)
    with pytest.raises(ConversionError) as err:
        load_cfw({"state_dict": state}, cfg, CFWConfig(grow_channels=GROW))
    assert sorted(err.value.missing) == sorted(gone)
    assert sorted(err.value.unexpected) == sorted(extra)
    assert err.value.mismatched == [f"{bad}: [8, 32, 3, 1] vs [8, 32, 3, 3]"]
    assert bad in str(err.value) and gone[0] in str(err.value)


def test_full_size_layout_and_parameter_count():
    """SD's VAE keys from the recorded single-file listing plus the reference fusion
    layers at full width convert strictly into SD2_VAE + CFWConfig(); the fusion
    layers add 44,393,728 parameters (44.4M)."""
    shapes = {k.removeprefix("first_stage_model."): s
              for k, s in read_listing("sd21_ldm_single_file.tsv").items()
              if k.startswith("first_stage_model.")}
    with torch.device("meta"):
        fusion = {1: FuseBlock(256, 32, 2, 32), 2: FuseBlock(512, 32, 2, 32)}
    for level, block in fusion.items():
        shapes.update({f"decoder.fusion_layer_{level}.{k}": tuple(v.shape)
                       for k, v in block.state_dict().items()})
    torch_count = sum(p.numel() for b in fusion.values() for p in b.parameters())
    assert torch_count == fusion_param_count(SD2_VAE, CFWConfig()) == 44_393_728
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    weights = load_cfw(state, SD2_VAE)
    assert weights.cfw == CFWConfig()
    assert len(jax.tree_util.tree_leaves(weights.params)) == len(shapes)
