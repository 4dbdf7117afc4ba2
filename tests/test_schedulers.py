"""Samplers against their references, step by step, in float32.

- DDPM, DDIM and DPM-Solver++ against diffusers 0.42's PyTorch schedulers, built
  from scheduler config dicts written here (SD2-base's, and one in sd-turbo's
  EulerDiscrete format).
- The StableSR/CoSeR respaced DDPM against a torch re-statement of LDM's
  `register_schedule` + `p_sample` written in this file.
Each loop runs both sides closed-loop (each side feeds its own latent to the same
deterministic toy model) and compares every step's output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from jaxsr.diffusion.ddim import ddim_schedule, ddim_step
from jaxsr.diffusion.ddpm import ddpm_schedule, ddpm_step
from jaxsr.diffusion.dpm_solver import (
    dpm_solver_init_state,
    dpm_solver_schedule,
    dpm_solver_step,
    dpm_solver_timesteps,
)
from jaxsr.diffusion.respace import (
    ldm_noise_tables,
    respaced_schedule,
    respaced_step,
    respaced_tables,
    space_timesteps,
)
from jaxsr.diffusion.samplers import make_sampler, sampler_init, sampler_step
from jaxsr.diffusion.schedule import (
    SchedulerConfig,
    add_noise,
    add_noise_sqrt,
    alphas_cumprod,
    make_betas,
    previous_timesteps,
    set_timesteps,
    velocity,
)
from tests.parity import rel_err

TOL = 1e-5
SHAPE = (2, 4, 8, 8)

# stabilityai/stable-diffusion-2-base scheduler/scheduler_config.json (PNDM format).
SD2_BASE = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
# A config in sd-turbo's format (EulerDiscrete, trailing spacing). It has no
# `clip_sample`, so DDPMScheduler falls back to its default clip_sample=True.
TURBO_STYLE = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False,
}
DIFFUSERS_CLASS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler,
                   "dpm_solver": DPMSolverMultistepScheduler}


def toy_model(x, t):
    """A deterministic stand-in for the UNet: ε = 0.5·x + 0.1·sin(t) (numpy float32)."""
    return (np.float32(0.5) * x + np.float32(0.1) * np.sin(np.float32(t))).astype(np.float32)


def toy_model_jax(x, t):
    return 0.5 * x + 0.1 * jnp.sin(jnp.asarray(t, jnp.float32))


def start_latent(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def step_noises(num, seed=1):
    return np.random.default_rng(seed).standard_normal((num, *SHAPE)).astype(np.float32)


def assert_trajectories_close(ours, ref, label):
    errors = [rel_err(o, r) for o, r in zip(ours, ref)]
    print(f"{label}: max per-step rel err {max(errors):.2e} over {len(errors)} steps")
    assert max(errors) <= TOL, (label, errors)
    return max(errors)


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule,start,end", [("scaled_linear", 0.00085, 0.012),
                                                ("linear", 0.0001, 0.02)])
def test_betas_and_alphas_cumprod_are_bitwise_diffusers(schedule, start, end):
    ref = DDPMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end)
    betas = make_betas(schedule, 1000, start, end)
    assert betas.dtype == np.float32
    np.testing.assert_array_equal(betas, ref.betas.numpy())
    np.testing.assert_array_equal(alphas_cumprod(betas), ref.alphas_cumprod.numpy())


def test_ldm_float64_schedule():
    ref_betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2)
    ref_ac = torch.cumprod(1.0 - ref_betas, 0).numpy()
    ours = alphas_cumprod(make_betas("scaled_linear", 1000, 0.00085, 0.012, precision="float64"))
    assert ours.dtype == np.float64
    assert np.max(np.abs(ours / ref_ac - 1.0)) < 1e-13
    sqrt_ac, sqrt_1m = ldm_noise_tables()
    np.testing.assert_allclose(sqrt_ac, np.sqrt(ref_ac).astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(sqrt_1m, np.sqrt(1.0 - ref_ac).astype(np.float32), rtol=1e-7)


def test_seesr_lr_start_constants_and_add_noise():
    ref = DDPMScheduler.from_config(SD2_BASE)
    ac = SchedulerConfig.from_diffusers(SD2_BASE, "ddpm").alphas_cumprod()
    ac999 = float(ref.alphas_cumprod[999])
    assert float(ac[999]) == ac999
    assert abs(ac999 - 0.00466) < 5e-6 and abs(ac999 ** 0.5 - 0.0683) < 5e-5

    x0, noise = start_latent(2), start_latent(3)
    t = np.array([999, 437])
    ref_out = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    err = rel_err(add_noise(jnp.asarray(x0), jnp.asarray(noise), ac, t), ref_out.numpy())
    ref_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    err_v = rel_err(velocity(jnp.asarray(x0), jnp.asarray(noise), ac, t), ref_v.numpy())
    print(f"add_noise rel err {err:.2e}, velocity rel err {err_v:.2e}")
    assert err <= 1e-6 and err_v <= 1e-6
    # LDM's x_T: roots taken in float64, then float32 tables.
    sqrt_ac, sqrt_1m = ldm_noise_tables()
    ldm = add_noise_sqrt(jnp.asarray(x0), jnp.asarray(noise), sqrt_ac, sqrt_1m, t)
    assert rel_err(ldm, ref_out.numpy()) <= 1e-5


STEP_COUNTS = [1, 2, 3, 4, 7, 10, 20, 25, 50, 100, 333, 999, 1000]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, offset):
    for n in STEP_COUNTS:
        ref = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n)
        expected = ref.timesteps.numpy()
        if expected.max() >= 1000:  # diffusers emits t = 1000 (leading, N = 1000, offset 1)
            with pytest.raises(ValueError):
                set_timesteps(n, spacing, steps_offset=offset)
            continue
        ours = set_timesteps(n, spacing, steps_offset=offset)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{spacing} N={n}")

        dpm = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
        if n < 1000:
            dpm.set_timesteps(n)
            cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset,
                                  beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
            np.testing.assert_array_equal(dpm_solver_timesteps(cfg, n), dpm.timesteps.numpy(),
                                          err_msg=f"dpm {spacing} N={n}")


def test_seesr_timesteps():
    ref = DDPMScheduler.from_config(SD2_BASE)
    ref.set_timesteps(50)
    assert ref.timesteps[0] == 981 and ref.timesteps[-1] == 1
    np.testing.assert_array_equal(ddpm_schedule(SchedulerConfig.from_diffusers(SD2_BASE, "ddpm"),
                                                50).timesteps, ref.timesteps.numpy())
    turbo = DDPMScheduler.from_config(TURBO_STYLE)
    turbo.set_timesteps(2)
    assert turbo.timesteps.tolist() == [999, 499]
    cfg = SchedulerConfig.from_diffusers(TURBO_STYLE, "ddpm")
    assert ddpm_schedule(cfg, 2).timesteps.tolist() == [999, 499]


@pytest.mark.parametrize("config", [SD2_BASE, TURBO_STYLE, {}], ids=["sd2", "turbo", "empty"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver"])
def test_config_reads_like_diffusers(config, sampler):
    ours = SchedulerConfig.from_diffusers(config, sampler)
    ref = DIFFUSERS_CLASS[sampler].from_config(config).config
    for field in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                  "prediction_type", "timestep_spacing", "steps_offset"):
        assert getattr(ours, field) == ref[field], field
    sampler_fields = {
        "ddpm": ("clip_sample", "clip_sample_range"),
        "ddim": ("clip_sample", "clip_sample_range", "set_alpha_to_one"),
        "dpm_solver": ("solver_order", "solver_type", "lower_order_final", "euler_at_final",
                       "final_sigmas_type", "lambda_min_clipped"),
    }[sampler]
    for field in sampler_fields:
        assert getattr(ours, field) == ref[field], field


@pytest.mark.parametrize("sampler,key,value", [
    ("ddpm", "variance_type", "fixed_large"), ("ddpm", "thresholding", True),
    ("ddim", "rescale_betas_zero_snr", True), ("ddpm", "trained_betas", [0.1, 0.2]),
    ("dpm_solver", "use_karras_sigmas", True), ("dpm_solver", "algorithm_type", "sde-dpmsolver++"),
    ("dpm_solver", "solver_order", 3),
])
def test_config_rejects_unported_options(sampler, key, value):
    with pytest.raises(ValueError):
        SchedulerConfig.from_diffusers({**SD2_BASE, key: value}, sampler)


def test_previous_timestep_rules():
    # The "stride" rule is diffusers 0.21's DDPM (what SeeSR ran): t − T//N.
    for spacing, n in [("leading", 50), ("leading", 20), ("trailing", 2), ("trailing", 4)]:
        ts = set_timesteps(n, spacing, steps_offset=1)
        stride = previous_timesteps(ts, "stride")
        np.testing.assert_array_equal(stride, np.maximum(ts - 1000 // n, -1))
        np.testing.assert_array_equal(previous_timesteps(ts, "next"), stride)
    ts = set_timesteps(3, "trailing")  # 999, 666, 332: the rules part ways
    assert previous_timesteps(ts, "next").tolist() == [666, 332, -1]
    assert previous_timesteps(ts, "stride").tolist() == [666, 333, -1]


# --------------------------------------------------------------------------- DDPM


def diffusers_ddpm_run(ref, x, seed):
    """diffusers' loop; returns every step's output and the noises it drew."""
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for t in ref.timesteps:
        eps = toy_model(x, int(t))
        x = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), generator=generator)
        x = x.prev_sample.numpy()
        outputs.append(x)
    return outputs


def replay_step_noise(timesteps, seed):
    """The noises DDPMScheduler.step draws: one randn per step with t > 0, in order,
    from the generator passed to it (diffusers' randn_tensor → torch.randn)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator, dtype=torch.float32).numpy() if t > 0
            else np.zeros(SHAPE, np.float32) for t in timesteps]


