"""The ``tdm`` config section of TDM (few-step distillation, method "tdm") and TDM-R1 (its RL
stage, method "tdmr1"), with the authors' defaults from docs/methods.md §4 (values marked
[reconstruction] are this project's reading where the summary leaves a choice open).
``validate_tdm_section`` checks a section, raising ``ConfigError("config.tdm.key: why")``;
``validate`` / ``validate_tdmr1`` check a whole config of each method (``train.methods``).

Batch semantics for TDM / TDM-R1 (the shared sections of ``base_config()``):
  sample.batch_size    student rollouts per iteration (TDM-R1: prompts x group, the paper's 48 x 24)
  sample.group_size    rollouts per prompt (TDM-R1's group K; >= 2 for the group preference)
  sample.num_batches   iterations per epoch (each: one rollout batch, then M boundary updates)
  train.*              every network's optimizer, overridden per network by
                       ``tdm.<network>_<key>`` (``tdm.generator_learning_rate``, ...;
                       train/optim.py)
  sample.num_steps / eval.num_steps / eval.eta  ignored: the student always takes tdm.num_steps
                       deterministic steps
"""

from __future__ import annotations

import os

import ml_collections

from didr_jax.errors import ConfigError, require
from didr_jax.losses.common import SnapshotSchedule
from didr_jax.train import optim

# The EMA "old" surrogate's decay [reconstruction: no published numbers; CRD's old snapshot].
OLD_SURROGATE = SnapshotSchedule(start=0.25, slope=0.005, end=0.999, start_step=0)


def tdm_section() -> ml_collections.ConfigDict:
  """TDM: K-step deterministic student, fake score, distribution matching."""
  d = ml_collections.ConfigDict()
  d.num_steps = 4                # K student steps (K + 1 stored boundary states)
  d.generator_path = ""          # student initialisation (a pipeline or component folder in
                                 # diffusers format, e.g. a TDM student); "" = copy of the teacher
  d.ema_decay = 0.0              # generator EMA that sampling / evaluation use (0 = none)
  d.shift = 3.0                  # flow: static shift of the student's sigma grid
  d.student_cfg = 1.0            # the student samples without CFG
  d.ref_cfg = 3.5                # TDM alone: teacher CFG scale in the DM target [reconstruction]
  d.boundaries_per_iter = 2      # M boundary indices j trained per iteration
  d.tau_max = 1.0                # tau ~ U(t_{j+1}, tau_max T) for the fake / generator re-noising
  d.fake_ref_weight = 0.02       # L_fake = |v - v_fake|^2 + 0.02 |v_ref - v_fake|^2
  d.dm_floor = 1e-8              # floor of the mean-abs normaliser
  # the networks' AdamW (train/optim.py): train.* (adam_b2 0.999, weight_decay 1e-4,
  # max_grad_norm 1 as the authors') with these overrides (-1 = train's)
  d.generator_learning_rate = 7.5e-5
  d.generator_adam_b1 = 0.0
  d.fake_learning_rate = 3e-4
  d.fake_adam_b1 = 0.0
  return d


def tdmr1_section() -> ml_collections.ConfigDict:
  """TDM-R1: the TDM section plus the DGPO surrogate and the generator's reward terms."""
  d = tdm_section()
  d.adv_clip = 5.0               # A = per-prompt normalised reward (global std), clipped
  d.beta_dpo = 1.0               # 10 for OCR / HPS, 1 for GenEval / ImageReward
  d.trust_clip = 1e-3            # c of the ratio exp(l_old - l_phi) in [1 - c, 1 + c]
  d.anchor_threshold = 0.05      # |v_phi - v_ref|^2 above which the anchor clip may detach
  d.anchor_directional = True    # anchor clips only samples moved in A's direction [reconstr.]
  d.anchor_weight = 1e-3         # 1e-3 |v_phi - v_ref|^2
  d.anchor_reduce = "sample"     # the anchor clip's distance: each sample's, or the batch
                                 # mean's as the authors' trainer ("batch"); losses.tdm_r1
  d.t_min_reward = 0.3           # tau' >= max(t_{j'+1}, t_min): flow sigma (VP: 300 / T)
  d.surrogate_cfg = 4.5          # CFG of phi in t_rew (4.5 / 2.5 / 3.5 by task)
  d.rew_ref_cfg = True           # compare phi^CFG with ref^CFG (else ref cond) [reconstruction]
  # t_cfg = x0_hat + s (x0_ref,cond - x0_ref,uncond). -1: derived, s = w_kl (ref_cfg - 1) / w_cfg,
  # so that at phi = ref the three targets add up to TDM's (the teacher at ref_cfg;
  # ``cfg_reward_scale``). Another value must equal it (the authors' 3.5 with w_cfg 0.3
  # pulled toward CFG 2.05, not the teacher's 4.5 or 8).
  d.cfg_reward_scale = -1.0
  d.w_kl = 1.0                   # L_G = w_cfg L_cfg + w_rew L_rew + w_kl L_KL
  d.w_cfg = 0.3
  d.w_rew = 0.7
  d.surrogate_learning_rate = 3e-4  # surrogate AdamW
  d.surrogate_adam_b1 = 0.9
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
  _require(float(d.student_cfg) >= 1.0, "student_cfg", f"must be >= 1 (1 = no guidance), got "
           f"{d.student_cfg}")
  _require(float(d.ref_cfg) >= 1.0, "ref_cfg", f"must be >= 1 (1 = no guidance), got {d.ref_cfg}")
  _require(0.0 <= float(d.ema_decay) < 1.0, "ema_decay", f"must be in [0, 1), got {d.ema_decay}")
  _require(float(d.fake_ref_weight) >= 0, "fake_ref_weight",
           f"must be >= 0, got {d.fake_ref_weight}")
  if "beta_dpo" not in d:
    return {}
  for key in ("beta_dpo", "adv_clip", "trust_clip", "anchor_threshold"):
    _require(float(d[key]) > 0, key, f"must be > 0, got {d[key]}")
  _require(float(d.trust_clip) < 1, "trust_clip", f"must be < 1, got {d.trust_clip}")
  _require(0.0 <= float(d.t_min_reward) < float(d.tau_max), "t_min_reward",
           f"must be in [0, tau_max={d.tau_max}), got {d.t_min_reward}")
  _require(float(d.surrogate_cfg) >= 1.0, "surrogate_cfg", f"must be >= 1, got {d.surrogate_cfg}")
  _require(d.anchor_reduce in ("sample", "batch"), "anchor_reduce",
           f"{d.anchor_reduce!r} is not 'sample' or 'batch'")
  for key in ("anchor_weight", "w_kl", "w_cfg", "w_rew"):
    _require(float(d[key]) >= 0, key, f"must be >= 0, got {d[key]}")
  cfg_reward_scale(d)
  try:
    return {"old": SnapshotSchedule.of(d.old)}
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"config.tdm.old: {e}") from None


