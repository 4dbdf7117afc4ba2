"""Random blur kernels of the Real-ESRGAN degradation, as pure jnp functions.

Every kernel lives on a fixed 21×21 canvas (offsets −10..10; x is the column
offset, y the row offset) so that its support size can be a traced value: the
shape is evaluated on the whole canvas, everything with |x| or |y| > size // 2 is
set to 0, and the rest is normalised to sum 1. This equals the reference, which
evaluates the shape on a size×size grid, normalises and zero-pads to 21.

Shapes (Q = [x y] Σ⁻¹ [x y]ᵀ, Σ = R(θ) diag(σx², σy²) R(θ)ᵀ):
- Gaussian          exp(−Q / 2)
- generalized       exp(−Q^β / 2)
- plateau           1 / (1 + Q^β)
- circular sinc     ω_c J1(ω_c r) / (2π r), ω_c² / (4π) at r = 0.

Isotropic types use σy = σx and θ = 0. β of the generalized and plateau types is
drawn U[lo, 1) or U[1, hi] with probability 1/2 each, as the reference does; with
the plateau range [1, 2] this makes β = 1 half of the time.

J1 is not in every `jax.scipy.special`; `bessel_j1` uses the polynomial
approximations of Abramowitz & Stegun 9.4.4 (|x| ≤ 3) and 9.4.6 (|x| ≥ 3), whose
absolute error is below 1e-7; evaluated in float32 the measured error on
[−5, 46] (the sinc needs ≤ π·10·√2 ≈ 44.4) is ≤ 5e-7.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsr.data.degrade.presets import KernelSettings

KERNEL_CANVAS = 21
_HALF = KERNEL_CANVAS // 2

_J1_SMALL = (0.5, -0.56249985, 0.21093573, -0.03954289, 0.00443319, -0.00031761, 0.00001109)
_J1_AMPLITUDE = (0.79788456, 0.00000156, 0.01659667, 0.00017105, -0.00249511, 0.00113653,
                 -0.00020033)
_J1_PHASE = (-2.35619449, 0.12499612, 0.00005650, -0.00637879, 0.00074348, 0.00079824,
             -0.00029166)


def _poly(coefficients, t):
    out = jnp.zeros_like(t)
    for c in reversed(coefficients):
        out = out * t + c
    return out


def bessel_j1(x):
    """Bessel function of the first kind, order 1, elementwise (float32, any shape)."""
    x = jnp.asarray(x, jnp.float32)
    ax = jnp.abs(x)
    small = x * _poly(_J1_SMALL, (x / 3.0) ** 2)
    # Evaluate the large-argument branch at ≥ 3 only, so it never divides by 0.
    big_x = jnp.maximum(ax, 3.0)
    u = 3.0 / big_x
    big = _poly(_J1_AMPLITUDE, u) * jnp.cos(big_x + _poly(_J1_PHASE, u)) / jnp.sqrt(big_x)
    return jnp.where(ax <= 3.0, small, jnp.sign(x) * big)


def _grid():
    """Column (x) and row (y) offsets of the canvas, each [21, 21] float32."""
    ax = jnp.arange(-_HALF, _HALF + 1, dtype=jnp.float32)
    return jnp.meshgrid(ax, ax)


def _mask_and_normalise(kernel, size):
    """Zero outside the centred size×size support (size odd, may be traced), sum to 1."""
    x, y = _grid()
    half = jnp.asarray(size, jnp.int32) // 2
    inside = (jnp.abs(x) <= half) & (jnp.abs(y) <= half)
    kernel = jnp.where(inside, kernel, 0.0)
    return kernel / jnp.sum(kernel)


def quadratic_form(sigma_x, sigma_y, theta):
    """Q = [x y] Σ⁻¹ [x y]ᵀ on the canvas, [21, 21]; Σ = R(θ) diag(σx², σy²) R(θ)ᵀ.

    Written in the rotated frame (u, v) = R(θ)ᵀ (x, y), where Σ is diagonal.
    """
    x, y = _grid()
    c, s = jnp.cos(theta), jnp.sin(theta)
    u = c * x + s * y
    v = -s * x + c * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(sigma_x, sigma_y, theta, size=KERNEL_CANVAS):
    """Anisotropic Gaussian (isotropic: σy = σx, θ = 0). [21, 21] float32, sums to 1."""
    return _mask_and_normalise(jnp.exp(-0.5 * quadratic_form(sigma_x, sigma_y, theta)), size)


def generalized_gaussian_kernel(sigma_x, sigma_y, theta, beta, size=KERNEL_CANVAS):
    """exp(−Q^β / 2), [21, 21] float32, sums to 1."""
    q = quadratic_form(sigma_x, sigma_y, theta)
    return _mask_and_normalise(jnp.exp(-0.5 * q ** beta), size)


def plateau_kernel(sigma_x, sigma_y, theta, beta, size=KERNEL_CANVAS):
    """1 / (1 + Q^β), [21, 21] float32, sums to 1."""
    q = quadratic_form(sigma_x, sigma_y, theta)
    return _mask_and_normalise(1.0 / (q ** beta + 1.0), size)


def sinc_kernel(omega_c, size=KERNEL_CANVAS):
    """Circular low-pass (2-D sinc) with cutoff ω_c, [21, 21] float32, sums to 1."""
    x, y = _grid()
    r = jnp.sqrt(x * x + y * y)
    safe_r = jnp.where(r == 0, 1.0, r)
    kernel = omega_c * bessel_j1(omega_c * safe_r) / (2.0 * math.pi * safe_r)
    # The r → 0 limit of ω J1(ω r) / (2π r), since J1(z) ~ z / 2.
    kernel = jnp.where(r == 0, omega_c ** 2 / (4.0 * math.pi), kernel)
    return _mask_and_normalise(kernel, size)


def pulse_kernel():
    """The identity kernel: 1 at the centre of the canvas. [21, 21] float32."""
    return jnp.zeros((KERNEL_CANVAS, KERNEL_CANVAS), jnp.float32).at[_HALF, _HALF].set(1.0)


def _from_unit(u, lo, hi):
    """Map u ~ U[0, 1) to U[lo, hi)."""
    return lo + (hi - lo) * u


def _choose(u, probs):
    """Index i with probability probs[i], from one u ~ U[0, 1) (int32 scalar)."""
    edges = jnp.cumsum(jnp.asarray(probs, jnp.float32))[:-1]
    return jnp.sum(u >= edges).astype(jnp.int32)


def _odd_size(u, size_range):
    """An odd size uniform over lo, lo+2, ..., hi, from one u ~ U[0, 1) (int32 scalar)."""
    lo, hi = size_range
    count = (hi - lo) // 2 + 1
    return lo + 2 * jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)


def _split_beta(u_side, u_value, beta_range):
    """β ~ U[lo, 1) or U[1, hi] with probability 1/2 each."""
    lo, hi = beta_range
    return jnp.where(u_side < 0.5, _from_unit(u_value, lo, 1.0), _from_unit(u_value, 1.0, hi))


def random_kernel(key, settings: KernelSettings):
    """One random blur kernel (kernel 1 or kernel 2 of the pipeline). [21, 21] float32.

    Sinc with probability `sinc_prob` (ω_c ~ U[π/3, π] for sizes < 13, else
    U[π/5, π]), otherwise a Gaussian-family type drawn with `type_probs`. All
    scalars come from one uniform draw (each sampler call costs compile time).
    """
    u = jax.random.uniform(key, (11,))
    size = _odd_size(u[0], settings.size_range)
    kind = _choose(u[1], settings.type_probs)
    isotropic = kind % 2 == 0  # iso, generalized_iso, plateau_iso
    sigma_x = _from_unit(u[2], *settings.sigma_range)
    sigma_y = jnp.where(isotropic, sigma_x, _from_unit(u[3], *settings.sigma_range))
    theta = jnp.where(isotropic, 0.0, _from_unit(u[4], -math.pi, math.pi))
    beta_g = _split_beta(u[5], u[6], settings.betag_range)
    beta_p = _split_beta(u[7], u[8], settings.betap_range)

    q = quadratic_form(sigma_x, sigma_y, theta)
    # Gaussian is the generalized shape with β = 1 (exact: q ** 1.0 == q).
    beta = jnp.where(kind < 2, 1.0, beta_g)
    exponential = jnp.exp(-0.5 * q ** beta)
    plateau = 1.0 / (q ** beta_p + 1.0)
    shape = _mask_and_normalise(jnp.where(kind >= 4, plateau, exponential), size)

    omega = _from_unit(u[9], jnp.where(size < 13, math.pi / 3, math.pi / 5), math.pi)
    use_sinc = u[10] < settings.sinc_prob
    return jnp.where(use_sinc, sinc_kernel(omega, size), shape)


def random_final_sinc(key, prob, omega_range=(math.pi / 3, math.pi),
                      size_range=(7, KERNEL_CANVAS)):
    """The final filter: a sinc with probability `prob`, else the pulse. [21, 21] float32."""
    u = jax.random.uniform(key, (3,))
    size = _odd_size(u[0], size_range)
    omega = _from_unit(u[1], *omega_range)
    return jnp.where(u[2] < prob, sinc_kernel(omega, size), pulse_kernel())