@pytest.mark.parametrize("config,num_steps", [
    (SD2_BASE, 50),
    (TURBO_STYLE, 2),  # trailing, clip_sample=True by default
    ({**SD2_BASE, "prediction_type": "v_prediction"}, 20),
    ({**SD2_BASE, "timestep_spacing": "linspace"}, 10),  # last t = 0: no noise
])
def test_ddpm_loop_matches_diffusers(config, num_steps):
    ref = DDPMScheduler.from_config(config)
    ref.set_timesteps(num_steps)
    x = start_latent()
    ref_out = diffusers_ddpm_run(ref, x, seed=7)

    schedule = ddpm_schedule(SchedulerConfig.from_diffusers(config, "ddpm"), num_steps)
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())
    noises = replay_step_noise(ref.timesteps.tolist(), seed=7)
    ours = []
    for i, t in enumerate(schedule.timesteps.tolist()):
        x = np.asarray(ddpm_step(schedule, i, x, toy_model(x, t), noises[i]))
        ours.append(x)
    assert_trajectories_close(ours, ref_out, f"ddpm {config.get('_class_name')} N={num_steps}")


# --------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_loop_matches_diffusers(eta, spacing):
    config = {**SD2_BASE, "timestep_spacing": spacing}
    _ddim_parity(config, 25, eta)


