"""Test-wide settings, applied before any JAX backend starts.

- float32 matmuls everywhere, so parity tests measure the model and not the
  backend's reduced-precision defaults;
- 8 host CPU devices, so sharding code runs on a real multi-device mesh in-process
  (single-device tests simply use device 0);
- jaxsr's default XLA flags (`jaxsr.platform`: YNNPACK for the dots, the
  memory-saving scheduler), so every parity test checks the programs as the command
  line compiles them, and no TPU backend start where libtpu is installed but the
  host has no TPU.
"""

import gc

import jax
import pytest

from jaxsr.platform import configure_xla_defaults

configure_xla_defaults()    # before any backend starts; also quiets an absent TPU
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny PyTorch references run hundreds of small ops: torch's thread pool only
    contends with XLA's compiler. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """A test file's compiled programs go when the file is done. The suite runs in two
    worker processes that share the machine's memory, and a worker's caches would
    otherwise grow with every file it runs (a TPU plan compile holds gigabytes)."""
    yield
    jax.clear_caches()
    gc.collect()
