"""Forward kernels q(x_t | x0), the conditional re-noising kernel q(x_tau | x_s), and random
training times, for both families (written once against (alpha, sigma), see ``param``).

- VP:   alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), integer t in [0, T).
- flow: alpha = 1 - sig, sigma = sig, sig in [0, 1].

Conditional kernel (tau noisier than s): with x_s = alpha_s x0 + sigma_s eps_1,
x_tau = a x_s + b eps_2, a = alpha_tau / alpha_s, b = sqrt(sigma_tau^2 - (a sigma_s)^2), has the
marginal q(x_tau | x0) = N(alpha_tau x0, sigma_tau^2). For flow this is docs/methods.md §0's
a = (1 - sig_tau) / (1 - sig_s), b = sqrt(sig_tau^2 - (sig_s a)^2); for VP it is
a = sqrt(abar_tau / abar_s), b = sqrt(1 - abar_tau / abar_s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax.diffusion.param import bcast
from didr_jax.diffusion.schedules import VPSchedule


def vp_alpha_sigma(schedule: VPSchedule, t) -> tuple[jax.Array, jax.Array]:
  """(sqrt(abar_t), sqrt(1 - abar_t)) for integer t (t < 0 gives final_alpha_cumprod)."""
  abar = schedule.alpha_cumprod(t)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def flow_alpha_sigma(sig) -> tuple[jax.Array, jax.Array]:
  """(1 - sig, sig)."""
  sig = jnp.asarray(sig)
  return 1.0 - sig, sig


def q_sample(x0: jax.Array, eps: jax.Array, alpha, sigma) -> jax.Array:
  """x_t = alpha x0 + sigma eps (alpha, sigma scalars or (B,))."""
  return bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps


def renoise_coeffs(alpha_s, sigma_s, alpha_tau, sigma_tau) -> tuple[jax.Array, jax.Array]:
  """(a, b) of q(x_tau | x_s) = N(a x_s, b^2): a = alpha_tau / alpha_s,
  b = sqrt(max(sigma_tau^2 - (a sigma_s)^2, 0)) (the clamp only absorbs rounding at tau = s)."""
  a = jnp.asarray(alpha_tau) / jnp.asarray(alpha_s)
  b = jnp.sqrt(jnp.maximum(jnp.asarray(sigma_tau) ** 2 - (a * sigma_s) ** 2, 0.0))
  return a, b


def renoise(x_s: jax.Array, eps: jax.Array, alpha_s, sigma_s, alpha_tau, sigma_tau) -> jax.Array:
  """x_tau = a x_s + b eps with (a, b) from ``renoise_coeffs``."""
  a, b = renoise_coeffs(alpha_s, sigma_s, alpha_tau, sigma_tau)
  return q_sample(x_s, eps, a, b)


def flow_renoise(x_s: jax.Array, eps: jax.Array, sig_s, sig_tau) -> jax.Array:
  """Flow conditional kernel: a = (1 - sig_tau)/(1 - sig_s), b = sqrt(sig_tau^2 - (sig_s a)^2)."""
  return renoise(x_s, eps, *flow_alpha_sigma(sig_s), *flow_alpha_sigma(sig_tau))


def vp_renoise(x_s: jax.Array, eps: jax.Array, schedule: VPSchedule, s, tau) -> jax.Array:
  """VP conditional kernel: x_tau = sqrt(abar_tau/abar_s) x_s + sqrt(1 - abar_tau/abar_s) eps."""
  return renoise(x_s, eps, *vp_alpha_sigma(schedule, s), *vp_alpha_sigma(schedule, tau))


def sample_fraction(rng: jax.Array, shape, t_min: float = 0.0, t_max: float = 1.0) -> jax.Array:
  """u ~ Uniform[t_min, t_max) (float32): a random time as a fraction of the process."""
  return jax.random.uniform(rng, shape, jnp.float32, t_min, t_max)


def sample_vp_timesteps(rng: jax.Array, shape, num_train_timesteps: int, t_min: float = 0.0,
                        t_max: float = 1.0) -> jax.Array:
  """Integer t ~ Uniform{int(t_min T), ..., int(t_max T)} (inclusive, clipped to T - 1), int32;
  e.g. DMD's [0.02, 0.98] T -> {20, ..., 980}."""
  lo = int(t_min * num_train_timesteps)
  hi = min(int(t_max * num_train_timesteps), num_train_timesteps - 1)
  return jax.random.randint(rng, shape, lo, hi + 1, jnp.int32)


def sample_flow_sigmas(rng: jax.Array, shape, t_min: float = 0.0, t_max: float = 1.0,
                       shift: float = 1.0) -> jax.Array:
  """sig = shift u / (1 + (shift - 1) u) with u ~ Uniform[t_min, t_max) (shift 1: sig = u), the
  same static shift diffusers' FlowMatchEulerDiscreteScheduler applies to its grid."""
  u = sample_fraction(rng, shape, t_min, t_max)
  return shift * u / (1.0 + (shift - 1.0) * u)
