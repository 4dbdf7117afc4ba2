"""Helpers shared by the PyTorch parity tests."""

import numpy as np


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| over all elements, in float64."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def torch_state(module) -> dict:
    """A torch module's state dict as float32 numpy arrays (what the loaders return)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))
