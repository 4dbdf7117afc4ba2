"""LPIPS (AlexNet, VGG16) and DISTS against PyTorch references, and their converters.

References: plain-torch compositions in `tests/metric_references.py`, not the `lpips` and
`DISTS_pytorch` classes themselves. Those import torchvision, and torchvision installed
beside this torch breaks the transformers and diffusers imports of the rest of the suite,
so it is not a test dependency. The two wheels are still installed (`--no-deps`, never
imported) for their real weight files: lpips's v0.1 heads `alex.pth` / `vgg.pth` and
DISTS's `weights.pt`. The trunks are random (seeded, He-normal, non-zero biases), saved
in torchvision's file layout and converted from that file like a user's download.

Scores: float32, per image, within 1e-5 relative of the reference on four pairs of 64x80
crops of scikit-image's photos (noise, x4 down-up, blur + noise, two different photos).
DISTS is held to the reference run in float64 (the same module and weights in double):
its float32 form cancels (see `jaxsr.metrics.dists`), so on similar images the float32
reference is itself ~2e-5 from the exact score, while jaxsr's stays within 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from jaxsr.convert import metric_dists, metric_lpips
from jaxsr.convert.cache import load_converted, save_converted
from jaxsr.convert.tree import ConversionError
from jaxsr.metrics.dists import dists
from jaxsr.metrics.lpips import lpips
from tests import metric_references as R
from tests.parity import FAST_COMPILE, nhwc_to_nchw

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) ships "
                                   "the photos these tests score")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 64, 80     # not square, so a height/width mix-up cannot pass
REL_TOL = 1e-5


def _crop(photo: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """A (size, size * W / H) window of a uint8 photo, resized to (H, W) float32 in [0, 1]."""
    window = photo[top:top + size, left:left + size * W // H]
    small = Image.fromarray(window).resize((W, H), Image.BICUBIC)
    return np.asarray(small, np.float32) / 255


def _blur(img: np.ndarray) -> np.ndarray:
    """5x5 box blur, edges replicated."""
    p = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="edge")
    return sum(p[i:i + H, j:j + W] for i in range(5) for j in range(5)) / 25


def _down_up(img: np.ndarray) -> np.ndarray:
    """x4 bicubic down and up again: what a super-resolution model starts from."""
    u8 = Image.fromarray(np.round(img * 255).astype(np.uint8))
    small = u8.resize((W // 4, H // 4), Image.BICUBIC).resize((W, H), Image.BICUBIC)
    return np.asarray(small, np.float32) / 255


@pytest.fixture(scope="module")
def pairs():
    """sr, hr: (4, H, W, 3) float32 in [0, 1]; four distinct pairs of real photos."""
    rng = np.random.default_rng(0)
    astronaut = _crop(skimage_data.astronaut(), 0, 100, 256)
    chelsea = _crop(skimage_data.chelsea(), 20, 60, 240)
    coffee = _crop(skimage_data.coffee(), 50, 100, 300)
    noise = lambda img, s: np.clip(img + s * rng.standard_normal(img.shape), 0, 1)
    hr = np.stack([astronaut, chelsea, coffee, astronaut])
    sr = np.stack([noise(astronaut, 0.15), _down_up(chelsea), noise(_blur(coffee), 0.1), chelsea])
    return sr.astype(np.float32), hr.astype(np.float32)


def _save(state: dict, path):
    torch.save({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def lpips_setups(tmp_path_factory):
    """{net: (reference module, [trunk file, head file])}; the reference holds the same
    trunk and lpips's real heads."""
    out = {}
    for seed, net in enumerate(("alex", "vgg")):
        ref = R.LPIPSReference(net)
        R.randomize_trunk(ref.features, seed)
        d = tmp_path_factory.mktemp(f"lpips_{net}")
        trunk = _save(R.torchvision_file_state(ref.features, seed),
                      d / ("alexnet-owt-7be5be79.pth" if net == "alex" else "vgg16-397923af.pth"))
        head = R.lpips_head_file(net)
        heads = torch.load(head, map_location="cpu", weights_only=True)
        missing, unexpected = ref.load_state_dict(heads, strict=False)
        assert not unexpected and all(k.startswith("features.") for k in missing)
        out[net] = ref, [trunk, head]
    return out


