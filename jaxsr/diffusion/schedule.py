"""Training noise schedule (betas, ᾱ), inference timesteps and the x0/ε/v conversions.

Host side (numpy): `make_betas`, `alphas_cumprod`, `set_timesteps`,
`previous_timesteps`, `SchedulerConfig`. Device side (jax, jit-safe):
`add_noise`, `add_noise_sqrt`, `velocity`, `model_output_to_x0_eps`.

Two dtype paths exist for the same Stable Diffusion schedule and both are kept:
- diffusers (SeeSR) builds β and ᾱ in float32 with torch on the CPU;
- LDM/StableSR (CoSeR) builds them in float64 numpy and stores float32 copies.
ᾱ_999 differs between the two in the 7th digit, so each port uses its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

BetaSchedule = Literal["scaled_linear", "linear"]
Spacing = Literal["leading", "trailing", "linspace"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
SamplerKind = Literal["ddpm", "ddim", "dpm_solver"]


# --------------------------------------------------------------------------- betas, ᾱ


def _linspace_float32(start: float, end: float, num: int) -> np.ndarray:
    """`torch.linspace(start, end, num, dtype=torch.float32)` on the CPU, bit for bit.

    torch rounds both ends to float32, takes step = (end − start)/(num − 1) in
    float32, and fills the first half as start + step·i and the second half as
    end − step·(num − 1 − i), each one fused multiply-add (a single rounding).
    np.linspace rounds differently in about a third of the entries. For the
    magnitudes of a beta schedule the float64 product and sum below are exact,
    so one cast to float32 reproduces the fused result.
    """
    if num == 1:
        return np.array([start], np.float32)
    lo, hi = np.float32(start), np.float32(end)
    step = np.float32((hi - lo) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    first = np.float64(lo) + np.float64(step) * i
    second = np.float64(hi) - np.float64(step) * (num - 1 - i)
    return np.where(np.arange(num) < num // 2, first, second).astype(np.float32)


def make_betas(beta_schedule: BetaSchedule = "scaled_linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.00085, beta_end: float = 0.012, *,
               precision: Literal["float32", "float64"] = "float32") -> np.ndarray:
    """[T] betas.

    "scaled_linear" = linspace(√β0, √β1, T)² (what LDM calls "linear"), "linear" =
    linspace(β0, β1, T). `precision="float32"` follows diffusers (torch float32
    linspace, squared in float32) and returns float32; "float64" follows LDM's
    `make_beta_schedule` (float64 throughout) and returns float64.
    """
    if beta_schedule not in ("scaled_linear", "linear"):
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")
    scaled = beta_schedule == "scaled_linear"
    lo, hi = (beta_start ** 0.5, beta_end ** 0.5) if scaled else (beta_start, beta_end)
    if precision == "float32":
        betas = _linspace_float32(lo, hi, num_train_timesteps)
    elif precision == "float64":
        betas = np.linspace(lo, hi, num_train_timesteps, dtype=np.float64)
    else:
        raise ValueError(f"precision must be float32 or float64, got {precision!r}")
    return betas * betas if scaled else betas


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """[T] ᾱ_t = Π_{s≤t}(1 − β_s), in the dtype of `betas`.

    For float32 the running product is kept in float64 and each entry rounded
    once, which is what torch's CPU cumprod does (and what diffusers ran).
    """
    betas = np.asarray(betas)
    alphas = betas.dtype.type(1.0) - betas
    if betas.dtype == np.float32:
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return np.cumprod(alphas)


# --------------------------------------------------------------------------- timesteps


def set_timesteps(num_steps: int, spacing: Spacing = "leading", *,
                  num_train_timesteps: int = 1000, steps_offset: int = 0) -> np.ndarray:
    """[N] int64 descending timesteps, as diffusers' DDPM/DDIM `set_timesteps`.

    leading:  (arange(N)·(T//N))[::-1] + steps_offset  (SD2: 981, 961, …, 1 for N=50);
    trailing: round(arange(T, 0, −T/N)) − 1            (N=2: 999, 499);
    linspace: round(linspace(0, T−1, N))[::-1].
    The float arange of "trailing" is numpy's, on purpose: its length and
    rounding are part of what diffusers computes.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    if ts.max() >= num_train_timesteps:
        raise ValueError(f"timestep {ts.max()} is outside the {num_train_timesteps}-step schedule")
    return np.ascontiguousarray(ts)


def previous_timesteps(timesteps: np.ndarray, rule: Literal["next", "stride"] = "next", *,
                       num_train_timesteps: int = 1000) -> np.ndarray:
    """[N] the timestep each step moves to; −1 means "the clean sample" (ᾱ_prev = 1).

    "next":   the following entry of `timesteps`, −1 after the last (diffusers ≥ 0.22 DDPM);
    "stride": t − T//N (diffusers 0.21 DDPM, which SeeSR ran, and every DDIM).
    The two agree for leading spacing and for trailing spacing with N dividing T.
    Every negative value is reported as −1: they all mean ᾱ_prev = 1 (or ᾱ_0).
    """
    timesteps = np.asarray(timesteps, np.int64)
    if rule == "next":
        return np.append(timesteps[1:], -1)
    if rule == "stride":
        return np.maximum(timesteps - num_train_timesteps // len(timesteps), -1)
    raise ValueError(f"unknown previous-timestep rule {rule!r}")


# --------------------------------------------------------------------------- config


_COMMON_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", steps_offset=0,
)
# diffusers' constructor defaults of each scheduler class (0.42): a key missing
# from a scheduler_config.json takes the default of the class that loads it.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpm": dict(timestep_spacing="leading", clip_sample=True, clip_sample_range=1.0),
    "ddim": dict(timestep_spacing="leading", clip_sample=True, clip_sample_range=1.0,
                 set_alpha_to_one=True),
    "dpm_solver": dict(timestep_spacing="linspace", solver_order=2, solver_type="midpoint",
                       lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                       lambda_min_clipped=-math.inf),
}
# Options whose non-default values change the algorithm in ways not ported here.
_MUST_BE: dict[str, dict[str, Any]] = {
    "common": dict(trained_betas=None, thresholding=False, rescale_betas_zero_snr=False),
    "ddpm": dict(variance_type="fixed_small"),
    "ddim": {},
    "dpm_solver": dict(algorithm_type="dpmsolver++", variance_type=None, use_karras_sigmas=False,
                       use_exponential_sigmas=False, use_beta_sigmas=False,
                       use_lu_lambdas=False, use_flow_sigmas=False, use_dynamic_shifting=False),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler settings jaxsr reads from a diffusers `scheduler_config.json`.

    Fields a sampler does not use are ignored by it (e.g. `set_alpha_to_one`
    outside DDIM). Build with `from_diffusers(dict, sampler)`: defaults depend on
    the diffusers class that would load the dict. The plain constructor's
    defaults are SD2-base's config as DDPMScheduler/DDIMScheduler read it.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: Spacing = "leading"
    steps_offset: int = 1
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    # DPM-Solver++ (multistep) only.
    solver_order: int = 2
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    lambda_min_clipped: float = -math.inf

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], sampler: SamplerKind) -> SchedulerConfig:
        """Read a diffusers scheduler config dict as `sampler`'s diffusers class would.

        sampler: "ddpm" (DDPMScheduler), "ddim" (DDIMScheduler) or "dpm_solver"
        (DPMSolverMultistepScheduler). Unknown keys (`_class_name`,
        `skip_prk_steps`, …) are ignored, as diffusers does; options that would
        select an algorithm not implemented here raise ValueError.
        """
        if sampler not in _CLASS_DEFAULTS:
            raise ValueError(f"sampler must be one of {sorted(_CLASS_DEFAULTS)}, got {sampler!r}")
        for key, required in {**_MUST_BE["common"], **_MUST_BE[sampler]}.items():
            if config.get(key, required) != required:
                raise ValueError(f"{key}={config[key]!r} is not supported for {sampler}")
        if config.get("solver_order", 2) not in (1, 2):
            raise ValueError("only DPM-Solver++ orders 1 and 2 are implemented")
        defaults = {**_COMMON_DEFAULTS, **_CLASS_DEFAULTS[sampler]}
        values = {key: config.get(key, default) for key, default in defaults.items()}
        return cls(**values)

    def betas(self) -> np.ndarray:
        """[T] float32 betas, diffusers' dtype path."""
        return make_betas(self.beta_schedule, self.num_train_timesteps,
                          self.beta_start, self.beta_end)

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float32 ᾱ, diffusers' dtype path."""
        return alphas_cumprod(self.betas())


