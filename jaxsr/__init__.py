"""jaxsr: diffusion-based real-world image super-resolution (SeeSR, CoSeR) in JAX/Flax."""

__version__ = "0.1.0"
