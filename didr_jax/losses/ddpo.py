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