# --------------------------------------------------------------------------- device side


def _per_example(values, ndim: int):
    """[B] → [B, 1, …, 1] so that it broadcasts over a rank-`ndim` batch."""
    values = jnp.reshape(values, (-1,))
    return jnp.reshape(values, values.shape + (1,) * (ndim - 1))


def add_noise(x0, noise, alphas_cumprod, t):
    """q(x_t | x_0) sample √ᾱ_t·x0 + √(1−ᾱ_t)·noise, as diffusers' `add_noise`.

    x0, noise: [B, ...] (any layout); alphas_cumprod: [T] float32; t: [B] int
    (a scalar broadcasts). The square roots are taken in float32 from ᾱ, as
    diffusers does. SeeSR's LR start is `add_noise(z_lr, eps, ac, [999])`.
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)]
    ac = _per_example(ac, x0.ndim)
    return jnp.sqrt(ac) * x0 + jnp.sqrt(1.0 - ac) * noise


def add_noise_sqrt(x0, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, t):
    """√ᾱ_t·x0 + √(1−ᾱ_t)·noise from precomputed root tables (LDM's `q_sample`).

    LDM takes the roots in float64 before storing float32 tables, so its x_T
    differs from `add_noise` in the last bits; see `respace.ldm_noise_tables`.
    """
    sa = _per_example(jnp.asarray(sqrt_alphas_cumprod)[jnp.asarray(t)], x0.ndim)
    s1m = _per_example(jnp.asarray(sqrt_one_minus_alphas_cumprod)[jnp.asarray(t)], x0.ndim)
    return sa * x0 + s1m * noise


def velocity(x0, noise, alphas_cumprod, t):
    """v-prediction target √ᾱ_t·noise − √(1−ᾱ_t)·x0 (diffusers' `get_velocity`)."""
    ac = _per_example(jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)], x0.ndim)
    return jnp.sqrt(ac) * noise - jnp.sqrt(1.0 - ac) * x0


def model_output_to_x0_eps(x, model_output, sqrt_alpha, sqrt_one_minus_alpha,
                           prediction_type: PredictionType):
    """(x̂0, ε̂) from a network output, with the formulas diffusers uses.

    epsilon:      x̂0 = (x − √(1−ᾱ)·ε)/√ᾱ
    v_prediction: x̂0 = √ᾱ·x − √(1−ᾱ)·v,  ε̂ = √ᾱ·v + √(1−ᾱ)·x
    sample:       x̂0 = out,              ε̂ = (x − √ᾱ·x̂0)/√(1−ᾱ)
    sqrt_alpha / sqrt_one_minus_alpha are scalars (or broadcastable arrays).
    """
    if prediction_type == "epsilon":
        return (x - sqrt_one_minus_alpha * model_output) / sqrt_alpha, model_output
    if prediction_type == "v_prediction":
        x0 = sqrt_alpha * x - sqrt_one_minus_alpha * model_output
        return x0, sqrt_alpha * model_output + sqrt_one_minus_alpha * x
    if prediction_type == "sample":
        return model_output, (x - sqrt_alpha * model_output) / sqrt_one_minus_alpha
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
