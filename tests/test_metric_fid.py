"""FID: pool3 features and the Frechet distance against pytorch-fid 0.3.0's computation,
the release-file converter's strictness, and the reference-statistics file.

Reference: `tests/fid_reference.py`, pytorch-fid's network restated in plain torch
(pytorch-fid itself imports torchvision, which cannot be installed beside this
project's torch), with seeded random weights; its `state_dict()` is saved to a .pth
and converted by `jaxsr.convert.metric_fid`. The images are real photos from
scikit-image at 64x64, so pytorch-fid's bilinear resize to 299 runs (upsampling).

Cost: the 299x299 Inception forward dominates (about 0.5 s per image per side on
a shared 2-core CPU), so both sides run once, on 32 images, in one fixture.
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


def _randomize(model, seed):
    """He-normal convolutions and BatchNorm statistics and affines away from their
    init (unit scales / zero means would hide a swapped or dropped tensor), scaled so
    the activations stay O(1) through the 94 layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _photos():
    """[32, 64, 64, 3] float32 in [0, 1]: 16 clean 64x64 views of four photos (each a
    128x128 crop averaged 2x2) and the same 16 blurred and noised, the two FID sets."""
    rng = np.random.default_rng(0)
    clean = []
    for photo in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
                  skimage.data.rocket()):
        h, w, _ = photo.shape
        for _ in range(4):
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
    _randomize(model, seed=1)
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
    assert got.shape == (32, 2048) and got.dtype == np.float32
    errors = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
    assert max(errors) <= 1e-5, errors
    # The check is only as strong as the features are image-dependent.
    assert np.std(want, axis=0).mean() > 1e-3 * np.abs(want).mean()


def _subspace_statistics(a, b):
    """Both sets' statistics in an orthonormal basis of the span of their centred
    features and mean difference (<= 31 dimensions for 16 + 16 samples).

    Both covariances and mu_a - mu_b live in that span, so the Frechet distance there
    equals the 2048-d one exactly (it is invariant to orthogonal maps and blind to
    directions where both Gaussians are flat), at the cost of a 31x31 square root
    instead of a 2048x2048 one, which takes a minute on a shared 2-core CPU.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    u, s, _ = np.linalg.svd(np.concatenate([a - mu_a, b - mu_b, (mu_a - mu_b)[None]]).T,
                            full_matrices=False)
    basis = u[:, s > s[0] * 1e-10]
    pa, pb = a @ basis, b @ basis
    return pa.mean(0), np.cov(pa, rowvar=False), pb.mean(0), np.cov(pb, rowvar=False)


def test_fid_matches_pytorch_fid(fid_case):
    """pytorch-fid's formula on the PyTorch features against `frechet_distance` on ours,
    both in their sets' exact subspace (`_subspace_statistics`)."""
    want, got = fid_case["want"].astype(np.float64), fid_case["got"].astype(np.float64)
    ref = fid_reference.frechet_distance(*_subspace_statistics(want[:16], want[16:]))
    fid = frechet_distance(*_subspace_statistics(got[:16], got[16:]))
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
