"""Test-wide settings, applied before any JAX backend starts.

- float32 matmuls everywhere, so parity tests measure the model and not the
  backend's reduced-precision defaults;
- 8 host CPU devices, so sharding code runs on a real multi-device mesh in-process
  (single-device tests simply use device 0).
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_num_cpu_devices", 8)
