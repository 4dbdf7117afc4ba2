"""StableSR/CoSeR respaced DDPM: `space_timesteps` plus LDM's posterior tables.

CoSeR (like StableSR) samples with an N-step DDPM carved out of the 1000-step
LDM schedule:
1. keep the timesteps t_0 < … < t_{N−1} of `space_timesteps(1000, [N])`;
2. respaced betas β'_k = 1 − ᾱ_{t_k}/ᾱ_{t_{k−1}} (ᾱ_{t_{−1}} = 1);
3. LDM's `register_schedule` on β': ᾱ', the posterior q(x_{k−1}|x_k, x0) mean
   coefficients and log variance (v_posterior 0, clipped at 1e-20);
4. step k = N−1 … 0: the networks get the original t_k, the coefficients use k,
   x̂0 = √(1/ᾱ'_k)·x − √(1/ᾱ'_k − 1)·ε (no clipping), x' = μ + e^{½·logvar_k}·z,
   with no noise at k = 0.
The tables reproduce the reference's dtype path: ᾱ of the base schedule in
float64 stored as float32, β' in float32 (torch), then numpy's float32/float64
mix of `register_schedule`, each table rounded to float32 at the end.

The start latent x_T = √ᾱ_999·z + √(1−ᾱ_999)·ε uses the *base* 1000-step
tables, whose roots LDM takes in float64: `ldm_noise_tables` + `add_noise_sqrt`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsr.diffusion.schedule import PredictionType, alphas_cumprod, make_betas


def space_timesteps(num_timesteps: int, section_counts: list[int]) -> list[int]:
    """Sorted timesteps kept from a `num_timesteps` process (guided-diffusion's rule).

    The process is cut into len(section_counts) equal sections; section j keeps
    section_counts[j] steps at a fractional stride (size − 1)/(count − 1) that is
    accumulated in floating point and rounded with Python's round (half to even).
    The accumulation matters: for some N (e.g. 21) it rounds differently from
    round(k·stride). N = 50 → 0, 20, 41, …, 979, 999; N = 200 → 0, 5, …, 994, 999.
    """
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for j, count in enumerate(section_counts):
        size = size_per + (1 if j < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def _ldm_base_alphas_cumprod(num_train_timesteps: int, linear_start: float,
                             linear_end: float) -> np.ndarray:
    """[T] float64 ᾱ of LDM's "linear" schedule (= diffusers' scaled_linear)."""
    betas = make_betas("scaled_linear", num_train_timesteps, linear_start, linear_end,
                       precision="float64")
    return alphas_cumprod(betas)


def ldm_noise_tables(num_train_timesteps: int = 1000, linear_start: float = 0.00085,
                     linear_end: float = 0.012) -> tuple[np.ndarray, np.ndarray]:
    """([T], [T]) float32 √ᾱ and √(1−ᾱ) of the base schedule, roots taken in float64."""
    ac = _ldm_base_alphas_cumprod(num_train_timesteps, linear_start, linear_end)
    return np.sqrt(ac).astype(np.float32), np.sqrt(1.0 - ac).astype(np.float32)


@struct.dataclass
class RespacedSchedule:
    """Per-step tables of a respaced N-step DDPM run, in loop order (i = 0 ↔ k = N−1).

    timesteps: [N] int32 original t_k, for the networks.
    indices: [N] int32 k, the respaced index (what LDM's `t` is inside the sampler).
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod: [N] √(1/ᾱ'_k), √(1/ᾱ'_k − 1).
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: [N] √ᾱ'_k, √(1−ᾱ'_k) (v form).
    posterior_mean_coef1, posterior_mean_coef2: [N] weights of x̂0 and x in μ.
    noise_std: [N] e^{½·logvar_k}, 0 at k = 0.
    """

    timesteps: jax.Array
    indices: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    noise_std: jax.Array
    prediction_type: PredictionType = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def respaced_tables(num_steps: int, *, num_train_timesteps: int = 1000,
                    linear_start: float = 0.00085, linear_end: float = 0.012,
                    v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The respaced schedule's host tables indexed by k (ascending), as LDM holds them.

    Keys: timesteps (int64 t_k), betas, alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1/2, sqrt_alphas_cumprod,
    sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
    sqrt_recipm1_alphas_cumprod (all float32 [N]).
    """
    f32 = np.float32
    base = _ldm_base_alphas_cumprod(num_train_timesteps, linear_start, linear_end).astype(f32)
    kept = space_timesteps(num_train_timesteps, [num_steps])
    # β'_k in float32, as the reference divides float32 torch scalars.
    betas, last = [], f32(1.0)
    for t in kept:
        betas.append(f32(1.0) - base[t] / last)
        last = base[t]
    betas = np.array(betas, f32)
    # LDM register_schedule: float32 ᾱ', float64 ᾱ'_prev, mixed products.
    alphas = f32(1.0) - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    variance = ((1.0 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac)
                + v_posterior * betas)
    return dict(
        timesteps=np.asarray(kept, np.int64),
        betas=betas,
        alphas_cumprod=ac,
        posterior_variance=variance.astype(f32),
        posterior_log_variance_clipped=np.log(np.maximum(variance, 1e-20)).astype(f32),
        posterior_mean_coef1=(betas * np.sqrt(ac_prev) / (1.0 - ac)).astype(f32),
        posterior_mean_coef2=((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)).astype(f32),
        sqrt_alphas_cumprod=np.sqrt(ac).astype(f32),
        sqrt_one_minus_alphas_cumprod=np.sqrt(f32(1.0) - ac).astype(f32),
        sqrt_recip_alphas_cumprod=np.sqrt(f32(1.0) / ac).astype(f32),
        sqrt_recipm1_alphas_cumprod=np.sqrt(f32(1.0) / ac - f32(1.0)).astype(f32),
    )


