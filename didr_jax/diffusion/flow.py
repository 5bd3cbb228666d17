"""Flow-matching schedules, Euler and SDE steps with log-probabilities (Flow-GRPO), and the
scanned flow sampler.

Conventions (docs/methods.md §0): x_sig = (1 - sig) x0 + sig eps, sig in [0, 1] (1 = pure noise),
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
- CPS (coefficients-preserving sampling, Wang & Yu 2025; Flow-GRPO's ``sde_type="cps"``):
    std   = sig' sin(a pi / 2)
    x0_hat = x - sig v,  x1_hat = x + (1 - sig) v
    mean  = (1 - sig') x0_hat + sqrt(sig'^2 - std^2) x1_hat;  x' = mean + std z
  x' has exactly the coefficients of a point on the path, (1 - sig') x0 + sig' (noise), with
  unit-variance noise; the last step (sig' = 0) is deterministic. Flow-GRPO's CPS log-prob keeps
  only -(x' - mean)^2 (constants and the 1 / (2 std^2) scale dropped); ours is the full Gaussian
  log-density, like every other step here, so PPO ratios mean the same thing for both types.
  a = 0 is exactly the Euler step in both types.

The noise level a may differ per step (``flow_sample`` takes a scalar or an (n,) vector): 0 on a
step makes it an ODE step, which the samplers record with log-prob 0 (no density; not part of the
MDP). KL to a reference (``step_kl_std``): Flow-GRPO divides ||mu - mu_ref||^2 / 2 by sig_t^2,
the SDE's noise coefficient (not the step variance sig_t^2 |dt|), and for CPS by std^2.
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


def cps_mean_std(v: jax.Array, x: jax.Array, sig, sig_next, a) -> tuple[jax.Array, jax.Array]:
  """(mean, std) of the CPS step sig -> sig' (see module docstring), written as the Euler step
  plus (sqrt(sig'^2 - std^2) - sig') x1_hat so that a = 0 gives exactly ``euler_step``."""
  sig = jnp.asarray(sig, jnp.float32)
  sig_next = jnp.asarray(sig_next, jnp.float32)
  std = sig_next * jnp.sin(jnp.asarray(a, jnp.float32) * (jnp.pi / 2))
  x1_hat = x + param.bcast(1.0 - sig, x) * v
  coef = jnp.sqrt(jnp.maximum(sig_next ** 2 - std ** 2, 0.0)) - sig_next
  mean = euler_step(v, x, sig, sig_next) + param.bcast(coef, x) * x1_hat
  return mean, std


SDE_TYPES = ("sde", "cps")


def step_mean_std(v: jax.Array, x: jax.Array, sig, sig_next, a, sde_type: str = "sde",
                  sigma_cap=None) -> tuple[jax.Array, jax.Array]:
  """(mean, std) of one policy step of ``sde_type`` ("sde": Flow-GRPO, "cps")."""
  if sde_type == "sde":
    return sde_mean_std(v, x, sig, sig_next, a, sigma_cap)
  if sde_type == "cps":
    return cps_mean_std(v, x, sig, sig_next, a)
  raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")


def step_kl_std(sig, sig_next, a, sde_type: str = "sde", sigma_cap=None) -> jax.Array:
  """The std that Flow-GRPO's KL to the reference divides by, KL = ||mu - mu_ref||^2 /
  (2 s^2) averaged over dims: for "sde" s = sig_t = a sqrt(sig / (1 - sig)), the noise
  coefficient of the SDE (the exact KL of the two step Gaussians would use sig_t^2 |dt|, i.e.
  be 1 / |dt| larger); for "cps" s = the step std sig' sin(a pi / 2)."""
  sig = jnp.asarray(sig, jnp.float32)
  sig_next = jnp.asarray(sig_next, jnp.float32)
  if sde_type == "cps":
    return cps_mean_std(jnp.zeros(()), jnp.zeros(()), sig, sig_next, a)[1]
  cap = sig_next if sigma_cap is None else jnp.asarray(sigma_cap, jnp.float32)
  return a * jnp.sqrt(sig / (1.0 - jnp.where(sig >= 1.0, cap, sig)))


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
                sigmas, *, a=0.7, sde_type: str = "sde", rng: jax.Array | None = None,
                noise: jax.Array | None = None, return_outputs: bool = False) -> SampleOutput:
  """Flow sampling over ``sigmas`` ((n+1,) including the terminal 0) as one ``lax.scan``:
  ``sde_type`` steps ("sde" or "cps") with noise level a, a scalar or an (n,) per-step vector
  (a = 0: the Euler ODE step, recorded with log-prob 0). ``denoise_fn(x, sig)`` gets sig as a
  float32 (B,) vector and returns the (guided) velocity. Noise per step: ``noise`` (n, B, ...)
  if given, else from ``rng``; without either, a must be the literal 0. Same outputs as
  ``ddim_sample`` (timesteps / next_timesteps hold sigmas[:-1] / sigmas[1:], levels the a of
  each step)."""
  sigmas = jnp.asarray(sigmas, jnp.float32)
  cap = largest_sigma_below_one(sigmas)
  if sde_type not in SDE_TYPES:
    raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")

  def step(v, x, sig, sig_next, level, z):
    mean, std = step_mean_std(v, x, sig, sig_next, level, sde_type, cap)
    x_next = mean if z is None else mean + param.bcast(std, mean) * z
    return x_next, gaussian_log_prob(jax.lax.stop_gradient(x_next), mean, std), std

  return run_sampler(step, denoise_fn, x_1, sigmas[:-1], sigmas[1:], levels=a, rng=rng,
                     noise=noise, return_outputs=return_outputs)
