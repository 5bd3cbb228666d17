"""DDIM steps with log-probabilities (DDPO's MDP view of VP sampling, docs/methods.md §1).

One step from grid time t to t_prev (t_prev < 0 means "to the end": abar_prev =
final_alpha_cumprod), with eps_hat / x0_hat from the model output (``param.to_x0_eps``):

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)      (clipped if clip_sample)
    std    = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    mean   = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps_hat
    x_prev = mean + std z,   z ~ N(0, I)
    log p  = mean over non-batch dims of log N(x_prev; mean, std^2)  (float32)

As in diffusers, clipping applies to x0_hat only (eps_hat is not re-derived). eta = 0 is
diffusers' DDIMScheduler.step; eta = 1 with the same z is DDIMScheduler.step(...,
variance_noise=z). Samplers take ``denoise_fn(x_t, t) -> model_output`` (already guided), with t
an int32 (B,) vector of training timesteps, and run the whole trajectory as one ``lax.scan``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import param
from didr_jax.diffusion.schedules import VPSchedule, ddim_timesteps

LOG_STD_FLOOR = 1e-6
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SampleOutput(NamedTuple):
  """A sampled trajectory (shared by ``ddim_sample`` and ``flow.flow_sample``).

  sample: (B, ...) the final x_0; latents: (num_steps + 1, B, ...) x_T, ..., x_0;
  log_probs: (num_steps, B) float32 log p(x_{i+1} | x_i) of each transition;
  timesteps: (num_steps,) the time of each step's input (VP: int timestep; flow: sigma);
  next_timesteps: (num_steps,) the time each step moves to (VP: DDIM's prev_timestep, negative
  for the last step; flow: the next sigma); outputs: (num_steps, B, ...) model outputs or None;
  levels: (num_steps,) float32 noise level of each step (DDIM eta / flow a); stochastic:
  (num_steps,) bool, the steps whose std > LOG_STD_FLOOR (the MDP's actions; the others are
  deterministic and carry log-prob 0).
  """
  sample: jax.Array
  latents: jax.Array
  log_probs: jax.Array
  timesteps: jax.Array
  next_timesteps: jax.Array
  outputs: jax.Array | None = None
  levels: jax.Array | None = None
  stochastic: jax.Array | None = None


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std) -> jax.Array:
  """Per-sample log N(x; mean, std^2 I) averaged (not summed) over all non-batch dims, float32:

      mean_dims[ -(x - mean)^2 / (2 std^2) - log(std) - log(2 pi) / 2 ]

  std is a scalar or (B,). A (numerically) deterministic transition, std <= 1e-6 (eta = 0,
  a = 0, or DDIM's last step when abar_prev = 1), has no density and gets log-prob 0 (not part of
  the MDP: it adds nothing to a trajectory's log-likelihood, and a recomputed value is 0 too, so
  the PPO ratio there is 1; trainers also mask such steps out of the loss)."""
  x = x.astype(jnp.float32)
  mean = mean.astype(jnp.float32)
  std = param.bcast(jnp.asarray(std, jnp.float32), x)
  stochastic = std > LOG_STD_FLOOR
  std = jnp.where(stochastic, std, LOG_STD_FLOOR)
  quad = jnp.where(stochastic, (x - mean) ** 2 / (2.0 * std ** 2), 0.0)
  lp = jnp.where(stochastic, -quad - jnp.log(std) - _HALF_LOG_2PI, 0.0)
  return lp.mean(axis=tuple(range(1, x.ndim)))


def ddim_mean_std(output: jax.Array, x_t: jax.Array, t, t_prev, schedule: VPSchedule,
                  eta) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean, std, x0_hat) of the DDIM transition t -> t_prev (see module docstring).
  t, t_prev: int scalars or (B,); std has t's shape."""
  abar_t = schedule.alpha_cumprod(t)
  abar_prev = schedule.alpha_cumprod(t_prev)
  x0, eps = param.to_x0_eps(output, x_t, jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t),
                            schedule.prediction_type)
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  std = ddim_std(t, t_prev, schedule, eta)
  # Clamp: rounding can push 1 - abar_prev - std^2 a hair below 0 at eta = 1 (diffusers: NaN).
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - std ** 2, 0.0))
  mean = param.bcast(jnp.sqrt(abar_prev), x0) * x0 + param.bcast(direction, eps) * eps
  return mean, std, x0


def ddim_std(t, t_prev, schedule: VPSchedule, eta) -> jax.Array:
  """The DDIM step std eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
  It is also what the KL to a reference divides by (KL = ||mu - mu_ref||^2 / (2 std^2), the
  exact KL of the two step Gaussians): unlike the flow SDE, whose noise coefficient sig_t is
  scaled by sqrt(|dt|) per step, a DDIM step is a discrete Gaussian kernel with no separate
  time increment, so its std is the analogue of both Flow-GRPO's sig_t and of CPS's std."""
  abar_t = schedule.alpha_cumprod(t)
  abar_prev = schedule.alpha_cumprod(t_prev)
  return eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))


