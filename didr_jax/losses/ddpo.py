"""DDPO: denoising as a multi-step MDP, policy gradient with a PPO clip (docs/methods.md §1).

All functions are pure and shape-agnostic over leading axes; log-probabilities are the
per-sample *means* over latent dims (as every public DDPO implementation does), in float32.

- ``ppo_loss``: L = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(logp_new - logp_old),
  A clipped to [-adv_clip_max, adv_clip_max]. With a large ``eps`` and one inner epoch this is
  plain REINFORCE (DDPO_SF); with importance ratios over several minibatches it is DDPO_IS.
  The clip range defaults to 1e-4 because log p is a mean over ~16k dims: the ratio moves little.
  ``mask`` (1 = a stochastic step, 0 = a deterministic one) drops entries from the mean and the
  metrics: a step whose std is 0 has no density, so it has no ratio and contributes nothing.
- ``kl_to_reference``: Flow-GRPO's per-step KL penalty ||mu_theta - mu_ref||^2 / (2 s^2),
  averaged over dims, with s the scale the caller passes (flow SDE: the noise coefficient sig_t,
  not the step std; CPS and DDIM: the step std; see ``flow.step_kl_std`` / ``ddim.ddim_std``).
  Samples whose s is 0 (deterministic steps) get 0, not a floored 1 / (2 * 1e-12).
- ``ppo_kl_loss``: one micro-batch's loss over its step slots, sum_j (L_j + kl_beta KL_j), with
  the metrics the trainer logs (per-step diagnostics included); the trainer only supplies the
  network's log-probs and step means.
- ``rwr_loss``: reward-weighted regression, the paper's baseline: a per-sample denoising loss
  weighted by softmax(A / temperature) ("exp") or by 1[A >= percentile] ("sparse"), over the
  micro-batch, with A the normalised advantages (the DDPO paper weights normalised rewards: on
  raw rewards in [0, 1] softmax(R) spans at most e = 2.7x, close to plain self-distillation, and
  any reward's scale would set the temperature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """sum(mask x) / max(sum(mask), 1); the plain mean without a mask."""
  if mask is None:
    return jnp.mean(x)
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ppo_loss(logp_new: jax.Array, logp_old: jax.Array, advantages: jax.Array, *,
             clip_range: float = 1e-4, adv_clip_max: float = 5.0, mask: jax.Array | None = None):
  """Returns (loss, metrics) for one minibatch of (sample, timestep) pairs; ``mask`` (same
  shape, 1 = stochastic step) excludes deterministic steps from the loss and the metrics."""
  logp_new = logp_new.astype(jnp.float32)
  logp_old = logp_old.astype(jnp.float32)
  adv = jnp.clip(advantages.astype(jnp.float32), -adv_clip_max, adv_clip_max)
  dlogp = logp_new - logp_old
  if mask is not None:  # no ratio on a deterministic step (and no exp overflow there)
    dlogp = jnp.where(mask > 0, dlogp, 0.0)
  ratio = jnp.exp(dlogp)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  metrics = {
      "approx_kl": 0.5 * masked_mean(dlogp ** 2, mask),
      "abs_dlogp": masked_mean(jnp.abs(dlogp), mask),
      "clipfrac": masked_mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32), mask),
      "ratio_mean": masked_mean(ratio, mask),
  }
  return loss, metrics


def kl_to_reference(mean: jax.Array, mean_ref: jax.Array, scale: jax.Array) -> jax.Array:
  """Per-sample ||mean - mean_ref||^2 / (2 scale^2) averaged over non-batch dims (with scale
  the step std this is KL(N(mean, std^2) || N(mean_ref, std^2))); 0 where scale <= 1e-6."""
  scale = jnp.asarray(scale, jnp.float32)
  sq = jnp.mean((mean.astype(jnp.float32) - mean_ref.astype(jnp.float32)) ** 2,
                axis=tuple(range(1, mean.ndim)))
  scale = jnp.broadcast_to(scale, sq.shape)
  live = scale > 1e-6
  return jnp.where(live, sq / (2.0 * jnp.where(live, scale, 1.0) ** 2), 0.0)


def ppo_kl_loss(logp_new: jax.Array, logp_old: jax.Array, advantages: jax.Array,
                mask: jax.Array, steps: jax.Array, *, num_steps: int, clip_range: float = 1e-4,
                adv_clip_max: float = 5.0, kl_beta: float = 0.0, mean: jax.Array | None = None,
                mean_ref: jax.Array | None = None, kl_scale: jax.Array | None = None):
  """Returns (loss, metrics) of one micro-batch of B samples at kc step slots (docs/methods.md
  §1.2 and §1.3): slot j is one trajectory step ``steps[j]`` shared by the micro-batch, and

      L   = sum_j (L_j + kl_beta KL_j),
      L_j = masked_mean_i max(-A_i r_ij, -A_i clip(r_ij, 1 - eps, 1 + eps))    (``ppo_loss``)
      KL_j = masked_mean_i |mu_ij - sg(mu_ref_ij)|^2 / (2 s_ij^2)         (``kl_to_reference``)

  with r_ij = exp(logp_new - logp_old), A_i = clip(advantages_i, -adv_clip_max, adv_clip_max),
  eps = ``clip_range``, the masked means over the samples i of slot j with mask_ij (1 = a
  stochastic step, 0 = no density: dropped), the squared distance averaged over the latent dims
  and KL_ij = 0 where s_ij <= 1e-6. The gradient reaches ``logp_new`` and ``mean``, never
  ``mean_ref``.

  Shapes: ``logp_new``, ``logp_old``, ``mask`` (B, kc); ``advantages`` (B,); ``steps`` (kc,)
  ints in [0, num_steps); ``mean``, ``mean_ref`` (B, kc, ...) the step means under the policy
  and the frozen reference, ``kl_scale`` broadcastable to (B, kc). Without ``mean_ref`` (None)
  there is no KL term and no ``kl_ref`` metric.

  Metrics, each summed over the slots (the caller divides by its number of slots): ``loss``,
  ``approx_kl`` (0.5 masked_mean dlogp^2), ``abs_dlogp``, ``clipfrac`` (fraction of
  |r - 1| > eps), ``ratio_mean``, ``kl_ref`` (KL_j); and per trajectory step s, (num_steps,)
  vectors over the slots with at least one live pair (h_js = 1[steps_j = s] 1[any_i mask_ij]):
  ``steps_count`` = sum_j h_js, ``clipfrac_steps`` = sum_j clipfrac_j h_js,
  ``abs_dlogp_steps`` = sum_j abs_dlogp_j h_js."""
  if (mean is None) != (mean_ref is None) or (mean_ref is not None and kl_scale is None):
    raise ValueError("the KL term needs mean, mean_ref and kl_scale together")
  losses, metrics = jax.vmap(
      lambda lp, old, m: ppo_loss(lp, old, advantages, clip_range=clip_range,
                                  adv_clip_max=adv_clip_max, mask=m),
      in_axes=1)(logp_new, logp_old, mask)                                   # (kc,) each
  if mean_ref is not None:
    b, kc = logp_new.shape
    pairs = lambda x: x.reshape((b * kc,) + x.shape[2:])                  # (B * kc, ...)
    scale = jnp.broadcast_to(jnp.asarray(kl_scale, jnp.float32), (b, kc))
    kl_pair = kl_to_reference(pairs(mean), jax.lax.stop_gradient(pairs(mean_ref)),
                              pairs(scale)).reshape(b, kc)
    kl = jax.vmap(masked_mean, in_axes=1)(kl_pair, mask)                    # (kc,)
    losses = losses + kl_beta * kl
    metrics = {**metrics, "kl_ref": kl}
  hit = jax.nn.one_hot(steps, num_steps) * jnp.any(mask, axis=0)[:, None]  # (kc, num_steps)
  per_step = {"steps_count": jnp.sum(hit, axis=0),
              "clipfrac_steps": metrics["clipfrac"] @ hit,
              "abs_dlogp_steps": metrics["abs_dlogp"] @ hit}
  loss = jnp.sum(losses)
  metrics = {k: jnp.sum(v) for k, v in metrics.items()}
  return loss, {**metrics, **per_step, "loss": loss}


def rwr_weights(advantages: jax.Array, *, mode: str = "exp", temperature: float = 1.0,
                percentile: float = 0.9) -> jax.Array:
  """Normalised per-sample weights (sum to the batch size) of normalised advantages: invariant
  to an affine change of the reward (through the advantages' normalisation)."""
  r = advantages.astype(jnp.float32)
  if mode == "exp":
    w = jax.nn.softmax(r / temperature)
  elif mode == "sparse":
    w = (r >= jnp.quantile(r, percentile)).astype(jnp.float32)
    w = w / jnp.maximum(jnp.sum(w), 1.0)
  else:
    raise ValueError(f"RWR mode must be 'exp' or 'sparse', got {mode!r}")
  return jax.lax.stop_gradient(w * r.shape[0])


def rwr_loss(denoise_loss: jax.Array, advantages: jax.Array, **kw) -> jax.Array:
  """mean_i w_i * denoise_loss_i with ``rwr_weights`` of the normalised advantages."""
  return jnp.mean(rwr_weights(advantages, **kw) * denoise_loss)
