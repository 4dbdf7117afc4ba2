"""DDIM as diffusers' `DDIMScheduler.step` (eta, set_alpha_to_one, ε / v / x0 prediction).

Per step i (t = timesteps[i], t' = t − T//N always, as diffusers' DDIM):
    ᾱ'  = ᾱ_{t'}, or (t' < 0) 1 if set_alpha_to_one else ᾱ_0
    x̂0, ε̂ from the model output (x̂0 clipped when clip_sample; ε̂ is not)
    σ   = η·√((1−ᾱ')/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ'))
    x'  = √ᾱ'·x̂0 + √(1−ᾱ'−σ²)·ε̂ + σ·z                  (z only when η > 0)
Coefficients are computed on the host in float32 in diffusers' operation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsr.diffusion.schedule import (
    PredictionType,
    SchedulerConfig,
    model_output_to_x0_eps,
    previous_timesteps,
    set_timesteps,
)


@struct.dataclass
class DDIMSchedule:
    """Per-step tables of an N-step DDIM run, in loop order.

    timesteps: [N] int32 network t; sqrt_alpha_prod, sqrt_one_minus_alpha_prod: [N];
    sqrt_alpha_prod_prev: [N] √ᾱ'; eps_coef: [N] √(1−ᾱ'−σ²); noise_std: [N] σ.
    eta is static: with eta == 0 no noise is used (or needed).
    """

    timesteps: jax.Array
    sqrt_alpha_prod: jax.Array
    sqrt_one_minus_alpha_prod: jax.Array
    sqrt_alpha_prod_prev: jax.Array
    eps_coef: jax.Array
    noise_std: jax.Array
    eta: float = struct.field(pytree_node=False, default=0.0)
    prediction_type: PredictionType = struct.field(pytree_node=False, default="epsilon")
    clip_sample_range: float | None = struct.field(pytree_node=False, default=None)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def ddim_schedule(config: SchedulerConfig, num_steps: int, eta: float = 0.0) -> DDIMSchedule:
    """Tables for `num_steps` DDIM steps with noise scale `eta` (0 = deterministic)."""
    f32 = np.float32
    ac = config.alphas_cumprod()
    ts = set_timesteps(num_steps, config.timestep_spacing,
                       num_train_timesteps=config.num_train_timesteps,
                       steps_offset=config.steps_offset)
    prev = previous_timesteps(ts, "stride", num_train_timesteps=config.num_train_timesteps)
    final = f32(1.0) if config.set_alpha_to_one else ac[0]
    one = f32(1.0)
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(f32)
    beta_prod_t = one - a_t
    beta_prod_prev = one - a_prev
    variance = (beta_prod_prev / beta_prod_t) * (one - a_t / a_prev)
    std = f32(eta) * np.sqrt(variance)
    eps_coef = np.sqrt(one - a_prev - std * std)
    return DDIMSchedule(
        timesteps=jnp.asarray(ts, jnp.int32),
        sqrt_alpha_prod=jnp.asarray(np.sqrt(a_t)),
        sqrt_one_minus_alpha_prod=jnp.asarray(np.sqrt(beta_prod_t)),
        sqrt_alpha_prod_prev=jnp.asarray(np.sqrt(a_prev)),
        eps_coef=jnp.asarray(eps_coef),
        noise_std=jnp.asarray(std),
        eta=float(eta),
        prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if config.clip_sample else None,
    )


def ddim_step(schedule: DDIMSchedule, i, x, model_output, noise=None):
    """One DDIM step x_t → x_{t'} (float32). `noise` is required iff eta > 0."""
    x = jnp.asarray(x, jnp.float32)
    model_output = jnp.asarray(model_output, jnp.float32)
    x0, eps = model_output_to_x0_eps(x, model_output, schedule.sqrt_alpha_prod[i],
                                     schedule.sqrt_one_minus_alpha_prod[i],
                                     schedule.prediction_type)
    if schedule.clip_sample_range is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    x_prev = schedule.sqrt_alpha_prod_prev[i] * x0 + schedule.eps_coef[i] * eps
    if schedule.eta > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs the step's noise")
        x_prev = x_prev + schedule.noise_std[i] * jnp.asarray(noise, jnp.float32)
    return x_prev
