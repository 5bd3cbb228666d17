"""TDM-R1: few-step RL with non-differentiable rewards (docs/methods.md §4, steps 2 and 3).
Pure jit-able functions over precomputed per-sample losses / model outputs, so a trainer
differentiates them with respect to whichever network produced the live inputs.

**Surrogate reward (DGPO) step.** A diffusion model phi (initialised from the reference) is
trained by group preference on the student's stored deterministic trajectories. Pick a stored
boundary j' in {0, ..., K-1} (the state x_{j'+1} reached by step j') with P(j') proportional to
j' + 1 (``boundary_probs`` / ``sample_boundary``), draw tau' >= max(t_{j'+1}, t_min) and one
noise per group (``group_shared_normal`` / ``group_shared_uniform``: the same eps and tau' for
every sample of a prompt), re-noise with ``tdm.renoised_target`` and take per-sample denoising
losses l = |target - out(x_tau')|^2 for phi (live), the frozen reference and the EMA "old" phi.
With advantages A (per-prompt normalised, clipped to +-5) and group size K_g:

    S_g     = sum_{i in g} A_i beta (l_phi,i - l_ref,i) / K_g                  (stop-gradient)
    L_pref  = mean_i [ sigmoid(S_{g(i)}) A_i l~_phi,i ]
    L_phi   = (j' + 1) / K * ( L_pref + 1e-3 mean_i |out_phi,i - out_ref,i|^2 )

The sigmoid weight is the derivative of the group DPO loss -log sigmoid(-S_g) (the implicit
reward of sample i is -beta (l_phi,i - l_ref,i)), so descent lowers l_phi for A > 0 and raises
it for A < 0 until the group's preference is saturated. l~_phi is l_phi with two clips that
detach (stop_gradient) the samples that already moved far enough in their advantage's
direction:

- trust region: r_i = exp(l_old,i - l_phi,i) (the likelihood ratio phi / old), clipped when
  A_i > 0 and r_i > 1 + c, or A_i < 0 and r_i < 1 - c (c = 1e-3);
- anchor **[reconstruction]**: d_i = |out_phi,i - out_ref,i|^2 > 0.05 and phi has moved away
  from the reference in the advantage's direction, A_i (l_ref,i - l_phi,i) > 0
  (``anchor_directional=False`` detaches every sample with d_i > 0.05). d_i is each sample's
  own distance by default (``anchor_reduce="sample"``: a few samples that moved far are
  detached, not the whole batch); the authors' trainer compares the batch mean of d with the
  threshold (``anchor_reduce="batch"``: once the mean passes it, every sample moved in its
  advantage's direction is detached). Per sample is this project's choice: it keeps the
  gradient of the samples still near the reference.

The 1e-3 anchor regulariser stays live for every sample. Samples with A_i = 0 carry no
preference gradient and are never counted as clipped.

**Generator step.** On the live x0_hat of the student at boundary j (x_tau re-noised from its
x_{j+1}), three stop-gradient targets (``generator_loss``):

    t_KL  = x0_hat + (x0_ref,cond - x0_fake)                 w_KL  = mean|x0_hat - x0_ref^CFG|
    t_cfg = x0_hat + 3.5 (x0_ref,cond - x0_ref,uncond)       w_cfg = mean|x0_hat - x0_ref^CFG|
    t_rew = x0_hat + (x0_phi^CFG - x0_ref,rew)               w_rew = mean|x0_hat - x0_phi^CFG|
    L_G   = 0.3 L_cfg + 0.7 L_rew + 1.0 L_KL

each L = ``tdm.normalised_target_loss`` (gradient -(t - x0_hat) / (w B)). x0_ref,rew, the
reference the surrogate's guided prediction is compared with, is an input: **[reconstruction]**
the reference guided with the surrogate's own CFG scale, so that t_rew = x0_hat at phi = ref
(pass x0_ref,cond for the literal reading, docs/methods.md §4.7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax.losses import common
from didr_jax.losses.tdm import normalised_target_loss, sample_tau


def boundary_probs(num_boundaries: int) -> jax.Array:
  """P(j') = (j' + 1) / sum_k (k + 1) for j' = 0, ..., num_boundaries - 1 (float32)."""
  w = jnp.arange(1, num_boundaries + 1, dtype=jnp.float32)
  return w / jnp.sum(w)


def sample_boundary(rng: jax.Array, num_boundaries: int, shape=()) -> jax.Array:
  """j' ~ ``boundary_probs`` (int32, ``shape``)."""
  logits = jnp.log(boundary_probs(num_boundaries))
  return jax.random.categorical(rng, logits, shape=shape).astype(jnp.int32)


def boundary_weight(j, num_steps: int = 4) -> jax.Array:
  """The (j' + 1) / K factor of the surrogate loss (float32, j's shape)."""
  return (jnp.asarray(j, jnp.float32) + 1.0) / num_steps


def group_shared_normal(rng: jax.Array, ids: jax.Array, num_groups: int, sample_shape,
                        dtype=jnp.float32) -> jax.Array:
  """(B, *sample_shape) standard normal noise with one draw per group: z[g(i)]."""
  z = jax.random.normal(rng, (num_groups, *sample_shape), dtype)
  return z[ids]


def group_shared_uniform(rng: jax.Array, ids: jax.Array, num_groups: int, lo, hi=None, *,
                         integer: bool = False) -> jax.Array:
  """(B,) times drawn once per group (``tdm.sample_tau`` semantics), lo / hi scalars or
  (num_groups,)."""
  return sample_tau(rng, (num_groups,), lo, hi, integer=integer)[ids]


