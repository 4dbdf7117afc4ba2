"""Noise schedules and samplers as pure JAX functions, plus tiling and colour fixes.

Schedules are small pytrees of float32 tables built on the host in numpy; a
sampler step is a pure function of (schedule, loop index, latent, model output,
noise) so that it runs inside `jax.jit` and `lax.fori_loop`/`lax.scan`. Every
random draw is an argument, never drawn inside.
"""
