"""The ``didr`` config section (DIDR / DI / DI++, docs/methods.md §3) and its checks.

Batch semantics for DIDR (the shared sections of ``base_config()``):
  sample.batch_size    generator samples per generator update (global; also each fake update's)
  sample.num_batches   generator updates per epoch (each after ``didr.fake_updates`` fake ones)
  train.*  both networks' optimizers, overridden per network by ``didr.<network>_<key>``
           (``didr.generator_adam_b1``, ``didr.fake_learning_rate``, ...; train/optim.py)
  eval.num_steps / eval.eta   ignored (the generator samples in one call)
"""

from __future__ import annotations

import ml_collections

from didr_jax.errors import ConfigError
from didr_jax.losses import didr as didr_losses
from didr_jax.train import optim


def didr_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.mode = "didr"            # "didr" | "di" (no reward) | "dipp" (DI++: terminal reward)
  d.generator_path = ""      # one-step checkpoint folder (diffusers); "" = copy of the teacher
  d.generator_time = -1.0    # conditioning time of the generator; -1 = VP t 399 (DMD2), flow sig 1
  # Differentiable reward {name: weight}; empty = the entries of config.rewards that are
  # differentiable (config.rewards stays the host reward logged as reward_mean).
  d.reward = ml_collections.ConfigDict()
  d.reward_scale = 1.0       # 1/beta for DIDR, alpha_r for DI++ (ignored by DI)
  d.ref_cfg = 8.0            # CFG w of the frozen reference (the real score and the DRP)
  d.t_min = 0.02             # training times t ~ U[t_min, t_max] of the process ([0.02, 0.98] T)
  d.t_max = 0.98
  # The Diffused Reward Proxy. Default K = 1 (Tweedie's x0-hat, one reference call): exact for a
  # Gaussian reference with a linear reward at every t, as is the ancestral K >= 2 (eta = 1);
  # for curved rewards every single-draw DRP is a proxy, and the ancestral K = 2 one has the
  # same expectation as K = 1 (Gaussian reference, quadratic reward: bias 37% / 47% at flow
  # sigma 0.5 / 0.85 for both) with a 18-20% spread and twice the calls
  # (benchmarks/didr_drp_table.py, docs/didr_drp_table.md). More draws (drp_draws, softmax
  # weights) cut the bias only slowly (K = 4, M = 16: 20% / 26% at 64 calls). The deterministic
  # K >= 2 (drp_eta = 0) overshoots: 124% at sigma 0.5, 23x at 0.95.
  d.drp_steps = 1
  d.drp_eta = 1.0            # the ancestral steps' noise when drp_steps >= 2
  d.drp_t_max = 1.0          # DRS only where t <= drp_t_max (fraction of the process; 1 = no cut)
  d.drp_draws = 1            # multi-draw DRP (needs drp_steps >= 2 and drp_eta > 0)
  d.drp_draw_weights = "softmax"
  d.drp_remat = True
  # The bound on the x0-unit DRS term (losses.didr.bounded_drs_term): the exact term is a
  # difference of two posterior means of data, so it lies within the data range's width. "auto":
  # the range the backbone's sampler clips x0 to (pixel-space VP schedulers with clip_sample,
  # the toy's [-1, 1]), else no bound; "none": no bound; or "lo,hi" (e.g. a measured latent
  # range).
  d.drs_bound = "auto"
  d.drp_clip = False         # also clip the DRP chain's x0_hat to that range (as the sampler)
  d.normalise = True         # DMD normaliser mean|x0 - x0_ref|
  d.time_weighting = "uniform"
  d.fake_updates = 1         # fake-score (DSM) updates per generator update (docs/methods.md §3.9: 1 to 5)
  # the two networks' optimizers (train/optim.py): train.* with these overrides (-1 = train's)
  d.generator_adam_b1 = 0.0  # Adam beta1 of the generator (DMD / Diff-Instruct)
  d.fake_learning_rate = -1.0
  d.fake_adam_b1 = 0.0       # [reconstruction] the fake score's beta1, as the generator's
  d.ema_decay = 0.999        # EMA of the generator, what evaluation samples with (0 = no EMA)
  return d


def _require(cond: bool, key: str, why: str):
  if not cond:
    raise ConfigError(f"config.didr.{key}: {why}")


def _parse_range(spec: str) -> tuple[float, float] | None:
  """'lo,hi' -> (lo, hi) with lo < hi, else None."""
  try:
    lo, hi = (float(v) for v in str(spec).split(","))
  except ValueError:
    return None
  return (lo, hi) if lo < hi else None


def drs_data_range(d, clip_range: float | None) -> tuple[float, float] | None:
  """The (lo, hi) of ``didr.drs_bound`` given the backbone's x0 clip (``one_step.clip_range``)."""
  if d.drs_bound == "none":
    return None
  if d.drs_bound == "auto":
    return None if clip_range is None else (-clip_range, clip_range)
  return _parse_range(d.drs_bound)


def validate_didr_section(d) -> didr_losses.DIDRConfig:
  """Checks a ``didr`` section; returns the loss options (``drp_t_max`` still a fraction)."""
  _require(d.mode in didr_losses.MODES, "mode", f"{d.mode!r} is not one of {didr_losses.MODES}")
  _require(0.0 <= d.t_min < d.t_max <= 1.0, "t_min", f"need 0 <= t_min < t_max <= 1, got "
           f"[{d.t_min}, {d.t_max}]")
  _require(0.0 < d.drp_t_max <= 1.0, "drp_t_max", f"must lie in (0, 1], got {d.drp_t_max}")
  _require(d.reward_scale >= 0, "reward_scale", f"must be >= 0, got {d.reward_scale}")
  _require(d.ref_cfg >= 1.0, "ref_cfg", f"must be >= 1 (1 = no guidance), got {d.ref_cfg}")
  _require(int(d.fake_updates) >= 1, "fake_updates", f"must be >= 1, got {d.fake_updates}")
  _require(0.0 <= d.ema_decay < 1.0, "ema_decay", f"must lie in [0, 1), got {d.ema_decay}")
  _require(all(float(w) != 0 for w in dict(d.reward).values()), "reward",
           "weights must be non-zero")
  _require(d.drs_bound in ("auto", "none") or _parse_range(d.drs_bound) is not None,
           "drs_bound", f"{d.drs_bound!r}: expected 'auto', 'none' or 'lo,hi' with lo < hi")
  try:
    return didr_losses.DIDRConfig(
        mode=d.mode, reward_scale=float(d.reward_scale), num_steps=int(d.drp_steps),
        t_max=None, num_draws=int(d.drp_draws), eta=float(d.drp_eta),
        draw_weights=d.drp_draw_weights, normalise=bool(d.normalise),
        time_weighting=d.time_weighting, remat=bool(d.drp_remat))
  except ValueError as e:
    raise ConfigError(f"config.didr: {e}") from None


NETWORKS = ("generator", "fake")


def validate(c: ml_collections.ConfigDict, family: str) -> dict:
  """The ``didr`` section and its networks' optimizers (its checks against the data range run
  in the trainer, which knows the backbone's range)."""
  del family
  validate_didr_section(c.didr)
  optim.check(c.train, c.didr, "didr", NETWORKS)
  return {}
