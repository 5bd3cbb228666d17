"""The TDM-R1 trainer (docs/methods.md §4): the TDM student (``train/tdm.py``) reinforced with
any reward of the registry, differentiable or not (e.g. the toy detector), through a surrogate
reward phi learned by group preference (DGPO) on the noisy states of its deterministic
trajectories.

The maths lives in ``didr_jax.losses.tdm_r1`` (and ``losses.tdm``); this file moves data. Per
iteration (``TDMTrainer.train_step``):
  1. K-step student rollouts of ``sample.batch_size`` samples, ``sample.group_size`` per prompt,
     storing all K + 1 boundary states; the decoded x_K are scored on the host rewarder and
     the iteration waits for them: A = per-prompt centred reward / (global std + 1e-4), clipped
     to +-``tdm.adv_clip`` (``losses.common.group_advantages``), group = the prompt's samples;
  2. for each of M boundaries j (uniform without replacement), in this fixed order:
     a. the fake-score step of TDM (``TDMTrainer._fake_update_impl``);
     b. the surrogate step: a stored boundary j' ~ P(j') proportional to j' + 1
        (``tdm_r1.sample_boundary``), the clean estimate x0_hat of step j' from the two stored
        states (``tdm.x0_from_states``), tau' >= max(t_{j'+1}, t_min_reward) and eps shared
        within each group (``group_shared_uniform`` / ``group_shared_normal``), x_tau' and
        target from ``tdm.renoised_target``; the conditional outputs of phi (live), of the frozen
        teacher and of the EMA "old" phi give ``tdm_r1.dgpo_loss`` (trust-region and anchor
        clips, weight (j' + 1) / K); one AdamW step of phi (``common.guarded_apply``), then
        old <- d old + (1 - d) phi with d = ``tdm.old`` at the step counter;
     c. the generator step on the live x0_hat at boundary j (x_tau re-noised from its
        sg(x_{j+1})): ``tdm_r1.generator_loss`` = w_cfg L_cfg + w_rew L_rew + w_kl L_KL with the
        teacher conditional / unconditional (CFG ``tdm.ref_cfg`` for the normaliser,
        ``tdm.cfg_reward_scale`` for t_cfg), the fake score, the surrogate guided with
        ``tdm.surrogate_cfg`` and the reference it is compared with (the teacher guided with the
        same scale when ``tdm.rew_ref_cfg``, else its conditional output); one AdamW step and
        the generator EMA.
State: TDM's plus ``params.surrogate``, ``opt.surrogate`` and ``ema.old`` (float32), all
checkpointed (resume is exact: every random draw comes from (seed, epoch, iteration)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import guidance
from didr_jax.errors import ConfigError
from didr_jax.losses import common as loss_common, tdm as tdm_losses, tdm_r1 as r1_losses
from didr_jax.train import common
from didr_jax.train.advantages import gather_host
from didr_jax.train.tdm import TDMTrainer
from didr_jax.train.tdm_config import cfg_reward_scale


class TDMR1Trainer(TDMTrainer):
  """TDM plus the surrogate reward (module docstring)."""

  R1 = True

  def __init__(self, config, backbone, mesh):
    if "beta_dpo" not in config.tdm:
      raise ConfigError("config.tdm: method 'tdmr1' needs the TDM-R1 section "
                        "(tdm_config.tdmr1_section)")
    super().__init__(config, backbone, mesh)
    self.old_schedule = self.sections["old"]
    self.group = int(config.sample.group_size)
    self._surrogate_update = self._jit("the surrogate update", self._surrogate_update_impl,
                                       donate_argnums=(0,))

  def scales(self) -> dict:
    d = self.c.tdm
    return {"ref_cfg": jnp.float32(d.ref_cfg), "surrogate_cfg": jnp.float32(d.surrogate_cfg),
            "cfg_reward_scale": jnp.float32(cfg_reward_scale(d))}

  # ------------------------------------------------------------------------------ rewards

  def _before_boundaries(self, state, traj, rewards, rng):
    """Waits for the rollout's rewards (a future of this host's rows) and turns them into
    per-prompt advantages."""
    del rng
    if rewards is None:
      raise ValueError("TDM-R1 trains on the rollout's rewards: pass a rewarder")
    rewards = jnp.asarray(gather_host(np.asarray(rewards.result(), np.float32)))
    n = rewards.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32) // self.group
    adv = loss_common.group_advantages(rewards, ids, n // self.group, std="global",
                                       clip=float(self.c.tdm.adv_clip))
    ctx = {"latents": traj.latents, "adv": self._shard(adv, n), "ids": self._shard(ids, n)}
    return state, ctx, {"adv_abs_mean": jnp.mean(jnp.abs(adv))}

  # ------------------------------------------------------------------------------ surrogate

  def _surrogate_phase(self, state, ctx, cond, rng):
    return self._surrogate_update(state, self.ref_params, ctx["latents"], cond, ctx["adv"],
                                  ctx["ids"], rng)

  def _group_renoise(self, k_t, k_e, x_s, x0_hat, j, ids, groups):
    """(x_tau', target, tau') of the surrogate's noise level: x_s = x_{j+1} re-noised to
    tau' >= max(t_{j+1}, t_min_reward) (up to tau_max T) with tau' and eps shared within each
    group. The surrogate is trained (step 2b) and read (step 2c) at this law of points only."""
    d = self.c.tdm
    a_s, s_s = self._alpha_sigma(jnp.asarray(self.grid.times)[j + 1])
    lo, hi = self.grid.tau_range(jnp.asarray(self.grid.times)[j + 1], float(d.t_min_reward),
                                 float(d.tau_max))
    tau = r1_losses.group_shared_uniform(k_t, ids, groups, lo, hi, integer=self.grid.integer)
    eps = r1_losses.group_shared_normal(k_e, ids, groups, x_s.shape[1:])
    x_tau, target = tdm_losses.renoised_target(x_s, x0_hat, eps, a_s, s_s,
                                               *self._alpha_sigma(tau), self.ptype)
    return x_tau, target, tau

  def _surrogate_update_impl(self, state, ref_params, latents, cond, adv, ids, rng):
    """One DGPO step of phi on a stored boundary (module docstring, 2b), then the old EMA."""
    d = self.c.tdm
    k = self.grid.num_steps
    groups = adv.shape[0] // self.group
    k_j, k_t, k_e = jax.random.split(rng, 3)
    jp = r1_losses.sample_boundary(k_j, k)
    times = jnp.asarray(self.grid.times)
    a_s, s_s = self._alpha_sigma(times[jp + 1])
    x_s = latents[jp + 1]
    # The (x0, eps) pair that reproduces both stored states (with clip_sample it differs from
    # the clipped x0_hat of the step, but keeps x_s = a_s x0 + s_s eps, what the kernel needs).
    x0_hat = tdm_losses.x0_from_states(latents[jp], x_s, *self._alpha_sigma(times[jp]), a_s, s_s)
    x_tau, target, tau = self._group_renoise(k_t, k_e, x_s, x0_hat, jp, ids, groups)
    out_ref = self._out(ref_params, x_tau, tau, cond)
    out_old = self._out(state["ema"]["old"], x_tau, tau, cond)
    phi = state["params"]["surrogate"]

    def loss_fn(p):
      l_phi, l_ref, l_old, dist = r1_losses.surrogate_losses(self._out(p, x_tau, tau, cond),
                                                             out_ref, out_old, target)
      return r1_losses.dgpo_loss(
          l_phi, l_ref, l_old, dist, adv, ids, groups, boundary=jp, num_steps=k,
          beta=float(d.beta_dpo), clip=float(d.trust_clip),
          anchor_threshold=float(d.anchor_threshold), anchor_weight=float(d.anchor_weight),
          anchor_directional=bool(d.anchor_directional), anchor_reduce=d.anchor_reduce)

    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(phi)
    new, opt, am = common.guarded_apply(self.tx["surrogate"], grads, state["opt"]["surrogate"],
                                        phi, loss)
    old, decay = self.old_schedule.update(state["ema"]["old"], new, state["step"])
    state = {**state, "params": {**state["params"], "surrogate": new},
             "opt": {**state["opt"], "surrogate": opt}, "ema": {**state["ema"], "old": old}}
    scalars = {f"surrogate_{n}": v for n, v in m.items() if jnp.ndim(v) == 0}
    return state, {**scalars, "surrogate_loss": loss, "surrogate_grad_norm": am["grad_norm"],
                   "surrogate_boundary": jp.astype(jnp.float32), "decay_old": decay,
                   "surrogate_nonfinite": am["nonfinite"]}

  # ------------------------------------------------------------------------------ generator

  def _generator_targets(self, state, ref_params, x_tau, tau, cond, uncond, x0_hat, scales,
                         renoise=None):
    """TDM-R1's three stop-gradient targets (module docstring, 2c): the distribution-matching
    and CFG targets at TDM's x_tau, the reward target at the surrogate's own re-noised point
    (``_group_renoise`` from the same x_{j+1}: where phi was trained, never below
    t_min_reward)."""
    d = self.c.tdm
    x0_at = lambda p, c, x, t: jax.lax.stop_gradient(self._x0(self._out(p, x, t, c), x, t))
    ps = state["params"]
    ref_c, ref_u = x0_at(ref_params, cond, x_tau, tau), x0_at(ref_params, uncond, x_tau, tau)
    rng, x_next, x0_sg, j = renoise
    groups = x_next.shape[0] // self.group
    ids = jnp.arange(x_next.shape[0], dtype=jnp.int32) // self.group
    x_r, _, tau_r = self._group_renoise(*jax.random.split(rng), x_next, x0_sg, j, ids, groups)
    phi_c, phi_u = x0_at(ps["surrogate"], cond, x_r, tau_r), x0_at(ps["surrogate"], uncond, x_r,
                                                                     tau_r)
    ref_rew = x0_at(ref_params, cond, x_r, tau_r)
    if d.rew_ref_cfg:
      ref_rew = guidance.cfg(x0_at(ref_params, uncond, x_r, tau_r), ref_rew,
                             scales["surrogate_cfg"])
    return r1_losses.generator_loss(
        x0_hat, x0_ref_cond=ref_c, x0_ref_uncond=ref_u,
        x0_ref_cfg=guidance.cfg(ref_u, ref_c, scales["ref_cfg"]),
        x0_fake=x0_at(ps["fake"], cond, x_tau, tau),
        x0_phi_cfg=guidance.cfg(phi_u, phi_c, scales["surrogate_cfg"]), x0_ref_rew=ref_rew,
        cfg_scale=scales["cfg_reward_scale"], w_kl=float(d.w_kl), w_cfg=float(d.w_cfg),
        w_rew=float(d.w_rew), floor=float(d.dm_floor))