def cfg_reward_scale(d: ml_collections.ConfigDict) -> float:
  """The t_cfg scale s of a TDM-R1 section: the one for which, with the surrogate at its start
  (phi = ref), the generator's targets add up to TDM's target (the teacher at ``ref_cfg``).

  At phi = ref the reward target is t_rew = x0_hat when ``rew_ref_cfg`` (phi^CFG compared with
  ref^CFG), and L_KL and L_cfg share the normaliser w = mean|x0_hat - x0_ref^CFG|, so the
  generator's pull is [w_kl (x0_ref,c - x0_fake) + w_cfg s (x0_ref,c - x0_ref,u)] / w; TDM's is
  w_kl (x0_ref^CFG - x0_fake) / w with x0_ref^CFG = x0_ref,c + (ref_cfg - 1)(x0_ref,c - x0_ref,u)
  (``diffusion.guidance.cfg``). They are equal for every input iff w_cfg s = w_kl (ref_cfg - 1).
  ``cfg_reward_scale`` = -1 takes that value; any other value must equal it (ConfigError)."""
  w_kl, w_cfg, ref_cfg = float(d.w_kl), float(d.w_cfg), float(d.ref_cfg)
  need = w_kl * (ref_cfg - 1.0)
  _require(bool(d.rew_ref_cfg) or float(d.surrogate_cfg) == 1.0, "rew_ref_cfg",
           f"False compares phi^CFG {d.surrogate_cfg} with the teacher's conditional output, a "
           f"CFG push that is there at phi = ref, so the targets cannot add up to the teacher "
           f"at ref_cfg {ref_cfg}; set it True")
  _require(w_cfg > 0 or need == 0, "w_cfg", f"must be > 0 to guide toward ref_cfg {ref_cfg} "
           f"(w_kl (ref_cfg - 1) = {need:g})")
  derived = need / w_cfg if w_cfg > 0 else 0.0
  s = float(d.cfg_reward_scale)
  _require(s == -1.0 or abs(s - derived) <= 1e-6 * max(1.0, derived), "cfg_reward_scale",
           f"{s:g} pulls toward CFG {1 + w_cfg * s / w_kl if w_kl else float('inf'):.4g}, not the "
           f"teacher's ref_cfg {ref_cfg:g}; the scale that keeps the invariant w_cfg s = w_kl "
           f"(ref_cfg - 1) is {derived:.6g} (or -1 for derived)")
  return derived


def networks(d: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The trained networks (``train/optim.py`` names their optimizers' overrides)."""
  return ("generator", "fake") + (("surrogate",) if "beta_dpo" in d else ())


def validate(c: ml_collections.ConfigDict, family: str) -> dict:
  """TDM: the ``tdm`` section, its networks' optimizers and its student folder."""
  del family
  validate_tdm_section(c.tdm)
  optim.check(c.train, c.tdm, "tdm", networks(c.tdm))
  if c.tdm.generator_path:
    require(os.path.isdir(c.tdm.generator_path), "tdm.generator_path",
            f"{c.tdm.generator_path!r} is not a folder (the toy student is built by "
            "python -m didr_jax.toy.pretrain --stages=tdm; \"\" starts from the teacher)")
  return {}


def validate_tdmr1(c: ml_collections.ConfigDict, family: str) -> dict:
  """TDM-R1: TDM's checks, its own section keys and groups of >= 2 samples per prompt."""
  require("beta_dpo" in c.tdm, "tdm", "method 'tdmr1' needs the TDM-R1 section "
          "(tdm_config.tdmr1_section)")
  out = validate(c, family)
  require(c.sample.group_size >= 2, "sample.group_size", f"TDM-R1's group preference compares "
          f"a prompt's samples: needs >= 2 per prompt, got {c.sample.group_size}")
  return out
