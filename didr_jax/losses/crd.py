"""CRD: Centered Reward Distillation on the forward process (docs/methods.md §2), pure losses.

KL-regularised RL, max E[R] - beta KL(p_theta || p_ref), has the optimum
p* = p_ref e^{R/beta} / Z(c), so the implicit reward r_theta = beta log(p_theta / p_ref) equals
R - beta log Z(c). Centering both sides within the samples of one prompt cancels the intractable
Z(c):

  L = E_c (1/K) sum_i (rbar_theta(x_i) - Rbar(x_i))^2,  rbar = r - mean over the prompt's samples.

Every function here works on model outputs at a forward-noised x_t = alpha x0 + sigma eps, in any
parameterisation of ``diffusion.param`` ("epsilon", "v_prediction", "sample", "flow"), so one
implementation serves the VP/eps UNets and the flow/velocity DiTs. The caller draws t (see
``diffusion.kernels``), noises the rollouts' clean samples and runs three networks at x_t: theta
(trainable), "old" (an EMA snapshot of theta) and the frozen pretrained reference with CFG.

Pieces (all pure and jit-able; per-sample arithmetic in float32, float64 kept):

- ``implicit_reward``: the one-sample ELBO estimate of log p_theta / p_old at x_t,
    r = -mean_dims[(out_theta - y)^2 / w_theta - (out_old - y)^2 / w_old],
    y = the denoising target of the parameterisation (``param.x0_eps_to_output(x0, eps)``),
    w = sg(mean_dims |out - y|) floored at 1e-5 (the mean-abs normaliser; ``normalise=False`` gives
    w = 1).
- centering: ``losses.common.center_in_groups``, xbar_i = x_i - mean_{j: id_j = id_i} x_j by
  segment sums over prompt ids in [0, num_prompts) (groups need not be contiguous or equal-sized;
  under jit a batch sharded over devices gives the same result).
- ``to_unit`` / ``reward_to_advantage``: A = per-prompt normalised reward (global std by default,
  ``losses.common.group_advantages``), clipped to +-c (c = 5), mapped to Rt = A / (2c) + 1/2 =
  A / 10 + 1/2 in [0, 1].
- ``policy_loss``: MSE (c_beta rbar - Rbar)^2 (c / c_beta) or its BCE variant, on Rt.
- ``kl_weights`` / ``kl_anchor``: beta_KL mean_i[(m + R_i (1 - m)) mean_dims (out_theta -
  sg(out_ref_cfg))^2], R_i the raw reward in [0, 1] (default) or Rt.
- ``crd_loss``: all of it from the three outputs, with metrics.
- ``OLD_SNAPSHOT`` / ``SAMPLER_SNAPSHOT``: the authors' EMA decay schedules
  (``losses.common.SnapshotSchedule``).

Deliberate differences from the authors' trainer (docs/methods.md §2): centering uses exact
per-prompt means, not the mean over the whole (multi-prompt) minibatch; the KL strength follows the
raw reward in [0, 1] by default (their port weighs by the mapped advantage, kept as an option).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from didr_jax.diffusion import param
from didr_jax.losses.common import (SnapshotSchedule, center_in_groups, compute_dtype,
                                    dsm_per_sample, group_advantages, mean_abs)

LOSS_TYPES = ("mse", "bce")
KL_WEIGHTS = ("reward", "advantage")

# The authors' decay schedules (their OCR / GenEval tables): the "old" reference of the log-ratio
# starts at 0.25 and ramps to 0.999 with slope 0.005 per step; the decoupled sampling snapshot
# copies theta (d = 0) until step 75, then ramps with slope 0.0075 to 0.999.
OLD_SNAPSHOT = SnapshotSchedule(start=0.25, slope=0.005, end=0.999, start_step=0)
SAMPLER_SNAPSHOT = SnapshotSchedule(start=0.0, slope=0.0075, end=0.999, start_step=75)


def _mean_dims(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _implicit_reward(out_theta, out_old, x0, eps, alpha, sigma, prediction_type: str, *,
                     normalise: bool = True, floor: float = 1e-5):
  """(r, w_theta, w_old); see ``implicit_reward``."""
  dt = compute_dtype(out_theta)
  out_old = jax.lax.stop_gradient(out_old)
  y = jax.lax.stop_gradient(
      param.x0_eps_to_output(x0.astype(dt), eps.astype(dt), alpha, sigma, prediction_type))
  err_theta = dsm_per_sample(out_theta, x0, eps, alpha, sigma, prediction_type)
  err_old = dsm_per_sample(out_old, x0, eps, alpha, sigma, prediction_type)
  if normalise:
    w_theta = jax.lax.stop_gradient(
        jnp.maximum(mean_abs(out_theta.astype(dt) - y), floor)).reshape(-1)
    w_old = jnp.maximum(mean_abs(out_old.astype(dt) - y), floor).reshape(-1)
  else:
    w_theta = w_old = jnp.ones(err_theta.shape, err_theta.dtype)
  # mean_dims[e^2 / w] = mean_dims[e^2] / w: w is one number per sample.
  return -(err_theta / w_theta - err_old / w_old), w_theta, w_old


def implicit_reward(out_theta: jax.Array, out_old: jax.Array, x0: jax.Array, eps: jax.Array,
                    alpha, sigma, prediction_type: str, *, normalise: bool = True,
                    floor: float = 1e-5) -> jax.Array:
  """Per-sample implicit reward (B,) at x_t = alpha x0 + sigma eps:

    r_theta = -mean_dims[(out_theta - y)^2 / w_theta - (out_old - y)^2 / w_old],
    y = param.x0_eps_to_output(x0, eps, alpha, sigma, prediction_type)  (eps | alpha eps - sigma x0
        | x0 | eps - x0: the denoising target, v* = eps - x0 for flow),
    w = sg(max(mean_dims |out - y|, floor))                            (w = 1 if not normalise).

  The difference of two denoising losses is a one-sample ELBO estimate of log p_theta / p_old (up
  to the time weighting); the normaliser puts both on the scale of their own current error, as in
  the authors' trainer ("adaptive" log-prob). ``out_old`` is treated as a constant; only out_theta
  carries gradient, and not through w. With out_theta equal to out_old, r is exactly 0.
  """
  return _implicit_reward(out_theta, out_old, x0, eps, alpha, sigma, prediction_type,
                          normalise=normalise, floor=floor)[0]


def to_unit(advantages: jax.Array, clip: float = 5.0) -> jax.Array:
  """Rt = clip(A, -clip, clip) / (2 clip) + 1/2 in [0, 1]  (clip = 5: Rt = A / 10 + 1/2)."""
  a = jnp.clip(advantages.astype(compute_dtype(advantages)), -clip, clip)
  return a / (2.0 * clip) + 0.5


def reward_to_advantage(rewards: jax.Array, prompt_ids: jax.Array, num_prompts: int, *,
                        clip: float = 5.0, std: str = "global", eps: float = 1e-4):
  """(A, Rt): A = (R - mean over the prompt's samples) / (std + eps), clipped to +-clip
  (``group_advantages``; std "global" = of the whole batch as the authors, "group" = each prompt's
  own), and Rt = ``to_unit(A, clip)``.

  Pass the whole epoch's rewards (every sample of every prompt), as the authors do; a minibatch
  holding part of a group would see other means and another global std. Note that the global std
  includes the spread between prompts, so adding per-prompt constants to R rescales A; with
  std="group" A is exactly invariant to them.
  """
  a = group_advantages(rewards.astype(compute_dtype(rewards)), prompt_ids, num_prompts, std=std,
                       eps=eps, clip=clip)
  return a, to_unit(a, clip)


def policy_loss(r: jax.Array, target: jax.Array, prompt_ids: jax.Array, num_prompts: int, *,
                c_beta: float = 1.0, loss_type: str = "mse", scale: float = 5.0):
  """Centered reward matching, returns (loss, (rbar, tbar)) with rbar, tbar = r, target centered
  over the samples of each prompt present (``center_in_groups``; target: the mapped advantage
  Rt, it carries no gradient):

  - "mse": (scale / c_beta) mean_i (c_beta rbar_i - tbar_i)^2
  - "bce": (scale / c_beta) mean_i BCE(logit = c_beta rbar_i, label = sigmoid(tbar_i))
           = (scale / c_beta) mean_i [softplus(z_i) - sigmoid(tbar_i) z_i],  z = c_beta rbar.

  scale = 5 (the advantage clip) over c_beta keeps the gradient size independent of c_beta, as in
  the authors' trainer. Both variants have the same minimiser c_beta rbar = tbar; the BCE one has a
  bounded gradient in z. **[reconstruction]** The BCE form (label = sigmoid of the centered mapped
  advantage) is the authors' public port; the abstract does not define it. That port also
  detaches the mean of r in the centering: for "mse" under exact per-prompt centering the gradient
  is the same (sum_i (c rbar_i - tbar_i) = 0 within a prompt, so the mean's term vanishes); for
  "bce" we keep the full gradient of the exact centering, which drops, against the port, the term
  -(c/K) sum_{j in prompt} (sigmoid(z_j) - sigmoid(tbar_j)) (zero at the minimiser).
  Any per-prompt constant added to r or to target cancels exactly (the log Z(c) argument).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  rbar = center_in_groups(r, prompt_ids, num_prompts)
  tbar = jax.lax.stop_gradient(center_in_groups(target.astype(r.dtype), prompt_ids, num_prompts))
  z = c_beta * rbar
  if loss_type == "mse":
    per = (z - tbar) ** 2
  else:
    per = optax.sigmoid_binary_cross_entropy(z, jax.nn.sigmoid(tbar))
  return (scale / c_beta) * jnp.mean(per), (rbar, tbar)


def kl_weights(rewards: jax.Array, unit_advantages: jax.Array, *, mode: str = "reward",
               kl_min: float = 1e-3) -> jax.Array:
  """Reward-adaptive KL strength per sample, m + u (1 - m) with m = kl_min and u in [0, 1]:

  - "reward" (default): u = clip(R, 0, 1), the raw reward (expected in [0, 1]; clipped so the
    weight stays in [m, 1]). Weak KL while rewards are low, strong once they are high: the
    abstract's "accelerate early learning ... reduce late-stage exploitation".
  - "advantage": u = Rt, the mapped advantage (the authors' port; its mean stays near 1/2 for the
    whole run). **[reconstruction]** see docs/methods.md §2.5.
  """
  if mode not in KL_WEIGHTS:
    raise ValueError(f"kl weight mode must be one of {KL_WEIGHTS}, got {mode!r}")
  u = jnp.clip(rewards, 0.0, 1.0) if mode == "reward" else unit_advantages
  return jax.lax.stop_gradient(kl_min + u * (1.0 - kl_min))


def kl_anchor(out_theta: jax.Array, out_ref_cfg: jax.Array, weights: jax.Array, *,
              kl_beta: float = 0.1):
  """(beta_KL mean_i[weight_i kl_i], kl) with kl_i = mean_dims (out_theta - sg(out_ref_cfg))^2:
  the per-step Gaussian KL to the CFG-guided frozen reference up to its time weighting, in the
  units of the model output (velocity for flow, eps for eps models). The mean over dims (rather
  than a sum) matches the authors' reduction."""
  dt = compute_dtype(out_theta)
  kl = _mean_dims((out_theta.astype(dt) - jax.lax.stop_gradient(out_ref_cfg).astype(dt)) ** 2)
  return kl_beta * jnp.mean(weights * kl), kl


def centered_correlation(a: jax.Array, b: jax.Array) -> jax.Array:
  """sum a_i b_i / sqrt(sum a^2 sum b^2) for per-prompt centered a, b: the Pearson correlation
  pooled within prompts (0 when either is all zero, e.g. theta = old)."""
  num = jnp.sum(a * b)
  den = jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def crd_loss(out_theta: jax.Array, out_old: jax.Array, out_ref_cfg: jax.Array | None,
             x0: jax.Array, eps: jax.Array, alpha, sigma, rewards: jax.Array,
             advantages: jax.Array, prompt_ids: jax.Array, num_prompts: int, *,
             prediction_type: str, c_beta: float = 1.0, loss_type: str = "mse",
             adv_clip: float = 5.0, kl_beta: float = 0.1, kl_min: float = 1e-3,
             kl_weight: str = "reward", normalise: bool = True, floor: float = 1e-5):
  """The CRD objective at one forward-noised time, returns (loss, metrics):

    loss = policy_loss(r_theta, Rt)  +  kl_anchor(out_theta, out_ref_cfg, m + u (1 - m))

  with r_theta = ``implicit_reward(out_theta, out_old, x0, eps, alpha, sigma)``, Rt =
  ``to_unit(advantages, adv_clip)``, u = raw reward or Rt (``kl_weights``). Inputs: the three
  network outputs at x_t = alpha x0 + sigma eps (theta, the "old" EMA snapshot, the frozen
  reference with CFG; ``out_ref_cfg`` may be None when kl_beta = 0), the clean samples and noise,
  alpha / sigma (scalars or (B,)), the raw rewards (B,), the normalised advantages A (B,) from
  ``reward_to_advantage`` over the whole epoch, and prompt ids in [0, num_prompts).

  Metrics: loss, policy_loss, kl (unweighted mean of mean_dims (out_theta - out_ref)^2),
  kl_loss, kl_weight (mean), implicit_reward (mean, and its mean |.|), corr (the correlation of
  the centered implicit reward with the centered Rt, ``centered_correlation``), w_theta / w_old
  (mean normalisers), target_std (std of the centered Rt).
  """
  r, w_theta, w_old = _implicit_reward(out_theta, out_old, x0, eps, alpha, sigma,
                                       prediction_type, normalise=normalise, floor=floor)
  unit = jax.lax.stop_gradient(to_unit(advantages, adv_clip))
  pol, (rbar, tbar) = policy_loss(r, unit, prompt_ids, num_prompts, c_beta=c_beta,
                                  loss_type=loss_type, scale=adv_clip)
  loss = pol
  metrics = {
      "policy_loss": pol,
      "implicit_reward": jnp.mean(r),
      "implicit_reward_abs": jnp.mean(jnp.abs(r)),
      "corr": centered_correlation(jax.lax.stop_gradient(rbar), tbar),
      "w_theta": jnp.mean(w_theta),
      "w_old": jnp.mean(w_old),
      "target_std": jnp.sqrt(jnp.mean(tbar ** 2)),
  }
  if kl_beta > 0:
    if out_ref_cfg is None:
      raise ValueError("kl_beta > 0 needs the reference output out_ref_cfg")
    w = kl_weights(rewards.astype(r.dtype), unit, mode=kl_weight, kl_min=kl_min)
    kl_loss, kl = kl_anchor(out_theta, out_ref_cfg, w, kl_beta=kl_beta)
    loss = loss + kl_loss
    metrics.update(kl=jnp.mean(kl), kl_loss=kl_loss, kl_weight=jnp.mean(w))
  metrics["loss"] = loss
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