@pytest.fixture(scope="module")
def dists_setup(tmp_path_factory):
    """(reference module, [trunk file, DISTS's weights.pt])."""
    ref = R.DISTSReference()
    R.randomize_trunk(ref.features, 7)
    weights = R.dists_weights_file()
    w = torch.load(weights, map_location="cpu", weights_only=True)
    with torch.no_grad():
        ref.alpha.copy_(w["alpha"])
        ref.beta.copy_(w["beta"])
    trunk = _save(R.torchvision_file_state(ref.features, 7),
                  tmp_path_factory.mktemp("dists") / "vgg16-397923af.pth")
    return ref, [trunk, weights]


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def _per_image_rel(out, want) -> np.ndarray:
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    assert out.shape == want.shape, (out.shape, want.shape)
    return np.abs(out - want) / np.abs(want)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_reference(lpips_setups, pairs, net):
    ref, files = lpips_setups[net]
    config, params = metric_lpips.convert(files)
    assert config == {"net": net}
    sr, hr = pairs
    with torch.no_grad():
        want = ref(torch.from_numpy(nhwc_to_nchw(sr)), torch.from_numpy(nhwc_to_nchw(hr)))
    fn = _compile(lambda p, a, b: lpips(p, a, b, net=net), params, sr, hr)
    out = fn(params, sr, hr)
    assert out.shape == (4,) and out.dtype == jnp.float32
    rel = _per_image_rel(out, want.numpy())
    print(f"lpips-{net}: scores {np.asarray(out)}, max per-image relative error {rel.max():.2e}")
    assert rel.max() < REL_TOL, rel
    # The pairs differ: equal scores would mean the metric ignores its inputs.
    assert len(set(np.round(want.numpy(), 6))) == 4


def _dists_reference(ref, sr, hr, dtype) -> np.ndarray:
    """The reference module's scores with every tensor in `dtype` (a float64 copy for
    the exact value)."""
    import copy

    model = copy.deepcopy(ref).to(dtype)
    model.mean, model.std = model.mean.to(dtype), model.std.to(dtype)
    with torch.no_grad():
        return model(torch.from_numpy(nhwc_to_nchw(sr)).to(dtype),
                     torch.from_numpy(nhwc_to_nchw(hr)).to(dtype)).numpy()


def _similar_pairs() -> tuple[np.ndarray, np.ndarray]:
    """(sr, hr): four photos and their x4 bicubic round trips, the low DISTS scores
    (~0.01) of a super-resolution table, where the float32 formula cancels most."""
    hr = np.stack([_crop(skimage_data.astronaut(), 0, 100, 256),
                   _crop(skimage_data.chelsea(), 20, 60, 240),
                   _crop(skimage_data.coffee(), 50, 100, 300),
                   _crop(skimage_data.rocket(), 100, 50, 200)])
    return np.stack([_down_up(x) for x in hr]).astype(np.float32), hr.astype(np.float32)


def test_dists_matches_reference(dists_setup, pairs):
    ref, files = dists_setup
    config, params = metric_dists.convert(files)
    assert config == {"net": "vgg16"}
    for name, (sr, hr) in (("distinct", pairs), ("similar", _similar_pairs())):
        exact = _dists_reference(ref, sr, hr, torch.float64)
        want = _dists_reference(ref, sr, hr, torch.float32)
        fn = _compile(dists, params, sr, hr)
        out = fn(params, sr, hr)
        assert out.shape == (4,) and out.dtype == jnp.float32
        rel = _per_image_rel(out, exact)
        rel32 = _per_image_rel(want, exact)
        print(f"dists ({name}): scores {np.asarray(out)}, max per-image relative error "
              f"{rel.max():.2e} (float32 reference: {rel32.max():.2e})")
        assert rel.max() < REL_TOL, (name, rel)
        # The float32 reference agrees within its own rounding of the cancelling form.
        assert _per_image_rel(out, want).max() < 1e-4, name
        assert len(set(np.round(exact, 6))) == 4


def test_lpips_batch_sharded_over_host_devices(lpips_setups, pairs):
    """The same scores with the batch split over four CPU devices (one pair each)."""
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip(f"needs 4 host devices, found {len(devices)}")
    _, files = lpips_setups["alex"]
    _, params = metric_lpips.convert(files)
    sr, hr = pairs
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params_d = jax.device_put(params, replicated)
    sr_d, hr_d = jax.device_put(sr, batch), jax.device_put(hr, batch)
    fn = _compile(lambda p, a, b: lpips(p, a, b, net="alex"), params_d, sr_d, hr_d)
    out = fn(params_d, sr_d, hr_d)
    assert out.sharding.is_equivalent_to(batch, 1)
    single = _compile(lambda p, a, b: lpips(p, a, b, net="alex"), params, sr, hr)(params, sr, hr)
    assert _per_image_rel(out, single).max() < REL_TOL


