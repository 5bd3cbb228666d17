"""The ``crd`` config section (proposed; the CRD trainer and configs/ will read it) and its checks.

Defaults are the authors' (docs/methods.md §2, their public SD3.5-M OCR / GenEval recipe), named
in the comments. The rest of their recipe lives in the shared sections of ``base_config()``:
rollouts with a deterministic few-step sampler (sample.num_steps 10, sample.eta 0,
sample.guidance_scale 1), K = 24 images per prompt (sample.group_size), 48 prompts per epoch,
2 optimizer steps per epoch, AdamW lr 3e-4 (LoRA r32) wd 1e-4, grad clip 1, bf16.
"""

from __future__ import annotations

import ml_collections

from didr_jax.errors import ConfigError, require
from didr_jax.losses import crd as crd_losses
from didr_jax.losses.common import SnapshotSchedule


def crd_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.loss = "mse"              # policy loss, crd_loss_type "mse" (or "bce", [reconstruction])
  d.c_beta = 1.0              # crd_beta: loss = (5 / c_beta) mean (c_beta rbar - Rbar)^2
  d.adv_clip = 5.0            # adv_clip_range 5: A clipped to +-5, Rt = A / 10 + 1/2
  d.adv_std = "global"        # global_std: per-prompt mean, std of the whole epoch ("group": own)
  d.normalise = True          # adaptive_logp: errors divided by w = sg(mean |out - target|)
  d.weight_floor = 1e-5       # the floor of w
  d.kl_beta = 0.1             # kl_beta: anchor to the frozen pretrained model (0 = off)
  d.kl_cfg = 4.5              # kl_cfg: the reference is queried with CFG 4.5
  d.kl_min = 1e-3             # m of the reward-adaptive strength m + R (1 - m) (1e-4 / kl_beta)
  d.kl_weight = "reward"      # [reconstruction] raw reward in [0, 1]; "advantage" = their port (Rt)
  d.num_train_times = 20      # num_train_timesteps: forward-noised times trained per sample
  # where those times come from: "uniform" (the family's training times: VP t ~ U{0..t_max T},
  # flow sigmas shifted by time_shift) or "rollout" (the rollout sampler's own grid of
  # sample.num_steps times, as the authors' trainer; crd.rollout_time_grid)
  d.train_times = "uniform"
  d.time_shift = 3.0          # time_shift of the flow sigmas (kernels.sample_flow_sigmas shift)
  d.t_max = 0.99              # timestep_range: the noisiest 99% of the time range
  # EMA snapshots, d(step) = start for step < start_step, else min(start + slope (step -
  # start_step), end); snapshot <- d snapshot + (1 - d) theta after each rollout epoch.
  # Their "start_step-start-slope-end" strings: old "0-0.25-0.005-0.999",
  # sampler "75-0.0-0.0075-0.999".
  d.old = ml_collections.ConfigDict(crd_losses.OLD_SNAPSHOT.as_dict())
  d.sampler = ml_collections.ConfigDict(crd_losses.SAMPLER_SNAPSHOT.as_dict())
  return d


def _require(cond: bool, key: str, why: str):
  if not cond:
    raise ConfigError(f"config.crd.{key}: {why}")


def validate_crd_section(d) -> dict:
  """Checks a ``crd`` section; returns {"old": SnapshotSchedule, "sampler": SnapshotSchedule}."""
  _require(d.loss in crd_losses.LOSS_TYPES, "loss",
           f"{d.loss!r} is not one of {crd_losses.LOSS_TYPES}")
  _require(d.kl_weight in crd_losses.KL_WEIGHTS, "kl_weight",
           f"{d.kl_weight!r} is not one of {crd_losses.KL_WEIGHTS}")
  _require(d.adv_std in ("global", "group"), "adv_std", f"{d.adv_std!r} is not 'global' or 'group'")
  _require(d.c_beta > 0, "c_beta", f"must be > 0, got {d.c_beta}")
  _require(d.adv_clip > 0, "adv_clip", f"must be > 0, got {d.adv_clip}")
  _require(d.weight_floor > 0, "weight_floor", f"must be > 0, got {d.weight_floor}")
  _require(d.kl_beta >= 0, "kl_beta", f"must be >= 0, got {d.kl_beta}")
  _require(0.0 <= d.kl_min <= 1.0, "kl_min", f"must lie in [0, 1], got {d.kl_min}")
  _require(int(d.num_train_times) >= 1, "num_train_times",
           f"must be >= 1, got {d.num_train_times}")
  _require(d.time_shift > 0, "time_shift", f"must be > 0, got {d.time_shift}")
  _require(d.train_times in ("uniform", "rollout"), "train_times",
           f"{d.train_times!r} is not 'uniform' or 'rollout'")
  _require(0.0 < d.t_max <= 1.0, "t_max", f"must lie in (0, 1], got {d.t_max}")
  out = {}
  for name in ("old", "sampler"):
    try:
      out[name] = SnapshotSchedule.of(d[name])
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"config.crd.{name}: {e}") from None
  return out


def validate(c: ml_collections.ConfigDict, family: str) -> dict:
  """The ``crd`` section and what centering needs of the batches: whole groups of >= 2 samples
  of a prompt in every minibatch. Returns the trained times per sample."""
  del family  # both families train the same way
  validate_crd_section(c.crd)
  s, t = c.sample, c.train
  require(s.group_size >= 2, "sample.group_size", f"CRD centers rewards within a prompt's "
          f"samples: needs >= 2 per prompt, got {s.group_size}")
  require(t.batch_size % s.group_size == 0, "train.batch_size",
          f"{t.batch_size} is not a multiple of sample.group_size={s.group_size} (CRD "
          "minibatches hold whole groups)")
  return {"timesteps_trained_per_sample": int(c.crd.num_train_times)}