def ddim_step(output: jax.Array, x_t: jax.Array, t, t_prev, schedule: VPSchedule, eta,
              noise: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One DDIM step: (x_prev, log_prob (B,), mean, std). ``noise`` is z (None: zeros, only
  meaningful with eta = 0). The log-prob sees x_prev through stop_gradient, so its gradient
  flows only through the mean (the policy-gradient convention)."""
  mean, std, _ = ddim_mean_std(output, x_t, t, t_prev, schedule, eta)
  x_prev = mean if noise is None else mean + param.bcast(std, mean) * noise
  log_prob = gaussian_log_prob(jax.lax.stop_gradient(x_prev), mean, std)
  return x_prev, log_prob, mean, std


def ddim_log_prob(output: jax.Array, x_t: jax.Array, x_prev: jax.Array, t, t_prev,
                  schedule: VPSchedule, eta) -> jax.Array:
  """log p(x_prev | x_t) (B,) of a stored transition under a (new) model output; with the
  sampling-time output it equals the log_prob ``ddim_step`` returned (ratio 1 at step 0)."""
  mean, std, _ = ddim_mean_std(output, x_t, t, t_prev, schedule, eta)
  return gaussian_log_prob(x_prev, mean, std)


def _is_literal_zero(eta) -> bool:
  if isinstance(eta, (int, float)):
    return eta == 0
  if isinstance(eta, np.ndarray):
    return not np.any(eta)
  return False


def _step_noise(rng, noise, eta, num_steps: int, shape, dtype):
  """Per-step noise source for the scan: an explicit (n, B, ...) array, n keys, or None."""
  if noise is not None:
    noise = jnp.asarray(noise, dtype)
    if noise.shape != (num_steps,) + tuple(shape):
      raise ValueError(f"noise has shape {noise.shape}, expected {(num_steps,) + tuple(shape)}")
    return noise, None
  if rng is not None:
    return None, jax.random.split(rng, num_steps)
  if _is_literal_zero(eta):
    return None, None
  raise ValueError("a stochastic sampler (eta / a not a literal 0) needs rng or noise")


def step_levels(eta, num_steps: int) -> jax.Array:
  """A noise level per step: a scalar broadcast to (num_steps,), or an (num_steps,) vector."""
  levels = jnp.asarray(eta, jnp.float32)
  if levels.ndim == 0:
    return jnp.broadcast_to(levels, (num_steps,))
  if levels.shape != (num_steps,):
    raise ValueError(f"per-step noise levels have shape {levels.shape}, expected ({num_steps},)")
  return levels


def run_sampler(step_fn: Callable, denoise_fn: Callable, x_init: jax.Array, times: jax.Array,
                next_times: jax.Array, *, levels, rng, noise, return_outputs: bool,
                ) -> SampleOutput:
  """The shared ``lax.scan`` of every sampler: for each (t, t_next, level),
  out = denoise_fn(x, broadcast t to (B,)); x, log_prob, std = step_fn(out, x, t, t_next,
  level, z). ``levels`` is a scalar or an (n,) vector. Steps whose std is <= LOG_STD_FLOOR
  (level 0, or a schedule-deterministic step) are recorded with log-prob 0 and
  stochastic = False."""
  n = times.shape[0]
  b = x_init.shape[0]
  noises, keys = _step_noise(rng, noise, levels, n, x_init.shape, x_init.dtype)
  level_vec = step_levels(levels, n)

  def body(x, inp):
    t, t_next, level, z, key = inp
    if key is not None:
      z = jax.random.normal(key, x.shape, x.dtype)
    out = denoise_fn(x, jnp.broadcast_to(t, (b,)))
    x_next, log_prob, std = step_fn(out, x, t, t_next, level, z)
    stochastic = jnp.asarray(std, jnp.float32) > LOG_STD_FLOOR
    log_prob = jnp.where(stochastic, log_prob, 0.0)
    x_next = x_next.astype(x.dtype)  # keep the carry's dtype (bf16 outputs promote)
    return x_next, (x_next, log_prob, stochastic, out if return_outputs else None)

  final, (xs, log_probs, stoch, outs) = jax.lax.scan(
      body, x_init, (times, next_times, level_vec, noises, keys))
  latents = jnp.concatenate([x_init[None], xs], axis=0)
  return SampleOutput(final, latents, log_probs, times, next_times, outs, level_vec, stoch)


def ddim_sample(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], x_T: jax.Array,
                schedule: VPSchedule, num_steps: int, *, eta=1.0, rng: jax.Array | None = None,
                noise: jax.Array | None = None, return_outputs: bool = False) -> SampleOutput:
  """DDIM sampling from x_T over ``ddim_timesteps(schedule, num_steps)`` as one ``lax.scan``.

  ``denoise_fn(x_t, t)`` gets t as an int32 (B,) vector and returns the (guided) model output in
  ``schedule.prediction_type``. Noise per step: ``noise`` (num_steps, B, ...) if given, else drawn
  from ``rng`` (split per step); without either, eta must be the literal 0. ``num_steps`` and
  ``return_outputs`` are static under jit; eta (a scalar or a (num_steps,) per-step vector) may
  be traced. Deterministic steps (eta 0, or the last step when abar_prev = 1) get log-prob 0.
  """
  ts, prevs = ddim_timesteps(schedule, num_steps)

  def step(out, x, t, t_prev, level, z):
    x_prev, log_prob, _, std = ddim_step(out, x, t, t_prev, schedule, level, z)
    return x_prev, log_prob, std

  return run_sampler(step, denoise_fn, x_T, jnp.asarray(ts), jnp.asarray(prevs), levels=eta,
                     rng=rng, noise=noise, return_outputs=return_outputs)
