"""Test-wide settings: float32 matmuls everywhere so parity tests measure the
model, not the backend's reduced-precision defaults."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
