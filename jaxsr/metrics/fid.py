"""FID as pytorch-fid 0.3.0 computes it (the SeeSR and CoSeR papers' FID).

    features = inception_features(params, images)      # [B, 2048], jitted JAX
    mu, sigma = feature_statistics(features)           # float64 numpy
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)

`inception_features` is pytorch-fid's `InceptionV3([3])` with its defaults
`resize_input=True, normalize_input=True`: a bilinear resize of the [0, 1] images to
299x299 (`F.interpolate(mode="bilinear", align_corners=False)`, no antialiasing, so
large images are point-sampled rather than averaged, exactly as pytorch-fid does),
then 2x - 1, then the FID Inception (`jaxsr.metrics.inception`) up to pool3.

The statistics and the distance stay in float64 numpy on the host: a 2048x2048
matrix square root is a scipy job (`scipy.linalg.sqrtm`, as in pytorch-fid), and the
distance is a small difference of large traces that float32 would not resolve.
Params come from `jaxsr.convert.metric_fid.convert`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from jaxsr.metrics.inception import FIDInceptionV3
from jaxsr.nn.resize import torch_resize_bilinear

FEATURES = 2048
INPUT_SIZE = 299
# pytorch-fid's default `eps` for the singular-product retry.
_SQRTM_EPS = 1e-6
# pytorch-fid tolerates this much imaginary part on the diagonal of sqrt(sigma1 sigma2).
_IMAG_ATOL = 1e-3


@jax.jit
def inception_features(params, images):
    """pytorch-fid pool3 features.

    params: the FID Inception's Flax params (`jaxsr.convert.metric_fid.convert`).
    images: float32 [B, H, W, 3] RGB in [0, 1], any H, W (resized to 299x299).
    Returns float32 [B, 2048].
    """
    x = torch_resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
    x = 2.0 * x - 1.0
    return FIDInceptionV3().apply({"params": params}, x)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [2048] and covariance [2048, 2048] (float64, unbiased, rows are samples)
    of a feature matrix [N, 2048], as pytorch-fid's `calculate_activation_statistics`.
    Needs N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64,
    with pytorch-fid's numerics: when the matrix square root is not finite it is
    retried with 1e-6 added to both diagonals; a complex result is accepted (real
    part kept) only while its diagonal's imaginary parts are within 1e-3 of zero.

    Raises ValueError on mismatched shapes or a larger imaginary component.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(
        np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
        np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (
            mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {_SQRTM_EPS} to the "
                      "diagonals", RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * _SQRTM_EPS
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAG_ATOL):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in "
                             "the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(covmean))


def load_reference_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 from a `.npz` with keys `mu` and `sigma`
    (pytorch-fid's `--save-stats` format; D = 2048 for pool3).

    Raises FileNotFoundError, or ValueError naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: FID statistics need keys 'mu' and 'sigma'; missing "
                             f"{missing} (has {sorted(data.files)})")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise ValueError(f"{path}: expected mu [{FEATURES}] and sigma [{FEATURES}, {FEATURES}] "
                         f"(Inception pool3), got mu {list(mu.shape)} and sigma "
                         f"{list(sigma.shape)}")
    return mu, sigma