def surrogate_losses(out_phi: jax.Array, out_ref: jax.Array, out_old: jax.Array,
                     target: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(l_phi, l_ref, l_old, anchor_dist), each (B,): l = |target - out|^2
  (``common.mean_sq_dist``, target from ``tdm.renoised_target``) and anchor_dist =
  |out_phi - out_ref|^2; only l_phi and anchor_dist carry gradient (to phi)."""
  target = jax.lax.stop_gradient(target)
  out_ref = jax.lax.stop_gradient(out_ref)
  d = common.mean_sq_dist
  return (d(out_phi, target), d(out_ref, target), d(jax.lax.stop_gradient(out_old), target),
          d(out_phi, out_ref))


def dgpo_loss(l_phi: jax.Array, l_ref: jax.Array, l_old: jax.Array, anchor_dist: jax.Array,
              advantages: jax.Array, ids: jax.Array, num_groups: int, *,
              boundary=None, num_steps: int = 4, beta: float = 1.0, clip: float = 1e-3,
              anchor_threshold: float = 0.05, anchor_weight: float = 1e-3,
              anchor_directional: bool = True, anchor_reduce: str = "sample"):
  """The DGPO surrogate loss of the module docstring, (loss, metrics).

  l_phi (B,): live per-sample denoising losses of phi; l_ref, l_old (B,): those of the frozen
  reference and the EMA old phi (treated as constants); anchor_dist (B,): live
  |out_phi - out_ref|^2 per sample (``common.mean_sq_dist``); advantages (B,); ids (B,) group
  ids in [0, num_groups); boundary: j' (scalar or (B,)), None for weight 1. Metrics hold the boolean
  masks ``trust_clipped`` and ``anchor_clipped`` (B,) and their fractions. Computed in
  ``common.compute_dtype(l_phi)`` (float32, or float64 for float64 inputs)."""
  dt = common.compute_dtype(jnp.asarray(l_phi))
  cast = lambda x: jnp.asarray(x, dt)
  l_phi, l_ref, l_old = cast(l_phi), cast(jax.lax.stop_gradient(l_ref)), cast(
      jax.lax.stop_gradient(l_old))
  adv = jax.lax.stop_gradient(cast(advantages))
  l_sg = jax.lax.stop_gradient(l_phi)
  d_sg = jax.lax.stop_gradient(cast(anchor_dist))
  score = common.segment_mean(adv * beta * (l_sg - l_ref), ids, num_groups)
  pref_w = jax.nn.sigmoid(score)

  ratio = jnp.exp(l_old - l_sg)
  trust = ((adv > 0) & (ratio > 1.0 + clip)) | ((adv < 0) & (ratio < 1.0 - clip))
  if anchor_reduce not in ("sample", "batch"):
    raise ValueError(f"anchor_reduce={anchor_reduce!r}: expected 'sample' or 'batch'")
  far = (d_sg if anchor_reduce == "sample" else jnp.broadcast_to(jnp.mean(d_sg), d_sg.shape)
         ) > anchor_threshold
  moved = (adv * (l_ref - l_sg) > 0) if anchor_directional else (adv != 0)
  anchor = far & moved
  detach = trust | anchor
  l_used = jnp.where(detach, l_sg, l_phi)

  scale = 1.0 if boundary is None else boundary_weight(boundary, num_steps)
  per = scale * (pref_w * adv * l_used + anchor_weight * cast(anchor_dist))
  loss = jnp.mean(per)
  metrics = {
      "trust_clipped": trust, "anchor_clipped": anchor,
      "trust_clipfrac": jnp.mean(trust.astype(jnp.float32)),
      "anchor_clipfrac": jnp.mean(anchor.astype(jnp.float32)),
      "ratio_mean": jnp.mean(ratio), "pref_weight_mean": jnp.mean(pref_w),
      "group_score_mean": jnp.mean(score), "anchor_dist": jnp.mean(d_sg),
      "l_phi": jnp.mean(l_sg), "l_ref": jnp.mean(l_ref),
  }
  return loss, metrics


def generator_loss(x0_hat: jax.Array, *, x0_ref_cond: jax.Array, x0_ref_uncond: jax.Array,
                   x0_ref_cfg: jax.Array, x0_fake: jax.Array, x0_phi_cfg: jax.Array,
                   x0_ref_rew: jax.Array, cfg_scale: float = 3.5, w_kl: float = 1.0,
                   w_cfg: float = 0.3, w_rew: float = 0.7, floor: float = 1e-8):
  """L_G = w_cfg L_cfg + w_rew L_rew + w_kl L_KL of the module docstring, (loss, metrics).

  All x0 inputs but x0_hat are clean estimates at the generator's re-noised x_tau (constants):
  the reference conditional / unconditional / CFG-guided (``diffusion.guidance.cfg``), the fake
  score, the CFG-guided surrogate and the reference it is compared with."""
  l_kl, w1 = normalised_target_loss(x0_hat, x0_ref_cond - x0_fake, x0_ref_cfg, floor=floor)
  l_cfg, _ = normalised_target_loss(x0_hat, cfg_scale * (x0_ref_cond - x0_ref_uncond),
                                    x0_ref_cfg, floor=floor)
  l_rew, w3 = normalised_target_loss(x0_hat, x0_phi_cfg - x0_ref_rew, x0_phi_cfg, floor=floor)
  loss = w_cfg * l_cfg + w_rew * l_rew + w_kl * l_kl
  return loss, {"loss_kl": l_kl, "loss_cfg": l_cfg, "loss_rew": l_rew,
                "norm_ref": jnp.mean(w1), "norm_phi": jnp.mean(w3)}
