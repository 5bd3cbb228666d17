"""VP (variance-preserving) noise schedules, built from diffusers scheduler configs.

The forward process of the SD / SDXL family is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for the
integer training timesteps t = 0 .. T-1, with abar_t = prod_{s <= t} (1 - beta_s). A
``VPSchedule`` holds abar (float32) plus the few static options DDIM needs, and is a pytree (arrays
are leaves, options are static metadata), so it can be passed straight into ``jax.jit``.

``VPSchedule.from_diffusers`` reads the ``scheduler_config.json`` of a DDIM / DDPM / Euler /
PNDM / LCM (...) scheduler and interprets it **as** ``DDIMScheduler.from_config`` would: keys that
are absent take DDIMScheduler's defaults (notably ``clip_sample=True``, ``set_alpha_to_one=True``,
``timestep_spacing="leading"``). Betas and their cumulative product are computed in float64 and
rounded once to float32; diffusers does the same arithmetic in float32, so the two differ by
float32 rounding only (about 1e-7 absolute, see the tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")

# Options DDIM sampling uses, with DDIMScheduler's defaults.
_DDIM_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
    rescale_betas_zero_snr=False)

# Options that only matter to other samplers (or only when an option below is switched on):
# ``DDIMScheduler.from_config`` drops them too.
_IGNORED = frozenset({
    "_class_name", "_diffusers_version", "_use_default_values", "_name_or_path",
    "variance_type", "skip_prk_steps", "interpolation_type", "sigma_min", "sigma_max",
    "dynamic_thresholding_ratio", "sample_max_value", "final_sigmas_type",
    "original_inference_steps", "timestep_scaling", "solver_order", "algorithm_type",
    "solver_type", "lower_order_final", "euler_at_final", "lambda_min_clipped", "use_lu_lambdas",
    "flow_shift", "time_shift_type"})

# Options we do not implement: any value other than the listed one raises.
_REQUIRED = {
    "thresholding": False,          # dynamic thresholding of x0 (pixel-space Imagen trick)
    "use_karras_sigmas": False,     # Euler / DPM sampling grids, not the DDIM grid
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,       # a flow-matching model: use didr_jax.diffusion.flow
    "use_dynamic_shifting": False,
    "timestep_type": "discrete",    # "continuous" feeds the model log-sigmas, not integer t
}


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Glide cosine schedule: beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta),
  f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2."""
  u = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
  f = np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023 (Alg. 1): shift and scale sqrt(abar) so that sqrt(abar_{T-1}) = 0 while
  sqrt(abar_0) is unchanged: r' = (r - r_T) * r_0 / (r_0 - r_T), then back to betas."""
  r = np.sqrt(np.cumprod(1.0 - betas))
  r0, rT = r[0], r[-1]
  abar = ((r - rT) * r0 / (r0 - rT)) ** 2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