def test_ddim_v_prediction_with_clip_and_alpha_one():
    config = {**SD2_BASE, "prediction_type": "v_prediction", "set_alpha_to_one": True,
              "clip_sample": True}
    _ddim_parity(config, 10, 0.5)


def _ddim_parity(config, num_steps, eta):
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(num_steps)
    schedule = ddim_schedule(SchedulerConfig.from_diffusers(config, "ddim"), num_steps, eta)
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())
    noises = step_noises(num_steps)
    x_ref = x = start_latent()
    ours, theirs = [], []
    for i, t in enumerate(ref.timesteps.tolist()):
        kwargs = {"variance_noise": torch.from_numpy(noises[i])} if eta > 0 else {}
        x_ref = ref.step(torch.from_numpy(toy_model(x_ref, t)), t, torch.from_numpy(x_ref),
                         eta=eta, **kwargs).prev_sample.numpy()
        theirs.append(x_ref)
        x = np.asarray(ddim_step(schedule, i, x, toy_model(x, t), noises[i] if eta > 0 else None))
        ours.append(x)
    label = f"ddim {config.get('timestep_spacing', 'leading')} eta={eta} N={num_steps}"
    assert_trajectories_close(ours, theirs, label)


# --------------------------------------------------------------------------- DPM-Solver++


