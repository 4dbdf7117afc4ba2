"""DDPM ancestral sampling as diffusers' `DDPMScheduler.step` (variance "fixed_small").

Per step i (t = timesteps[i], t' = the step's previous timestep, ᾱ' = 1 when t' < 0):
    x̂0  = (x − √(1−ᾱ_t)·ε)/√ᾱ_t                       (or the v / sample forms)
    x̂0  = clip(x̂0, ±r)                                 when clip_sample
    α_t = ᾱ_t/ᾱ',  β_t = 1 − α_t
    μ   = (√ᾱ'·β_t/(1−ᾱ_t))·x̂0 + (√α_t·(1−ᾱ')/(1−ᾱ_t))·x
    x'  = μ + √max((1−ᾱ')/(1−ᾱ_t)·β_t, 1e-20)·z         (z only when t > 0)
The coefficients are computed on the host in float32 with diffusers' operation
order, so the tables hold the very numbers torch computed; one step on device is
two multiply-adds. SeeSR: SD2-base config, 50 leading steps (981 … 1); its
sd-turbo mode: trailing spacing, 2 steps (999, 499).
"""

from __future__ import annotations

from typing import Literal

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
class DDPMSchedule:
    """Per-step tables of an N-step DDPM run, in loop order (i = 0 is the noisiest).

    timesteps: [N] int32, the t given to the networks.
    sqrt_alpha_prod, sqrt_one_minus_alpha_prod: [N] √ᾱ_t, √(1−ᾱ_t) (x̂0 conversion).
    x0_coef, x_coef: [N] posterior-mean weights of x̂0 and x.
    noise_std: [N] σ of the added noise (0 where t = 0).
    """

    timesteps: jax.Array
    sqrt_alpha_prod: jax.Array
    sqrt_one_minus_alpha_prod: jax.Array
    x0_coef: jax.Array
    x_coef: jax.Array
    noise_std: jax.Array
    prediction_type: PredictionType = struct.field(pytree_node=False, default="epsilon")
    clip_sample_range: float | None = struct.field(pytree_node=False, default=None)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def ddpm_schedule(config: SchedulerConfig, num_steps: int, *,
                  prev_rule: Literal["next", "stride"] = "next") -> DDPMSchedule:
    """Build the tables for `num_steps` steps with `config`'s spacing and offset.

    prev_rule: "next" is diffusers ≥ 0.22 (the step goes to the next listed
    timestep); "stride" is diffusers 0.21 (t − T//N). See `previous_timesteps`.
    """
    f32 = np.float32
    ac = config.alphas_cumprod()
    ts = set_timesteps(num_steps, config.timestep_spacing,
                       num_train_timesteps=config.num_train_timesteps,
                       steps_offset=config.steps_offset)
    prev = previous_timesteps(ts, prev_rule, num_train_timesteps=config.num_train_timesteps)
    one = f32(1.0)
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], one).astype(f32)
    beta_prod_t = one - a_t
    beta_prod_prev = one - a_prev
    current_alpha = a_t / a_prev
    current_beta = one - current_alpha
    x0_coef = np.sqrt(a_prev) * current_beta / beta_prod_t
    x_coef = np.sqrt(current_alpha) * beta_prod_prev / beta_prod_t
    variance = np.maximum(beta_prod_prev / beta_prod_t * current_beta, f32(1e-20))
    noise_std = np.where(ts > 0, np.sqrt(variance), f32(0.0)).astype(f32)
    return DDPMSchedule(
        timesteps=jnp.asarray(ts, jnp.int32),
        sqrt_alpha_prod=jnp.asarray(np.sqrt(a_t)),
        sqrt_one_minus_alpha_prod=jnp.asarray(np.sqrt(beta_prod_t)),
        x0_coef=jnp.asarray(x0_coef),
        x_coef=jnp.asarray(x_coef),
        noise_std=jnp.asarray(noise_std),
        prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if config.clip_sample else None,
    )


def ddpm_predict_x0(schedule: DDPMSchedule, i, x, model_output):
    """x̂0 at step i (after clipping when the config clips). i may be traced."""
    x = jnp.asarray(x, jnp.float32)
    model_output = jnp.asarray(model_output, jnp.float32)
    x0, _ = model_output_to_x0_eps(x, model_output, schedule.sqrt_alpha_prod[i],
                                   schedule.sqrt_one_minus_alpha_prod[i],
                                   schedule.prediction_type)
    if schedule.clip_sample_range is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def ddpm_step(schedule: DDPMSchedule, i, x, model_output, noise):
    """One DDPM step: x_t → x_{t'} (float32, x's shape).

    i: loop index (int or traced int32); x, model_output, noise: same shape,
    any layout. `noise` is the standard-normal draw for this step (diffusers
    draws it from the pipeline generator; jaxsr takes it as an argument). It is
    scaled by 0 at t = 0, so any array of the right shape works there.
    """
    x = jnp.asarray(x, jnp.float32)
    x0 = ddpm_predict_x0(schedule, i, x, model_output)
    mean = schedule.x0_coef[i] * x0 + schedule.x_coef[i] * x
    return mean + schedule.noise_std[i] * jnp.asarray(noise, jnp.float32)
