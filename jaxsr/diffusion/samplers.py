"""One interface over the DDPM, DDIM and DPM-Solver++ implementations, for loops in jit.

    plan = make_sampler("ddpm", scheduler_config_dict, steps=50)
    state = sampler_init(plan, x)
    state, x = sampler_step(plan, state, i, x, eps, noise)   # i may be traced

`plan.kind` and `plan.needs_noise` are static; the per-step tables are a pytree
(pass the plan through jit as an argument, or close over it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxsr.diffusion.ddim import ddim_schedule, ddim_step
from jaxsr.diffusion.ddpm import ddpm_schedule, ddpm_step
from jaxsr.diffusion.dpm_solver import (
    DPMSolverState,
    dpm_solver_init_state,
    dpm_solver_schedule,
    dpm_solver_step,
)
from jaxsr.diffusion.schedule import SchedulerConfig

SAMPLERS = ("ddpm", "ddim", "dpmpp")
_DIFFUSERS_CLASS = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp": "dpm_solver"}


@struct.dataclass
class SamplerPlan:
    """An N-step run of one sampler: its tables and its static description."""

    schedule: object                   # DDPMSchedule | DDIMSchedule | DPMSolverSchedule
    kind: str = struct.field(pytree_node=False, default="ddpm")
    needs_noise: bool = struct.field(pytree_node=False, default=True)

    @property
    def timesteps(self) -> jax.Array:
        return self.schedule.timesteps

    @property
    def num_steps(self) -> int:
        return self.schedule.timesteps.shape[0]


def make_sampler(kind: str, scheduler_config: dict | SchedulerConfig, steps: int, *,
                 eta: float = 0.0, timestep_spacing: str | None = None) -> SamplerPlan:
    """Tables for `steps` steps of `kind` ("ddpm", "ddim" or "dpmpp").

    scheduler_config: the diffusers `scheduler_config.json` dict (read as that
    sampler's diffusers class reads it) or a ready SchedulerConfig.
    timestep_spacing: overrides the config's ("leading", "trailing", "linspace").
    """
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; choose one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    cfg = scheduler_config
    if not isinstance(cfg, SchedulerConfig):
        cfg = SchedulerConfig.from_diffusers(dict(cfg), _DIFFUSERS_CLASS[kind])
    if timestep_spacing is not None:
        cfg = dataclasses.replace(cfg, timestep_spacing=timestep_spacing)
    if kind == "ddpm":
        return SamplerPlan(ddpm_schedule(cfg, steps), kind, True)
    if kind == "ddim":
        return SamplerPlan(ddim_schedule(cfg, steps, eta), kind, eta > 0)
    return SamplerPlan(dpm_solver_schedule(cfg, steps), kind, False)


def sampler_init(plan: SamplerPlan, x):
    """The loop carry the sampler needs beyond x (DPM-Solver++'s previous x̂0)."""
    if plan.kind == "dpmpp":
        return dpm_solver_init_state(x)
    return DPMSolverState(prev_x0=jnp.zeros((), jnp.float32))   # unused placeholder


def sampler_step(plan: SamplerPlan, state, i, x, model_output, noise=None):
    """(state, x_prev) after step i. `noise` is used only when `plan.needs_noise`."""
    if plan.kind == "ddpm":
        return state, ddpm_step(plan.schedule, i, x, model_output, noise)
    if plan.kind == "ddim":
        return state, ddim_step(plan.schedule, i, x, model_output,
                                noise if plan.needs_noise else None)
    x_prev, state = dpm_solver_step(plan.schedule, state, i, x, model_output)
    return state, x_prev


def per_step(params, x):
    """(params, x) through an optimization barrier, at the top of a sampling loop's body.

    Everything the step then computes from `params` depends on the step's input, so
    XLA cannot hoist it out of the loop. What it would hoist is weight-only work:
    on CPUs that emulate bfloat16, the float32 copy XLA makes of every weight, all
    of which would then stay alive for the whole loop (jaxsr.platform). Elsewhere
    it only leaves per-step work such as the text keys/values in the loop, a small
    cost against the networks' forward.
    """
    return jax.lax.optimization_barrier((params, x))
