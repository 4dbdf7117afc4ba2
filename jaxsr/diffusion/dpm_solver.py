"""DPM-Solver++ multistep (orders 1 and 2) as diffusers' `DPMSolverMultistepScheduler`.

Only algorithm_type "dpmsolver++" with the default sigmas (no Karras/exponential/
beta/Lu/flow variants). With σ_i = √((1−ᾱ)/ᾱ) at timesteps[i] and σ_N = 0
(final_sigmas_type "zero") or σ(t=0) ("sigma_min"):
    α(σ) = 1/√(σ²+1),  s(σ) = σ·α(σ),  λ = log α − log s
    m0 = x̂0 at step i (from the model output with α(σ_i), s(σ_i)),  m1 = x̂0 of step i−1
    h = λ_{i+1} − λ_i,  r0 = (λ_i − λ_{i−1})/h,  a = α_{i+1}·(e^{−h} − 1)
    1st order:          x' = (s_{i+1}/s_i)·x − a·m0
    2nd order midpoint: x' = (s_{i+1}/s_i)·x − a·m0 − ½·a·(m0 − m1)/r0
    2nd order heun:     x' = (s_{i+1}/s_i)·x − a·m0 + α_{i+1}·((e^{−h}−1)/h + 1)·(m0 − m1)/r0
Which order each step uses is diffusers' rule: first order at step 0 and at the
last step when final_sigmas_type is "zero", euler_at_final, or (lower_order_final
and N < 15). All of it is folded into three coefficient tables, computed on the
host in float32 in diffusers' operation order:
    x' = x_coef·x + m0_coef·m0 + d_coef·(m0 − m1)       (d_coef = 0 on 1st-order steps)
The multistep memory (m1) is an explicit `DPMSolverState`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsr.diffusion.schedule import PredictionType, SchedulerConfig, model_output_to_x0_eps


@struct.dataclass
class DPMSolverSchedule:
    """Per-step tables of an N-step DPM-Solver++ run, in loop order.

    timesteps: [N] int32 network t.
    alpha, sigma: [N] α(σ_i), s(σ_i) used to turn the model output into x̂0.
    x_coef, m0_coef, d_coef: [N] the update's weights (see the module docstring).
    """

    timesteps: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    x_coef: jax.Array
    m0_coef: jax.Array
    d_coef: jax.Array
    prediction_type: PredictionType = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


@struct.dataclass
class DPMSolverState:
    """Multistep memory: prev_x0 is m1, the previous step's x̂0 (zeros before step 0)."""

    prev_x0: jax.Array


def dpm_solver_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """[N] int64 descending timesteps as DPMSolverMultistepScheduler.set_timesteps.

    Unlike DDPM/DDIM it spaces N+1 points and drops the last (t = 0):
    linspace (its default): round(linspace(0, T'−1, N+1))[::-1][:-1];
    leading: (arange(N+1)·(T'//(N+1)))[::-1][:-1] + steps_offset;
    trailing: round(arange(T', 0, −T/N)) − 1;
    where T' = T minus the steps whose λ is below lambda_min_clipped.
    """
    ac = config.alphas_cumprod()
    num_train = config.num_train_timesteps
    alpha_t, sigma_t = np.sqrt(ac), np.sqrt(np.float32(1.0) - ac)
    lambdas = np.log(alpha_t) - np.log(sigma_t)
    clipped = int(np.searchsorted(lambdas[::-1], config.lambda_min_clipped))
    last = num_train - clipped
    spacing = config.timestep_spacing
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        ts = ts + config.steps_offset
    elif spacing == "trailing":
        ratio = num_train / num_steps
        ts = np.arange(last, 0, -ratio).round().astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return np.ascontiguousarray(ts)


def _alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(α, s) of a VP process with noise-to-signal ratio σ (float32, diffusers' order)."""
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
    return alpha, sigma * alpha


def _step_orders(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """[N] the solver order diffusers uses at each step (1 or 2)."""
    orders = np.full(num_steps, config.solver_order, np.int64)
    orders[0] = 1  # no previous x̂0 yet
    final_low = (config.euler_at_final or config.final_sigmas_type == "zero"
                 or (config.lower_order_final and num_steps < 15))
    if final_low:
        orders[-1] = 1
    return orders


def dpm_solver_schedule(config: SchedulerConfig, num_steps: int) -> DPMSolverSchedule:
    """Tables for `num_steps` DPM-Solver++ steps (config.solver_order 1 or 2)."""
    f32 = np.float32
    if config.solver_order not in (1, 2):
        raise ValueError("only DPM-Solver++ orders 1 and 2 are implemented")
    ac = config.alphas_cumprod()
    ts = dpm_solver_timesteps(config, num_steps)
    sigmas_all = np.sqrt((f32(1.0) - ac) / ac)
    if config.final_sigmas_type == "zero":
        sigma_last = f32(0.0)
    elif config.final_sigmas_type == "sigma_min":
        sigma_last = sigmas_all[0]
    else:
        raise ValueError(f"unknown final_sigmas_type {config.final_sigmas_type!r}")
    sigmas = np.append(sigmas_all[ts], sigma_last).astype(f32)  # [N+1]
    alpha, sigma = _alpha_sigma(sigmas)
    with np.errstate(divide="ignore"):  # s = 0 at the final σ = 0: λ = +inf, e^{−h} = 0
        lambdas = np.log(alpha) - np.log(sigma)

    n = len(ts)
    orders = _step_orders(config, n)
    x_coef = np.zeros(n, f32)
    m0_coef = np.zeros(n, f32)
    d_coef = np.zeros(n, f32)
    for i in range(n):
        h = lambdas[i + 1] - lambdas[i]
        expm1 = np.exp(-h) - f32(1.0)
        a = alpha[i + 1] * expm1
        x_coef[i] = sigma[i + 1] / sigma[i]
        m0_coef[i] = -a
        if orders[i] == 2:
            inv_r0 = f32(1.0) / ((lambdas[i] - lambdas[i - 1]) / h)
            if config.solver_type == "midpoint":
                d_coef[i] = -(f32(0.5) * a) * inv_r0
            elif config.solver_type == "heun":
                d_coef[i] = (alpha[i + 1] * (expm1 / h + f32(1.0))) * inv_r0
            else:
                raise ValueError(f"unknown solver_type {config.solver_type!r}")
    return DPMSolverSchedule(
        timesteps=jnp.asarray(ts, jnp.int32),
        alpha=jnp.asarray(alpha[:n]),
        sigma=jnp.asarray(sigma[:n]),
        x_coef=jnp.asarray(x_coef),
        m0_coef=jnp.asarray(m0_coef),
        d_coef=jnp.asarray(d_coef),
        prediction_type=config.prediction_type,
    )


def dpm_solver_init_state(x) -> DPMSolverState:
    """Empty multistep memory for latents shaped like x."""
    return DPMSolverState(prev_x0=jnp.zeros(jnp.shape(x), jnp.float32))


def dpm_solver_step(schedule: DPMSolverSchedule, state: DPMSolverState, i, x, model_output):
    """One DPM-Solver++ step: (x_prev float32, new state). i may be traced."""
    x = jnp.asarray(x, jnp.float32)
    model_output = jnp.asarray(model_output, jnp.float32)
    m0, _ = model_output_to_x0_eps(x, model_output, schedule.alpha[i], schedule.sigma[i],
                                   schedule.prediction_type)
    x_prev = (schedule.x_coef[i] * x + schedule.m0_coef[i] * m0
              + schedule.d_coef[i] * (m0 - state.prev_x0))
    return x_prev, DPMSolverState(prev_x0=m0)