@dataclasses.dataclass(frozen=True, eq=False)
class VPSchedule:
  """A discrete VP schedule plus DDIM's options.

  Leaves: ``alphas_cumprod`` (T,) float32 = abar_t, and ``final_alpha_cumprod`` () float32, the
  abar used for the "previous" time of the last DDIM step (1 if ``set_alpha_to_one`` else abar_0).
  Static: ``num_train_timesteps`` T, ``prediction_type`` ("epsilon" | "v_prediction" |
  "sample"), ``timestep_spacing`` ("leading" | "trailing" | "linspace"), ``steps_offset``,
  ``clip_sample`` and ``clip_sample_range`` (clip x0_hat to [-range, range] in DDIM steps).
  """
  alphas_cumprod: jax.Array
  final_alpha_cumprod: jax.Array
  num_train_timesteps: int = 1000
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  clip_sample: bool = False
  clip_sample_range: float = 1.0

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type={self.prediction_type!r}: expected one of "
                       f"{PREDICTION_TYPES}")
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(f"timestep_spacing={self.timestep_spacing!r}: expected one of {SPACINGS}")

  # ------------------------------------------------------------------------------ building

  @classmethod
  def from_betas(cls, betas, *, set_alpha_to_one: bool = True,
                 rescale_betas_zero_snr: bool = False, **options) -> "VPSchedule":
    """abar_t = prod_{s<=t} (1 - beta_s) in float64, stored as float32. ``options`` are the
    static fields (prediction_type, timestep_spacing, steps_offset, clip_sample, ...)."""
    betas = np.asarray(betas, np.float64)
    if rescale_betas_zero_snr:
      betas = _rescale_zero_terminal_snr(betas)
    abar = np.cumprod(1.0 - betas)
    final = 1.0 if set_alpha_to_one else abar[0]
    return cls(alphas_cumprod=jnp.asarray(abar, jnp.float32),
               final_alpha_cumprod=jnp.asarray(final, jnp.float32),
               num_train_timesteps=len(betas), **options)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], *,
                     ignore_unknown: bool = False) -> "VPSchedule":
    """Builds the schedule from a diffusers scheduler config dict, as DDIMScheduler would.

    beta_schedule: "linear" (beta = linspace(beta_start, beta_end, T)), "scaled_linear"
    (beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2), "squaredcos_cap_v2" (Glide
    cosine); ``trained_betas`` overrides all three. ``rescale_betas_zero_snr`` applies zero
    terminal SNR rescaling. Raises ValueError naming the key for options we do not implement
    (thresholding=True, Karras / exponential / beta / flow sigmas, continuous timesteps) and for
    keys we do not know (unless ``ignore_unknown``).
    """
    cfg = dict(_DDIM_DEFAULTS)
    unknown = []
    for key, value in config.items():
      if key in _DDIM_DEFAULTS:
        cfg[key] = value
      elif key in _REQUIRED:
        if value is not None and value != _REQUIRED[key]:
          raise ValueError(f"scheduler option {key}={value!r} is not supported (only "
                           f"{_REQUIRED[key]!r})")
      elif key not in _IGNORED:
        unknown.append(key)
    if unknown and not ignore_unknown:
      raise ValueError(f"unknown scheduler option(s) {unknown}; pass ignore_unknown=True to "
                       "skip them")
    t = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
      betas = np.asarray(cfg["trained_betas"], np.float64)
    elif cfg["beta_schedule"] == "linear":
      betas = np.linspace(cfg["beta_start"], cfg["beta_end"], t, dtype=np.float64)
    elif cfg["beta_schedule"] == "scaled_linear":
      betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, t,
                          dtype=np.float64) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
      betas = _betas_for_alpha_bar(t)
    else:
      raise ValueError(f"beta_schedule={cfg['beta_schedule']!r} is not supported")
    if cfg["prediction_type"] not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type={cfg['prediction_type']!r} is not supported")
    if cfg["timestep_spacing"] not in SPACINGS:
      raise ValueError(f"timestep_spacing={cfg['timestep_spacing']!r} is not supported")
    return cls.from_betas(
        betas, set_alpha_to_one=bool(cfg["set_alpha_to_one"]),
        rescale_betas_zero_snr=bool(cfg["rescale_betas_zero_snr"]),
        prediction_type=cfg["prediction_type"], timestep_spacing=cfg["timestep_spacing"],
        steps_offset=int(cfg["steps_offset"]), clip_sample=bool(cfg["clip_sample"]),
        clip_sample_range=float(cfg["clip_sample_range"]))

  # ------------------------------------------------------------------------------ lookups

  def alpha_cumprod(self, t) -> jax.Array:
    """abar_t for integer t (any shape); t < 0 means "after the last step" and gives
    ``final_alpha_cumprod`` (diffusers' convention for DDIM's last prev_timestep)."""
    t = jnp.asarray(t)
    abar = self.alphas_cumprod[jnp.clip(t, 0, self.num_train_timesteps - 1)]
    return jnp.where(t >= 0, abar, self.final_alpha_cumprod)


jax.tree_util.register_dataclass(
    VPSchedule, data_fields=["alphas_cumprod", "final_alpha_cumprod"],
    meta_fields=["num_train_timesteps", "prediction_type", "timestep_spacing", "steps_offset",
                 "clip_sample", "clip_sample_range"])


def ddim_timesteps(schedule: VPSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The DDIM grid (timesteps, prev_timesteps), both (num_steps,) int32, exactly as diffusers'
  DDIMScheduler.set_timesteps / step compute them (T = num_train_timesteps, n = num_steps):

  - linspace: t_i = round(linspace(0, T-1, n))[::-1]
  - leading:  t_i = (arange(n) * (T // n))[::-1] + steps_offset
  - trailing: t_i = round(arange(T, 0, -T/n)) - 1
  - prev_i = t_i - T // n for every spacing (negative means "use final_alpha_cumprod").

  Host-side NumPy: the grid depends only on static values, so it is a constant under jit.
  (For the few n where float ``arange`` overshoots by one element in trailing mode, diffusers
  would append a bogus timestep -1; we keep the first n.)
  """
  t_max, n = schedule.num_train_timesteps, int(num_steps)
  if not 1 <= n <= t_max:
    raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={t_max}]")
  if schedule.timestep_spacing == "linspace":
    ts = np.linspace(0, t_max - 1, n).round()[::-1].astype(np.int64)
  elif schedule.timestep_spacing == "leading":
    ts = (np.arange(n) * (t_max // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
  else:
    ts = np.round(np.arange(t_max, 0, -t_max / n)).astype(np.int64)[:n] - 1
  prev = ts - t_max // n
  return ts.astype(np.int32), prev.astype(np.int32)