@pytest.mark.parametrize("num_steps,overrides", [
    (10, {}),
    (20, {}),
    (20, {"final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}),
    (12, {"solver_type": "heun", "timestep_spacing": "trailing"}),
    (8, {"solver_order": 1}),
])
def test_dpm_solver_loop_matches_diffusers(num_steps, overrides):
    config = {**SD2_BASE, **overrides}
    ref = DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(num_steps)
    schedule = dpm_solver_schedule(SchedulerConfig.from_diffusers(config, "dpm_solver"), num_steps)
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())
    x_ref = x = start_latent()
    state = dpm_solver_init_state(x)
    ours, theirs = [], []
    for i, t in enumerate(ref.timesteps.tolist()):
        x_ref = ref.step(torch.from_numpy(toy_model(x_ref, t)), t,
                         torch.from_numpy(x_ref)).prev_sample.numpy()
        theirs.append(x_ref)
        x, state = dpm_solver_step(schedule, state, i, x, toy_model(np.asarray(x), t))
        ours.append(np.asarray(x))
    assert_trajectories_close(ours, theirs, f"dpm++ N={num_steps} {overrides}")


# --------------------------------------------------------------------------- respacing


def reference_space_timesteps(n):
    """StableSR's rule restated: one section of 1000 steps, stride 999/(n−1) added up
    in floating point, each position rounded with Python's round (half to even)."""
    stride = 999 / (n - 1) if n > 1 else 1
    position, kept = 0.0, set()
    for _ in range(n):
        kept.add(round(position))
        position += stride
    return sorted(kept)


def test_space_timesteps():
    s50, s200 = space_timesteps(1000, [50]), space_timesteps(1000, [200])
    assert s50[:3] == [0, 20, 41] and s50[-2:] == [979, 999] and len(s50) == 50
    assert s200[:2] == [0, 5] and s200[-2:] == [994, 999] and len(s200) == 200
    # Stride 166.5: Python rounds 166.5 → 166 and 832.5 → 832 (half to even), not up.
    assert space_timesteps(1000, [7]) == [0, 166, 333, 500, 666, 832, 999]
    for n in range(1, 1001):
        assert space_timesteps(1000, [n]) == reference_space_timesteps(n), n
    # The float accumulation is part of the rule: at N = 21 it differs from round(k·stride).
    exact = [round(k * 999 / 20) for k in range(21)]
    assert space_timesteps(1000, [21]) != exact


class LDMReference:
    """CoSeR's respaced sampler, restated in torch/numpy from LDM's code path.

    Base: float64 betas → ᾱ float64 → float32 buffer. Respacing: β'_k in torch
    float32 from that buffer. register_schedule on the float32 β' with numpy's
    promotions; step: extract tables at k, x̂0 = √(1/ᾱ)x − √(1/ᾱ−1)ε, posterior
    mean, exp(½·logvar)·z, no noise at k = 0.
    """

    def __init__(self, num_steps):
        betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2)
        base = torch.tensor(np.cumprod(1.0 - betas.numpy()), dtype=torch.float32)
        self.timesteps = reference_space_timesteps(num_steps)
        last, new_betas = 1.0, []
        for i, ac_i in enumerate(base):
            if i in self.timesteps:
                new_betas.append((1 - ac_i / last).numpy())
                last = ac_i
        b = np.array(new_betas)
        alphas = 1.0 - b
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        var = b * (1.0 - ac_prev) / (1.0 - ac)
        f32 = dict(dtype=torch.float32)
        self.sqrt_recip = torch.tensor(np.sqrt(1.0 / ac), **f32)
        self.sqrt_recipm1 = torch.tensor(np.sqrt(1.0 / ac - 1), **f32)
        self.logvar = torch.tensor(np.log(np.maximum(var, 1e-20)), **f32)
        self.coef1 = torch.tensor(b * np.sqrt(ac_prev) / (1.0 - ac), **f32)
        self.coef2 = torch.tensor((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac), **f32)

    def step(self, x, eps, k, noise):
        x0 = self.sqrt_recip[k] * x - self.sqrt_recipm1[k] * eps
        mean = self.coef1[k] * x0 + self.coef2[k] * x
        nonzero = float(k != 0)
        return mean + nonzero * (0.5 * self.logvar[k]).exp() * noise


@pytest.mark.parametrize("num_steps", [50, 200])
def test_respaced_loop_matches_ldm_reference(num_steps):
    ref = LDMReference(num_steps)
    schedule = respaced_schedule(num_steps)
    assert schedule.timesteps.tolist() == ref.timesteps[::-1]
    assert schedule.indices.tolist() == list(range(num_steps))[::-1]
    tables = respaced_tables(num_steps)
    np.testing.assert_array_equal(tables["posterior_mean_coef1"], ref.coef1.numpy())
    np.testing.assert_array_equal(tables["posterior_log_variance_clipped"], ref.logvar.numpy())

    noises = step_noises(num_steps, seed=5)
    x_ref = x = start_latent()
    ours, theirs = [], []
    for i in range(num_steps):
        k, t = num_steps - 1 - i, ref.timesteps[num_steps - 1 - i]
        x_ref = ref.step(torch.from_numpy(x_ref), torch.from_numpy(toy_model(x_ref, t)), k,
                         torch.from_numpy(noises[i])).numpy()
        theirs.append(x_ref)
        x = np.asarray(respaced_step(schedule, i, x, toy_model(x, t), noises[i]))
        ours.append(x)
    assert_trajectories_close(ours, theirs, f"respaced N={num_steps}")


# --------------------------------------------------------------------------- jit


def _jit_vs_python(step_fn, schedule, init_carry, noises):
    """Run a sampler as one jitted fori_loop and as a Python loop of eager steps."""

    def body(i, carry):
        x = carry[0]
        eps = toy_model_jax(x, schedule.timesteps[i])
        return step_fn(schedule, i, carry, eps, noises[i])

    fused = jax.jit(lambda s, c: jax.lax.fori_loop(0, s.num_steps, body, c))(schedule, init_carry)
    carry = init_carry
    for i in range(schedule.num_steps):
        carry = body(i, carry)
    return rel_err(fused[0], carry[0])


