"""DDPO: denoising as a multi-step MDP, policy gradient with a PPO clip (METHODS.md section 1).

All functions are pure and shape-agnostic over leading axes; log-probabilities are the
per-sample *means* over latent dims (as every public DDPO implementation does), in float32.

- ``ppo_loss``: L = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(logp_new - logp_old),
  A clipped to [-adv_clip_max, adv_clip_max]. With a large ``eps`` and one inner epoch this is
  plain REINFORCE (DDPO_SF); with importance ratios over several minibatches it is DDPO_IS.
  The clip range defaults to 1e-4 because log p is a mean over ~16k dims: the ratio moves little.
- ``kl_to_reference``: Flow-GRPO's per-step KL of two Gaussians with the same std,
  ||mu_theta - mu_ref||^2 / (2 std^2), averaged over dims.
- ``rwr_loss``: reward-weighted regression, the paper's baseline: a per-sample denoising loss
  weighted by softmax(R / temperature) ("exp") or by 1[R >= percentile] ("sparse").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ppo_loss(logp_new: jax.Array, logp_old: jax.Array, advantages: jax.Array, *,
             clip_range: float = 1e-4, adv_clip_max: float = 5.0):
  """Returns (loss, metrics) for one minibatch of (sample, timestep) pairs."""
  logp_new = logp_new.astype(jnp.float32)
  logp_old = logp_old.astype(jnp.float32)
  adv = jnp.clip(advantages.astype(jnp.float32), -adv_clip_max, adv_clip_max)
  ratio = jnp.exp(logp_new - logp_old)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = jnp.mean(jnp.maximum(unclipped, clipped))
  dlogp = logp_new - logp_old
  metrics = {
      "approx_kl": 0.5 * jnp.mean(dlogp ** 2),
      "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
      "ratio_mean": jnp.mean(ratio),
  }
  return loss, metrics


def kl_to_reference(mean: jax.Array, mean_ref: jax.Array, std: jax.Array) -> jax.Array:
  """Per-sample KL(N(mean, std^2) || N(mean_ref, std^2)) averaged over non-batch dims."""
  std = jnp.reshape(std, std.shape + (1,) * (mean.ndim - std.ndim)).astype(jnp.float32)
  d = (mean.astype(jnp.float32) - mean_ref.astype(jnp.float32)) ** 2 / (
      2.0 * jnp.maximum(std, 1e-6) ** 2)
  return jnp.mean(d, axis=tuple(range(1, mean.ndim)))


def rwr_weights(rewards: jax.Array, *, mode: str = "exp", temperature: float = 1.0,
                percentile: float = 0.9) -> jax.Array:
  """Normalised per-sample weights (sum to the batch size)."""
  r = rewards.astype(jnp.float32)
  if mode == "exp":
    w = jax.nn.softmax(r / temperature)
  elif mode == "sparse":
    w = (r >= jnp.quantile(r, percentile)).astype(jnp.float32)
    w = w / jnp.maximum(jnp.sum(w), 1.0)
  else:
    raise ValueError(f"RWR mode must be 'exp' or 'sparse', got {mode!r}")
  return jax.lax.stop_gradient(w * r.shape[0])


def rwr_loss(denoise_loss: jax.Array, rewards: jax.Array, **kw) -> jax.Array:
  """mean_i w_i * denoise_loss_i with ``rwr_weights``."""
  return jnp.mean(rwr_weights(rewards, **kw) * denoise_loss)
