"""The ``ddpo`` config section, DDPO's policy steps and its checks (docs/methods.md §1).

DDPO trains a stochastic sampler as an MDP: every sampler step is a Gaussian policy step (noise
level ``sample.eta``) except
  - the last one when ``sample.deterministic_last_step`` (default): an ODE / eta-0 step with no
    log-probability;
  - those outside ``sample.sde_window = (start, size)`` when size > 0: only the ``size`` steps
    from ``start`` (start -1: a random start per sampling batch, as Flow-GRPO-Fast / MixGRPO) are
    stochastic and trained; the rest are ODE steps.
``sample.sde_type`` picks the flow step: "sde" (Flow-GRPO) or "cps" (coefficients-preserving).
Each micro-batch trains ``train_steps`` of its stochastic steps.
"""

from __future__ import annotations

import ml_collections

from didr_jax.errors import require


def ddpo_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.objective = "ppo"            # "ppo" (DDPO_IS / DDPO_SF) or "rwr" (baseline)
  d.clip_range = 1e-4
  d.adv_clip_max = 5.0
  d.kl_beta = 0.0                # Flow-GRPO KL to the frozen reference (0 = off)
  d.advantage = "per_prompt"     # "per_prompt" (DDPO buffer) or "group" (Flow-GRPO)
  d.advantage_std = "global"     # group mode: divide by the std of the batch or of the group
  d.step_grad_clip = 0.0         # > 0: clip each trajectory step's gradient to this norm
                                 # before averaging (the late steps dominate it on flow models);
                                 # needs one step per network call (steps_per_call 1)
  d.steps_per_call = 1           # trained steps per network call of the update: one call runs
                                 # train.batch_size x steps_per_call (sample, step) pairs;
                                 # 1 = one call per step (least memory; measures
                                 # grad_norm/step_s; the faster on XLA:CPU, measured on the
                                 # toy); 0 = all of a micro-batch's steps in one call (one
                                 # network call in the program, k x the activation memory)
  d.buffer_size = 32
  d.min_count = 16
  d.rwr_mode = "exp"             # "exp" or "sparse"
  d.rwr_temperature = 1.0
  d.rwr_percentile = 0.9
  return d


def mdp_steps(s: ml_collections.ConfigDict) -> int:
  """Number of stochastic (trained) steps per trajectory: the SDE window's size, else every step
  but a deterministic last one."""
  size = int(s.sde_window[1])
  return size if size > 0 else s.num_steps - int(bool(s.deterministic_last_step))


def train_steps(s: ml_collections.ConfigDict, t: ml_collections.ConfigDict) -> int:
  """Steps trained per sample: int(num_steps x timestep_fraction) as DDPO and Flow-GRPO compute
  it (0.99 x 10 -> 9), at least 1 and at most ``mdp_steps``."""
  return min(max(1, int(s.num_steps * t.timestep_fraction)), max(1, mdp_steps(s)))


def validate_policy(c: ml_collections.ConfigDict, family: str) -> None:
  """The stochastic-policy settings of the sampler (``sample.sde_type``, ``sde_window``,
  ``deterministic_last_step``) that DDPO's MDP reads."""
  s = c.sample
  flow = family == "flow"
  types = ("sde", "cps") if flow else ("sde",)
  require(s.sde_type in types, "sample.sde_type", f"{s.sde_type!r} is not one of {types}"
          + ("" if flow else " (DDIM's eta step already preserves the coefficients)"))
  require(isinstance(s.deterministic_last_step, bool), "sample.deterministic_last_step",
          "must be True or False")
  w = tuple(s.sde_window)
  require(len(w) == 2 and all(isinstance(v, int) for v in w), "sample.sde_window",
          f"must be (start, size) integers, got {w}")
  start, size = w
  last = s.num_steps - int(bool(s.deterministic_last_step))  # steps that may be stochastic
  require(last >= 1, "sample.deterministic_last_step",
          "needs sample.num_steps >= 2 (the only step would be deterministic)")
  require(0 <= size <= last, "sample.sde_window",
          f"size {size} must be in [0, {last}] (0 = every step"
          + (" but the deterministic last one)" if s.deterministic_last_step else ")"))
  require(start == -1 or (start >= 0 and start + size <= last), "sample.sde_window",
          f"start {start} must be -1 (random) or in [0, {last - size}] for size {size}")
  require(not (start == -1 and size == 0), "sample.sde_window",
          "a random start (-1) needs a window size > 0")
  if start == -1:
    require(s.batch_size % c.train.batch_size == 0, "train.batch_size",
            f"a random sde_window needs sample.batch_size ({s.batch_size}) to be a multiple of "
            f"train.batch_size ({c.train.batch_size}): a micro-batch shares one window")


def validate(c: ml_collections.ConfigDict, family: str) -> dict:
  """The ``ddpo`` section and the policy settings; returns the trained steps per sample."""
  d = c.ddpo
  require(d.objective in ("ppo", "rwr"), "ddpo.objective",
          f"{d.objective!r} is not 'ppo' or 'rwr'")
  require(d.clip_range > 0, "ddpo.clip_range", f"must be > 0, got {d.clip_range}")
  require(d.adv_clip_max > 0, "ddpo.adv_clip_max", f"must be > 0, got {d.adv_clip_max}")
  require(d.kl_beta >= 0, "ddpo.kl_beta", f"must be >= 0 (0 = off), got {d.kl_beta}")
  require(d.advantage in ("per_prompt", "group"), "ddpo.advantage",
          f"{d.advantage!r} is not 'per_prompt' or 'group'")
  require(d.buffer_size >= 1, "ddpo.buffer_size", f"must be >= 1, got {d.buffer_size}")
  require(d.min_count >= 1, "ddpo.min_count", f"must be >= 1, got {d.min_count}")
  require(d.rwr_mode in ("exp", "sparse"), "ddpo.rwr_mode",
          f"{d.rwr_mode!r} is not 'exp' or 'sparse'")
  require(d.rwr_temperature > 0, "ddpo.rwr_temperature",
          f"must be > 0, got {d.rwr_temperature}")
  require(0 < d.rwr_percentile < 1, "ddpo.rwr_percentile",
          f"must be in (0, 1), got {d.rwr_percentile}")
  validate_policy(c, family)
  require(d.advantage_std in ("global", "group"), "ddpo.advantage_std",
          f"{d.advantage_std!r} is not 'global' (std of the batch) or 'group' (std of the "
          "prompt's group)")
  require(d.step_grad_clip >= 0, "ddpo.step_grad_clip",
          f"must be >= 0 (0 = off), got {d.step_grad_clip}")
  k = train_steps(c.sample, c.train)
  spc = int(d.steps_per_call)
  require(spc >= 0 and (spc == 0 or k % spc == 0), "ddpo.steps_per_call",
          f"must be 0 (all) or divide the {k} trained steps per sample, got {spc}")
  require(d.step_grad_clip == 0 or (spc or k) == 1, "ddpo.step_grad_clip",
          "clips each trajectory step's gradient, so each network call must train one step: "
          f"set ddpo.steps_per_call = 1 (it is {spc})")
  return {"timesteps_trained_per_sample": k}
