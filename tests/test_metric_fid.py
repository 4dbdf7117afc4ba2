"""FID: pool3 features and the Frechet distance against pytorch-fid 0.3.0's computation,
the release-file converter's strictness, and the reference-statistics file.

Reference: `tests/fid_reference.py`, pytorch-fid's network restated in plain torch
(pytorch-fid itself imports torchvision, which cannot be installed beside this
project's torch), with seeded random weights; its `state_dict()` is saved to a .pth
and converted by `jaxsr.convert.metric_fid`. The images are real photos from
scikit-image at 64x64, so pytorch-fid's bilinear resize to 299 runs (upsampling).

Cost: the 299x299 Inception forward dominates (about 0.2 s per image per side on a
2-core CPU), so both sides run once, on 64 images, in one fixture.
"""

import jax
import numpy as np
import pytest
import skimage.data
import torch

from jaxsr.convert.metric_fid import convert
from jaxsr.convert.tree import ConversionError
from jaxsr.metrics.fid import (
    feature_statistics,
    frechet_distance,
    inception_features,
    load_reference_statistics,
)
from tests import fid_reference
from tests.parity import nhwc_to_nchw, rel_err

RELEASE_NAME = "pt_inception-2015-12-05-6726825d.pth"


def _photos():
    """[64, 64, 64, 3] float32 in [0, 1]: 32 clean 64x64 views of four photos (each a
    128x128 crop averaged 2x2) and the same 32 blurred and noised, the two FID sets."""
    rng = np.random.default_rng(0)
    clean = []
    for photo in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
                  skimage.data.rocket()):
        h, w, _ = photo.shape
        for _ in range(8):
            y, x = rng.integers(0, h - 128), rng.integers(0, w - 128)
            crop = photo[y:y + 128, x:x + 128].astype(np.float64) / 255.0
            clean.append(crop.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3)))
    clean = np.stack(clean)
    # 3x3 box blur (edge-padded) plus Gaussian noise: a visible, FID-raising distortion.
    padded = np.pad(clean, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9
    noisy = np.clip(blurred + rng.normal(0, 0.05, blurred.shape), 0, 1)
    return np.concatenate([clean, noisy]).astype(np.float32)


@pytest.fixture(scope="module")
def fid_case(tmp_path_factory):
    torch.manual_seed(0)
    model = fid_reference.FIDInception().eval()
    fid_reference.randomize(model, seed=1)
    path = tmp_path_factory.mktemp("fid") / RELEASE_NAME
    torch.save(model.state_dict(), path)
    config, params = convert([path])
    images = _photos()
    with torch.no_grad():
        want = fid_reference.pool3_features(model, torch.from_numpy(nhwc_to_nchw(images)))
    got = np.asarray(inception_features(jax.device_put(params), images))
    return dict(path=path, config=config, want=want.numpy(), got=got)


def test_pool3_features_match_pytorch_fid(fid_case):
    want, got = fid_case["want"], fid_case["got"]
    assert got.shape == (64, 2048) and got.dtype == np.float32
    errors = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
    print(f"pool3 features: max relative error {max(errors):.2e} over {len(errors)} images")
    assert max(errors) <= 1e-5, errors
    # The check is only as strong as the features are image-dependent.
    assert np.std(want, axis=0).mean() > 1e-3 * np.abs(want).mean()


def test_fid_matches_pytorch_fid(fid_case):
    """pytorch-fid's formula on the PyTorch features against `frechet_distance` on ours,
    both in their sets' exact subspace (`fid_reference.subspace_statistics`)."""
    want, got = fid_case["want"].astype(np.float64), fid_case["got"].astype(np.float64)
    subspace = fid_reference.subspace_statistics
    ref = fid_reference.frechet_distance(*subspace(want[:32], want[32:]))
    fid = frechet_distance(*subspace(got[:32], got[32:]))
    print(f"FID {fid:.6f} vs pytorch-fid {ref:.6f}: relative {abs(fid - ref) / ref:.2e}")
    assert ref > 0 and abs(fid - ref) <= 1e-4 * ref, (fid, ref)


def test_config_of_the_release_file(fid_case):
    assert fid_case["config"] == {"net": "fid_inception_v3", "features": 2048}


def test_frechet_distance_of_diagonal_gaussians():
    """With diagonal covariances sqrt(S1 S2) is diagonal, so the distance has a closed
    form: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, np.diag(s1), mu2[:5], np.diag(s2[:5]))


def test_feature_statistics_are_numpys_mean_and_unbiased_covariance():
    f = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    mu, sigma = feature_statistics(f)
    centred = f.astype(np.float64) - f.astype(np.float64).mean(0)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, centred.T @ centred / 4, rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(f[:1])


def test_reference_statistics_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    mu, a = rng.normal(size=2048), rng.normal(size=(2048, 8))
    sigma = a @ a.T
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    got_mu, got_sigma = load_reference_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)

    np.savez(tmp_path / "small.npz", mu=mu[:64], sigma=sigma[:64, :64])
    with pytest.raises(ValueError, match=r"small\.npz.*mu \[64\] and sigma \[64, 64\]"):
        load_reference_statistics(tmp_path / "small.npz")
    np.savez(tmp_path / "nosigma.npz", mu=mu)
    with pytest.raises(ValueError, match=r"missing \['sigma'\]"):
        load_reference_statistics(tmp_path / "nosigma.npz")
    with pytest.raises(FileNotFoundError):
        load_reference_statistics(tmp_path / "absent.npz")


def test_converter_names_missing_unexpected_and_misshaped_keys(fid_case, tmp_path):
    state = torch.load(fid_case["path"], weights_only=True)
    # Accepted and unused: the classifier, an auxiliary head, BatchNorm counters.
    assert "fc.weight" in state and "Conv2d_1a_3x3.bn.num_batches_tracked" in state
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["Mixed_5b.extra.weight"] = torch.zeros(3)
    state["Mixed_7c.branch_pool.bn.running_var"] = torch.ones(191)
    bad = tmp_path / RELEASE_NAME
    torch.save(state, bad)
    with pytest.raises(ConversionError) as err:
        convert([bad])
    e = err.value
    # A misshaped tensor leaves its parameter unfilled, so it is listed as missing too.
    assert e.missing == ["Mixed_6b.branch7x7_2.conv.weight",
                         "Mixed_7c.branch_pool.bn.running_var"]
    assert e.unexpected == ["Mixed_5b.extra.weight"]
    assert e.mismatched == ["Mixed_7c.branch_pool.bn.running_var: [191] vs [192]"]
    with pytest.raises(ConversionError, match="exactly one file"):
        convert([bad, bad])
