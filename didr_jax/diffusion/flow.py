"""Flow-matching schedules, Euler and SDE steps with log-probabilities (Flow-GRPO), and the
scanned flow sampler.

Conventions (METHODS section 0): x_sig = (1 - sig) x0 + sig eps, sig in [0, 1] (1 = pure noise),
velocity v = eps - x0 = dx/dsig. Samplers pass ``denoise_fn(x, sig)`` the flow sigma as a float32
(B,) vector and expect v back. Backbones map sigma to their own time input:

- SD3-style DiTs (FlowMatchEulerDiscreteScheduler + transformer): timestep = 1000 sig.
- Z-Image (diffusers' ZImagePipeline): the scheduler timestep is T = 1000 sig, but the
  transformer receives t = (1000 - T) / 1000 ~= 1 - sig (0 = noise, 1 = clean; see
  ``zimage_model_time``), and the pipeline **negates** its output before the Euler step, i.e. the
  transformer predicts x0 - eps = -v. Its pipeline computes sigmas as
  ``zimage_sigmas``: linspace(1, 1/n, n) shifted by the scheduler's static ``shift`` or, when
  ``use_dynamic_shifting``, by mu = calculate_shift(image_seq_len) with
  image_seq_len = (latent_h / 2) (latent_w / 2).

Steps from sig to sig' < sig (dt = sig' - sig < 0):

- Euler (ODE):  x' = x + dt v
- SDE (Flow-GRPO), noise level a:
    sig_t = a sqrt(sig / (1 - sig))   (at sig = 1 the denominator uses the largest grid sigma < 1)
    mean  = x (1 + sig_t^2 dt / (2 sig)) + v (1 + sig_t^2 (1 - sig) / (2 sig)) dt
    std   = sig_t sqrt(-dt);  x' = mean + std z;  log p as ``ddim.gaussian_log_prob``
  a = 0 is exactly the Euler step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import param
from didr_jax.diffusion.ddim import SampleOutput, gaussian_log_prob, run_sampler


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """mu, linear in the token count: mu = base_shift + (max_shift - base_shift)
  (image_seq_len - base_seq_len) / (max_seq_len - base_seq_len) (Flux / Z-Image)."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return image_seq_len * m + (base_shift - m * base_seq_len)


_FLOW_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift_terminal=None,
    time_shift_type="exponential")
_FLOW_REQUIRED = {"invert_sigmas": False, "use_karras_sigmas": False,
                  "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "stochastic_sampling": False}
_FLOW_IGNORED = frozenset({"_class_name", "_diffusers_version", "_use_default_values",
                           "_name_or_path"})


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
  """The options of diffusers' FlowMatchEulerDiscreteScheduler that shape its sigma grid."""
  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  shift_terminal: float | None = None
  time_shift_type: str = "exponential"

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], *,
                     ignore_unknown: bool = False) -> "FlowMatchConfig":
    """From a scheduler_config.json dict; unsupported options (inverted / Karras / exponential /
    beta sigmas, stochastic_sampling) and unknown keys raise ValueError naming the key."""
    cfg, unknown = dict(_FLOW_DEFAULTS), []
    for key, value in config.items():
      if key in _FLOW_DEFAULTS:
        if value is not None or key == "shift_terminal":
          cfg[key] = value  # None means "default" (diffusers' pipelines read them that way)
      elif key in _FLOW_REQUIRED:
        if value is not None and value != _FLOW_REQUIRED[key]:
          raise ValueError(f"scheduler option {key}={value!r} is not supported")
      elif key not in _FLOW_IGNORED:
        unknown.append(key)
    if unknown and not ignore_unknown:
      raise ValueError(f"unknown scheduler option(s) {unknown}; pass ignore_unknown=True to "
                       "skip them")
    if cfg["time_shift_type"] not in ("exponential", "linear"):
      raise ValueError(f"time_shift_type={cfg['time_shift_type']!r} is not supported")
    return cls(**cfg)

  def mu(self, image_seq_len: int) -> float:
    """calculate_shift with this config's base / max values."""
    return calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                           self.base_shift, self.max_shift)