def test_jitted_fori_loops_equal_python_loops():
    cfg = SchedulerConfig.from_diffusers(SD2_BASE, "ddpm")
    x = jnp.asarray(start_latent())
    noises = jnp.asarray(step_noises(50))
    errors = {
        "ddpm": _jit_vs_python(lambda s, i, c, e, z: (ddpm_step(s, i, c[0], e, z),),
                               ddpm_schedule(cfg, 50), (x,), noises),
        "ddim": _jit_vs_python(lambda s, i, c, e, z: (ddim_step(s, i, c[0], e, z),),
                               ddim_schedule(cfg, 20, eta=1.0), (x,), noises),
        "dpm++": _jit_vs_python(lambda s, i, c, e, z: dpm_solver_step(s, c[1], i, c[0], e),
                                dpm_solver_schedule(
                                    SchedulerConfig.from_diffusers(SD2_BASE, "dpm_solver"), 20),
                                (x, dpm_solver_init_state(x)), noises),
        "respaced": _jit_vs_python(lambda s, i, c, e, z: (respaced_step(s, i, c[0], e, z),),
                                   respaced_schedule(50), (x,), noises),
    }
    print("jit fori_loop vs python loop rel err:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-6, errors


# --------------------------------------------------------------------------- one interface


def _diffusers_loop(kind, config, num_steps, eta, noises):
    """x after every step of diffusers' own scheduler class for `kind`."""
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler}
    ref = cls[kind].from_config(config)
    ref.set_timesteps(num_steps)
    x, out = start_latent(), []
    for i, t in enumerate(ref.timesteps.tolist()):
        eps, xt = torch.from_numpy(toy_model(x, t)), torch.from_numpy(x)
        if kind == "ddim":
            kwargs = {"variance_noise": torch.from_numpy(noises[i])} if eta > 0 else {}
            x = ref.step(eps, t, xt, eta=eta, **kwargs).prev_sample.numpy()
        else:
            x = ref.step(eps, t, xt).prev_sample.numpy()
        out.append(x)
    return ref.timesteps.numpy(), out


@pytest.mark.parametrize("kind,num_steps,eta,spacing", [
    ("ddpm", 20, 0.0, None),
    ("ddim", 10, 0.7, None),
    ("dpmpp", 8, 0.0, None),
    ("ddpm", 2, 0.0, "trailing"),        # sd-turbo's spacing
])
def test_sampler_interface_in_fori_loop_matches_diffusers(kind, num_steps, eta, spacing):
    """make_sampler + sampler_step, run the way the pipeline runs them (the plan as a jit
    argument, the step index traced inside lax.fori_loop), against diffusers' loop."""
    config = dict(SD2_BASE) if spacing is None else {**SD2_BASE, "timestep_spacing": spacing}
    plan = make_sampler(kind, SD2_BASE, num_steps, eta=eta, timestep_spacing=spacing)
    if kind == "ddpm":             # DDPMScheduler draws its own noise: replay its draws
        ref = DDPMScheduler.from_config(config)
        ref.set_timesteps(num_steps)
        timesteps = ref.timesteps.numpy()
        noises = replay_step_noise(timesteps.tolist(), seed=3)
        want = diffusers_ddpm_run(ref, start_latent(), seed=3)
    else:
        noises = list(step_noises(num_steps))
        timesteps, want = _diffusers_loop(kind, config, num_steps, eta, noises)
    np.testing.assert_array_equal(plan.timesteps, timesteps)
    assert plan.needs_noise == (kind == "ddpm" or eta > 0)

    @jax.jit
    def run(plan, x, noises):
        def body(i, carry):
            state, x, trail = carry
            eps = toy_model_jax(x, plan.timesteps[i])
            state, x = sampler_step(plan, state, i, x, eps, noises[i])
            return state, x, trail.at[i].set(x)
        trail = jnp.zeros((plan.num_steps, *x.shape), x.dtype)
        return jax.lax.fori_loop(0, plan.num_steps, body, (sampler_init(plan, x), x, trail))[2]

    got = run(plan, jnp.asarray(start_latent()), jnp.asarray(np.stack(noises)))
    assert_trajectories_close(list(np.asarray(got)), want, f"{kind} via make_sampler")


def test_make_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", SD2_BASE, 10)
    with pytest.raises(ValueError, match="at least one sampling step"):
        make_sampler("ddpm", SD2_BASE, 0)
