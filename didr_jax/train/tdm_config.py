"""Proposed config sections for TDM (few-step distillation) and TDM-R1 (its RL stage), with the
authors' defaults from METHODS.md section 4 (values marked [reconstruction] are this project's
reading where the summary leaves a choice open). ``validate_tdm_section`` checks a section,
raising ``ConfigError("config.tdm.key: why")``. Not wired into ``train/config.py`` yet: the trainer
that consumes these (issue 15, part 3) will do that.
"""

from __future__ import annotations

import ml_collections

from didr_jax.losses.common import SnapshotSchedule
from didr_jax.train.config import ConfigError

# The EMA "old" surrogate's decay [reconstruction: METHODS gives no numbers; CRD's old snapshot].
OLD_SURROGATE = SnapshotSchedule(start=0.25, slope=0.005, end=0.999, start_step=0)


def tdm_section() -> ml_collections.ConfigDict:
  """TDM: K-step deterministic student, fake score, distribution matching."""
  d = ml_collections.ConfigDict()
  d.num_steps = 4                # K student steps (K + 1 stored boundary states)
  d.shift = 3.0                  # flow: static shift of the student's sigma grid
  d.student_cfg = 1.0            # the student samples without CFG
  d.ref_cfg = 3.5                # TDM alone: teacher CFG scale in the DM target [reconstruction]
  d.boundaries_per_iter = 2      # M boundary indices j trained per iteration
  d.tau_max = 1.0                # tau ~ U(t_{j+1}, tau_max T) for the fake / generator re-noising
  d.fake_ref_weight = 0.02       # L_fake = |v - v_fake|^2 + 0.02 |v_ref - v_fake|^2
  d.dm_floor = 1e-8              # floor of the mean-abs normaliser
  d.gen_lr = 7.5e-5              # generator AdamW
  d.gen_betas = (0.0, 0.999)
  d.fake_lr = 3e-4               # fake score AdamW
  d.fake_betas = (0.0, 0.999)
  d.weight_decay = 1e-4
  d.max_grad_norm = 1.0
  return d


def tdmr1_section() -> ml_collections.ConfigDict:
  """TDM-R1: the TDM section plus the DGPO surrogate and the generator's reward terms."""
  d = tdm_section()
  d.group_size = 24              # images per prompt (sample.group_size)
  d.prompts_per_iter = 48
  d.adv_clip = 5.0               # A = per-prompt normalised reward (global std), clipped
  d.beta_dpo = 1.0               # 10 for OCR / HPS, 1 for GenEval / ImageReward
  d.trust_clip = 1e-3            # c of the ratio exp(l_old - l_phi) in [1 - c, 1 + c]
  d.anchor_threshold = 0.05      # |v_phi - v_ref|^2 above which the anchor clip may detach
  d.anchor_directional = True    # anchor clips only samples moved in A's direction [reconstr.]
  d.anchor_weight = 1e-3         # 1e-3 |v_phi - v_ref|^2
  d.t_min_reward = 0.3           # tau' >= max(t_{j'+1}, t_min): flow sigma (VP: 300 / T)
  d.surrogate_cfg = 4.5          # CFG of phi in t_rew (4.5 / 2.5 / 3.5 by task)
  d.rew_ref_cfg = True           # compare phi^CFG with ref^CFG (else ref cond) [reconstruction]
  d.cfg_reward_scale = 3.5       # t_cfg = x0_hat + 3.5 (x0_ref,cond - x0_ref,uncond)
  d.w_kl = 1.0                   # L_G = w_cfg L_cfg + w_rew L_rew + w_kl L_KL
  d.w_cfg = 0.3
  d.w_rew = 0.7
  d.surrogate_lr = 3e-4          # surrogate AdamW
  d.surrogate_betas = (0.9, 0.999)
  # EMA "old" surrogate: d(step) = start for step < start_step, else min(start + slope
  # (step - start_step), end); old <- d old + (1 - d) phi after each surrogate update.
  d.old = ml_collections.ConfigDict(OLD_SURROGATE.as_dict())
  return d


def _require(cond: bool, key: str, why: str) -> None:
  if not cond:
    raise ConfigError(f"config.tdm.{key}: {why}")


def validate_tdm_section(d: ml_collections.ConfigDict) -> dict:
  """Checks a ``tdm_section`` / ``tdmr1_section``; returns {} for TDM, {"old": SnapshotSchedule}
  for TDM-R1."""
  _require(int(d.num_steps) >= 1, "num_steps", f"must be >= 1, got {d.num_steps}")
  _require(1 <= int(d.boundaries_per_iter) <= int(d.num_steps), "boundaries_per_iter",
           f"must be in [1, num_steps={d.num_steps}], got {d.boundaries_per_iter}")
  _require(0.0 < float(d.tau_max) <= 1.0, "tau_max", f"must be in (0, 1], got {d.tau_max}")
  _require(float(d.shift) > 0, "shift", f"must be > 0, got {d.shift}")
  for key in ("fake_ref_weight", "weight_decay", "max_grad_norm"):
    _require(float(d[key]) >= 0, key, f"must be >= 0, got {d[key]}")
  betas = ["gen_betas", "fake_betas"] + (["surrogate_betas"] if "surrogate_betas" in d else [])
  for key in betas:
    b = tuple(d[key])
    _require(len(b) == 2 and all(0.0 <= x < 1.0 for x in b), key,
             f"must be two numbers in [0, 1), got {b}")
  lrs = ["gen_lr", "fake_lr"] + (["surrogate_lr"] if "surrogate_lr" in d else [])
  for key in lrs:
    _require(float(d[key]) > 0, key, f"must be > 0, got {d[key]}")
  if "beta_dpo" not in d:
    return {}
  _require(int(d.group_size) >= 2, "group_size", f"group preference needs >= 2, got "
           f"{d.group_size}")
  for key in ("beta_dpo", "adv_clip", "trust_clip", "anchor_threshold"):
    _require(float(d[key]) > 0, key, f"must be > 0, got {d[key]}")
  _require(float(d.trust_clip) < 1, "trust_clip", f"must be < 1, got {d.trust_clip}")
  _require(0.0 <= float(d.t_min_reward) < float(d.tau_max), "t_min_reward",
           f"must be in [0, tau_max={d.tau_max}), got {d.t_min_reward}")
  for key in ("anchor_weight", "w_kl", "w_cfg", "w_rew"):
    _require(float(d[key]) >= 0, key, f"must be >= 0, got {d[key]}")
  try:
    return {"old": SnapshotSchedule.of(d.old)}
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"config.tdm.old: {e}") from None
