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


def assert_within_levels(a, b, *, levels: int = 1, fraction: float = 0.01, what: str = ""):
    """Two uint8 images of one shape differ by at most `levels` grey levels on at most
    `fraction` of their values.

    For outputs of different compiled programs (another batch size, device count or
    program): XLA:CPU picks its float32 tiling and instructions per program and per CPU
    (AVX2, AVX-512, ARM), so a value within rounding of a level boundary may land on
    either side; a byte comparison would fail on some CPUs and not others.
    """
    diff = np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))
    assert diff.shape == np.shape(b), (diff.shape, np.shape(b))
    count = int(np.count_nonzero(diff))
    assert diff.max(initial=0) <= levels and count <= fraction * diff.size, (
        f"{what}: {count} of {diff.size} values differ, by up to {diff.max()} levels")


# XLA options for parity tests: the numbers do not depend on LLVM's optimisation level,
# and without it the tiny networks compile in about half the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