def _leaves_equal(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_pyiqa_single_file_converts_alike(lpips_setups, tmp_path, net):
    ref, files = lpips_setups[net]
    _, params = metric_lpips.convert(files)
    trunk = torch.load(files[0], weights_only=True)
    heads = torch.load(files[1], map_location="cpu", weights_only=True)
    single = _save(R.pyiqa_lpips_state(trunk, heads, net), tmp_path / f"LPIPS_v0.1_{net}.pth")
    config, single_params = metric_lpips.convert([single])
    assert config == {"net": net}
    _leaves_equal(params, single_params)


def test_dists_pyiqa_single_file_converts_alike(dists_setup, tmp_path):
    ref, files = dists_setup
    _, params = metric_dists.convert(files)
    single = _save(R.pyiqa_dists_state(ref), tmp_path / "DISTS_weights.pth")
    _, single_params = metric_dists.convert([single])
    _leaves_equal(params, single_params)


def test_converted_weights_store_and_load(lpips_setups, dists_setup, tmp_path):
    """The eval command's cache round trip keeps every array and the config."""
    _, lp_files = lpips_setups["vgg"]
    _, ds_files = dists_setup
    modules = {"lpips-vgg": metric_lpips.convert(lp_files), "dists": metric_dists.convert(ds_files)}
    save_converted(tmp_path / "w", modules, sources=[*lp_files, *ds_files])
    loaded = load_converted(tmp_path / "w")
    for name, (config, params) in modules.items():
        assert loaded[name][0] == config
        _leaves_equal(params, loaded[name][1])


def _edited(path, tmp_path, edit):
    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    return _save(state, tmp_path / path.name)


def test_lpips_conversion_names_every_bad_key(lpips_setups, tmp_path):
    _, (trunk, head) = lpips_setups["alex"]

    def edit(state):
        del state["features.3.bias"]                              # missing
        state["features.5.weight"] = torch.zeros(3)               # unexpected (a max-pool)
        state["features.8.weight"] = torch.zeros(256, 384, 3, 1)  # misshaped

    with pytest.raises(ConversionError) as e:
        metric_lpips.convert([_edited(trunk, tmp_path, edit), head])
    # A misshaped tensor leaves its leaf unfilled, so it is listed as missing too.
    assert e.value.missing == ["net.features.3.bias", "net.features.8.weight"]
    assert e.value.unexpected == ["net.features.5.weight"]
    assert len(e.value.mismatched) == 1 and "net.features.8.weight" in e.value.mismatched[0]
    assert "[256, 384, 3, 1] vs [256, 384, 3, 3]" in str(e.value)


def test_lpips_conversion_checks_heads_net_and_constants(lpips_setups, tmp_path):
    _, (alex_trunk, alex_head) = lpips_setups["alex"]
    _, (_, vgg_head) = lpips_setups["vgg"]
    # AlexNet trunk with VGG16's heads: the trunk decides the net, every head misfits.
    with pytest.raises(ConversionError) as e:
        metric_lpips.convert([alex_trunk, vgg_head])
    assert {m.split(":")[0] for m in e.value.mismatched} == {
        f"lin{k}.model.1.weight" for k in range(1, 5)}    # lin0 has 64 channels in both
    # Heads without a trunk.
    with pytest.raises(ConversionError) as e:
        metric_lpips.convert([alex_head])
    assert "net.features.0.weight" in e.value.missing and "net.features.10.bias" in e.value.missing
    # The same key in two files.
    with pytest.raises(ConversionError, match=r"lin0.model.1.weight \(given twice"):
        metric_lpips.convert([alex_trunk, alex_head, vgg_head])
    # pyiqa's single file with a scaling constant that LPIPS does not use.
    trunk = torch.load(alex_trunk, weights_only=True)
    heads = torch.load(alex_head, map_location="cpu", weights_only=True)
    state = R.pyiqa_lpips_state(trunk, heads, "alex")
    state["scaling_layer.scale"] = state["scaling_layer.scale"] * 2
    with pytest.raises(ConversionError, match="scaling_layer.scale: values"):
        metric_lpips.convert([_save(state, tmp_path / "LPIPS_v0.1_alex.pth")])


def test_dists_conversion_names_every_bad_key(dists_setup, tmp_path):
    ref, (trunk, weights) = dists_setup

    def edit(state):
        del state["features.28.weight"]                            # missing
        state["features.30.bias"] = torch.zeros(3)                 # unexpected (a pool)
        state["features.0.bias"] = torch.zeros(63)                 # misshaped

    with pytest.raises(ConversionError) as e:
        metric_dists.convert([_edited(trunk, tmp_path, edit), weights])
    assert e.value.missing == ["net.features.0.bias", "net.features.28.weight"]
    assert e.value.unexpected == ["net.features.30.bias"]
    assert e.value.mismatched == ["net.features.0.bias: [63] vs [64]"]
    # No weights.pt: alpha and beta missing.
    with pytest.raises(ConversionError) as e:
        metric_dists.convert([trunk])
    assert e.value.missing == ["alpha", "beta"]
    # pyiqa's single file with a wrong L2-pooling window.
    state = R.pyiqa_dists_state(ref)
    state["stage3.9.filter"] = torch.ones_like(state["stage3.9.filter"]) / 9
    with pytest.raises(ConversionError, match="stage3.9.filter: values"):
        metric_dists.convert([_save(state, tmp_path / "DISTS_weights.pth")])
    # pyiqa's file holds the trunk: a torchvision trunk beside it is ambiguous.
    single = _save(R.pyiqa_dists_state(ref), tmp_path / "DISTS_weights.pth")
    with pytest.raises(ConversionError) as e:
        metric_dists.convert([trunk, single])
    assert len(e.value.unexpected) == 26     # the 13 convs' weights and biases
    assert ("net.features.0.weight (given twice: features.0.weight in vgg16-397923af.pth, "
            "stage1.0.weight in DISTS_weights.pth)") in e.value.unexpected