def respaced_schedule(num_steps: int, *, num_train_timesteps: int = 1000,
                      linear_start: float = 0.00085, linear_end: float = 0.012,
                      v_posterior: float = 0.0,
                      prediction_type: PredictionType = "epsilon") -> RespacedSchedule:
    """Device tables of `respaced_tables`, reversed into loop order."""
    tables = respaced_tables(num_steps, num_train_timesteps=num_train_timesteps,
                             linear_start=linear_start, linear_end=linear_end,
                             v_posterior=v_posterior)
    k = np.arange(len(tables["timesteps"]))
    # Computed in float32 from the stored float32 log variance, like the reference.
    std = np.exp(np.float32(0.5) * tables["posterior_log_variance_clipped"])
    std = np.where(k == 0, np.float32(0.0), std).astype(np.float32)

    def loop_order(values, dtype=jnp.float32):
        return jnp.asarray(np.ascontiguousarray(values[::-1]), dtype)

    return RespacedSchedule(
        timesteps=loop_order(tables["timesteps"], jnp.int32),
        indices=loop_order(k, jnp.int32),
        sqrt_recip_alphas_cumprod=loop_order(tables["sqrt_recip_alphas_cumprod"]),
        sqrt_recipm1_alphas_cumprod=loop_order(tables["sqrt_recipm1_alphas_cumprod"]),
        sqrt_alphas_cumprod=loop_order(tables["sqrt_alphas_cumprod"]),
        sqrt_one_minus_alphas_cumprod=loop_order(tables["sqrt_one_minus_alphas_cumprod"]),
        posterior_mean_coef1=loop_order(tables["posterior_mean_coef1"]),
        posterior_mean_coef2=loop_order(tables["posterior_mean_coef2"]),
        noise_std=loop_order(std),
        prediction_type=prediction_type,
    )


def respaced_predict_x0(schedule: RespacedSchedule, i, x, model_output):
    """x̂0 at loop step i with LDM's formulas (ε: reciprocal-root form; v: √ᾱ·x − √(1−ᾱ)·v)."""
    x = jnp.asarray(x, jnp.float32)
    model_output = jnp.asarray(model_output, jnp.float32)
    if schedule.prediction_type == "epsilon":
        return (schedule.sqrt_recip_alphas_cumprod[i] * x
                - schedule.sqrt_recipm1_alphas_cumprod[i] * model_output)
    if schedule.prediction_type == "v_prediction":
        return (schedule.sqrt_alphas_cumprod[i] * x
                - schedule.sqrt_one_minus_alphas_cumprod[i] * model_output)
    if schedule.prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {schedule.prediction_type!r}")


def respaced_step(schedule: RespacedSchedule, i, x, model_output, noise):
    """One respaced DDPM step (float32). `noise` is scaled by 0 at the last step (k = 0)."""
    x = jnp.asarray(x, jnp.float32)
    x0 = respaced_predict_x0(schedule, i, x, model_output)
    mean = schedule.posterior_mean_coef1[i] * x0 + schedule.posterior_mean_coef2[i] * x
    return mean + schedule.noise_std[i] * jnp.asarray(noise, jnp.float32)
