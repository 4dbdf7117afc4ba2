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


def psnr_uint8(a, b) -> float:
    """PSNR in dB between two uint8 images of one shape (inf when identical)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


# XLA options for parity tests: the numbers do not depend on LLVM's optimisation level,
# and without it the tiny networks compile in about half the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