def _static_shift(s, shift: float):
  """sig -> shift sig / (1 + (shift - 1) sig)."""
  return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(config: FlowMatchConfig, num_steps: int | None = None, *,
                sigmas=None, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(sigmas (n+1,), timesteps (n,)) float32 as FlowMatchEulerDiscreteScheduler.set_timesteps
  computes them: the terminal 0 is appended to sigmas and timesteps = 1000 sigmas[:-1]
  (num_train_timesteps in general).

  Without ``sigmas`` the base grid is linspace(T sig_max, T sig_min, n) / T with sig_max/min the
  ends of the (statically shifted) training grid; then the shift: exponential dynamic
  exp(mu) / (exp(mu) + 1/sig - 1) (linear: mu / (mu + 1/sig - 1)) when use_dynamic_shifting,
  else the static shift; then the optional stretch to ``shift_terminal``. Host-side NumPy with
  diffusers' dtypes (float64 base grid, float32 for user sigmas), so the values match bitwise.
  """
  if config.use_dynamic_shifting and mu is None:
    raise ValueError("use_dynamic_shifting needs mu (see calculate_shift / FlowMatchConfig.mu)")
  t_train = config.num_train_timesteps
  if sigmas is None:
    if num_steps is None:
      raise ValueError("pass num_steps or sigmas")
    # Ends of the training grid, in float32 as the scheduler's constructor computes them.
    ends = np.array([t_train, 1], np.float32) / np.float32(t_train)
    if not config.use_dynamic_shifting:
      ends = _static_shift(ends, config.shift)
    s = np.linspace(float(ends[0]) * t_train, float(ends[1]) * t_train, num_steps) / t_train
  else:
    s = np.asarray(sigmas).astype(np.float32)
  if config.use_dynamic_shifting:
    if config.time_shift_type == "exponential":
      s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    else:
      s = mu / (mu + (1 / s - 1))
  else:
    s = _static_shift(s, config.shift)
  if config.shift_terminal:
    one_minus = 1 - s
    s = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
  s = np.asarray(s).astype(np.float32)
  timesteps = s * np.float32(t_train)
  return np.concatenate([s, np.zeros(1, np.float32)]), timesteps


def zimage_sigmas(config: FlowMatchConfig, num_steps: int, image_seq_len: int, *,
                  sigmas=None) -> tuple[np.ndarray, np.ndarray]:
  """The (sigmas (n+1,), timesteps (n,)) grid of diffusers' ZImagePipeline: base sigmas
  linspace(1, 1/n, n) (or ``sigmas``), mu = config.mu(image_seq_len), then ``flow_sigmas``
  (mu only matters when the config has use_dynamic_shifting).

  The pipeline builds the base grid with float32 ``torch.linspace``, whose rounding depends on
  the CPU's vector width; we round the exact (float64) grid instead, so results can differ from
  the pipeline's by one float32 ulp (given the same base ``sigmas`` they match bitwise)."""
  if sigmas is None:
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
  return flow_sigmas(config, sigmas=[float(v) for v in sigmas], mu=config.mu(image_seq_len))


def zimage_model_time(sig) -> jax.Array:
  """The time input of the Z-Image transformer for flow sigma sig, as its pipeline computes it
  in float32: T = 1000 sig (the scheduler timestep), t = (1000 - T) / 1000 ~= 1 - sig.
  (Same float32 ops; XLA's division may round the last bit differently from torch's.)"""
  timestep = jnp.asarray(sig, jnp.float32) * 1000.0
  return (1000.0 - timestep) / 1000.0


def euler_step(v: jax.Array, x: jax.Array, sig, sig_next) -> jax.Array:
  """x' = x + (sig' - sig) v (the deterministic flow ODE step, diffusers' scheduler.step)."""
  dt = jnp.asarray(sig_next) - jnp.asarray(sig)
  return x + param.bcast(dt, x) * v


def sde_mean_std(v: jax.Array, x: jax.Array, sig, sig_next, a,
                 sigma_cap=None) -> tuple[jax.Array, jax.Array]:
  """(mean, std) of the Flow-GRPO SDE step sig -> sig' (see module docstring).

  ``sigma_cap`` replaces sig in the denominator 1 - sig where sig >= 1 (the largest grid sigma
  below 1; default sig', which is that value on a grid starting at 1). std has sig's shape."""
  sig = jnp.asarray(sig, jnp.float32)
  sig_next = jnp.asarray(sig_next, jnp.float32)
  cap = sig_next if sigma_cap is None else jnp.asarray(sigma_cap, jnp.float32)
  dt = sig_next - sig
  sig_t = a * jnp.sqrt(sig / (1.0 - jnp.where(sig >= 1.0, cap, sig)))
  # mean = x (1 + k dt) + v (1 + k (1 - sig)) dt, k = sig_t^2 / (2 sig), evaluated as the Euler
  # step plus a correction, so a = 0 gives exactly ``euler_step``.
  k_dt = sig_t ** 2 / (2.0 * sig) * dt
  mean = euler_step(v, x, sig, sig_next) + param.bcast(k_dt, x) * (
      x + param.bcast(1.0 - sig, x) * v)
  return mean, sig_t * jnp.sqrt(-dt)


def sde_step(v_hat: jax.Array, x: jax.Array, sig, sig_next, a, noise: jax.Array | None, *,
             sigma_cap=None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One SDE step: (x_next, log_prob (B,), mean, std); noise None means z = 0. As in
  ``ddim_step`` the log-prob sees x_next through stop_gradient."""
  mean, std = sde_mean_std(v_hat, x, sig, sig_next, a, sigma_cap)
  x_next = mean if noise is None else mean + param.bcast(std, mean) * noise
  return x_next, gaussian_log_prob(jax.lax.stop_gradient(x_next), mean, std), mean, std


def sde_log_prob(v_hat: jax.Array, x: jax.Array, x_next: jax.Array, sig, sig_next, a, *,
                 sigma_cap=None) -> jax.Array:
  """log p(x_next | x) (B,) of a stored transition under a (new) velocity."""
  mean, std = sde_mean_std(v_hat, x, sig, sig_next, a, sigma_cap)
  return gaussian_log_prob(x_next, mean, std)


def largest_sigma_below_one(sigmas: jax.Array) -> jax.Array:
  """max{sig in grid : sig < 1} (jit-friendly)."""
  sigmas = jnp.asarray(sigmas, jnp.float32)
  return jnp.max(jnp.where(sigmas < 1.0, sigmas, 0.0))


def flow_sample(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], x_1: jax.Array,
                sigmas, *, a=0.7, rng: jax.Array | None = None, noise: jax.Array | None = None,
                return_outputs: bool = False) -> SampleOutput:
  """Flow sampling over ``sigmas`` ((n+1,) including the terminal 0) as one ``lax.scan``:
  SDE steps with noise level a (a = 0: Euler ODE). ``denoise_fn(x, sig)`` gets sig as a float32
  (B,) vector and returns the (guided) velocity. Noise per step: ``noise`` (n, B, ...) if given,
  else from ``rng``; without either, a must be the literal 0. Same outputs as ``ddim_sample``
  (timesteps / next_timesteps hold sigmas[:-1] / sigmas[1:])."""
  sigmas = jnp.asarray(sigmas, jnp.float32)
  cap = largest_sigma_below_one(sigmas)

  def step(v, x, sig, sig_next, z):
    x_next, log_prob, _, _ = sde_step(v, x, sig, sig_next, a, z, sigma_cap=cap)
    return x_next, log_prob

  return run_sampler(step, denoise_fn, x_1, sigmas[:-1], sigmas[1:], rng=rng, noise=noise,
                     stochastic=a, return_outputs=return_outputs)
