"""TDM (Trajectory Distribution Matching): a K-step deterministic student distilled by
distribution matching on its re-noised boundary states (docs/methods.md §4, step 1 and the
t_KL term of step 3). Pure jit-able functions, written once against (alpha, sigma) and the
prediction type of ``diffusion.param``, so they serve both families:

- VP:   alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)  (``kernels.vp_alpha_sigma``)
- flow: alpha = 1 - sig,      sigma = sig               (``kernels.flow_alpha_sigma``)

**Student step** at boundary t_j -> t_{j+1} (``student_step``): from the output,
(x0_hat, eps_hat) = ``param.to_x0_eps``; the deterministic move is

    x_{j+1} = alpha_{j+1} x0_hat + sigma_{j+1} eps_hat,

which is DDIM with eta = 0 for VP and the Euler step x_{j+1} = x_j - (sig_j - sig_{j+1}) v for
flow (with x0_hat = x_j - sig_j v, eps_hat = x_j + (1 - sig_j) v). The whole K-step rollout is
therefore ``ddim.ddim_sample(eta=0)`` / ``flow.flow_sample(a=0)`` (their ``latents`` are the
K + 1 boundary states); ``x0_from_states`` recovers each step's x0_hat from two stored
consecutive states, so a rollout only needs to keep those.

**Fake-score loss** (``fake_score_loss``): draw tau between t_{j+1} and T (``sample_tau``),
re-noise x_tau = a x_{j+1} + b eps with the conditional kernel q(x_tau | x_{j+1})
(``kernels.renoise``: a = alpha_tau / alpha_{j+1}, b = sqrt(sigma_tau^2 - (a sigma_{j+1})^2)),
and regress the fake network on the target whose clean estimate is the student's x0_hat:

    target = param.x0_to_output(x0_hat, x_tau)   (flow: v = (x_tau - x0_hat) / sig_tau)
    L_fake = mean_i [ |target - out_fake(x_tau)|^2 + 0.02 |out_ref(x_tau) - out_fake(x_tau)|^2 ]

(squares averaged over the image dims; target and out_ref are constants).

**Generator's distribution-matching target** (``dm_loss``): with x0_ref / x0_fake the clean
estimates of the reference (teacher) and fake scores at x_tau,

    t_KL = x0_hat + (x0_ref - x0_fake),     w = mean_dims |x0_hat - x0_norm|  (constant)
    L_KL = 0.5 |x0_hat - sg(x0_hat - g)|^2 with g = (x0_hat - t_KL) / w = (x0_fake - x0_ref) / w

so dL/dx0_hat = g / B exactly (``common.stop_gradient_target_loss``). x0_norm defaults to x0_ref
(DMD's normaliser); TDM-R1 passes the CFG-guided reference. Since s_fake - s_ref =
(alpha / sigma^2) (x0_fake - x0_ref), g is the score difference of the KL gradient in x0 units.
The authors write the loss as |t - x0_hat|^2 / w; that differs from ours by a constant factor
(2 and the sum over dims), which leaves the ratios between TDM-R1's three terms unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax.diffusion import kernels, param
from didr_jax.losses import common


def student_step(output: jax.Array, x_t: jax.Array, alpha_t, sigma_t, alpha_next, sigma_next,
                 prediction_type: str, clip_range: float | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x_next, x0_hat, eps_hat): x0_hat, eps_hat = ``param.to_x0_eps``(output) at (alpha_t,
  sigma_t), x_next = alpha_next x0_hat + sigma_next eps_hat (DDIM eta = 0 / flow Euler).
  The last step (alpha_next = 1, sigma_next = 0) returns x_next = x0_hat.

  ``clip_range`` r (a VP scheduler's ``clip_sample``): x0_hat = clip(x0_hat, -r, r) before the
  step, eps_hat unchanged, as the DDIM sampler (``ddim.ddim_mean_std``, diffusers) does. Without
  it the first step of a pixel-space model at t = 999 (alpha about 0.006) multiplies the eps
  error by sigma / alpha (about 157) into x0_hat."""
  x0_hat, eps_hat = param.to_x0_eps(output, x_t, alpha_t, sigma_t, prediction_type)
  if clip_range is not None:
    x0_hat = jnp.clip(x0_hat, -clip_range, clip_range)
  return kernels.q_sample(x0_hat, eps_hat, alpha_next, sigma_next), x0_hat, eps_hat


def x0_from_states(x_t: jax.Array, x_next: jax.Array, alpha_t, sigma_t, alpha_next,
                   sigma_next) -> jax.Array:
  """The x0_hat of a deterministic step from two consecutive stored states: solving
  x_t = alpha_t x0 + sigma_t eps, x_next = alpha_next x0 + sigma_next eps for x0 gives

      x0_hat = (sigma_t x_next - sigma_next x_t) / (alpha_next sigma_t - alpha_t sigma_next)

  (the denominator is > 0 whenever the step raises the signal-to-noise ratio)."""
  b = lambda c: param.bcast(c, x_t)
  den = b(alpha_next) * b(sigma_t) - b(alpha_t) * b(sigma_next)
  return (b(sigma_t) * x_next - b(sigma_next) * x_t) / den


def sample_tau(rng: jax.Array, shape, lo, hi=None, *, integer: bool = False) -> jax.Array:
  """A re-noising time between the boundary time ``lo`` (scalar or broadcastable to ``shape``)
  and ``hi``: flow sig_tau ~ Uniform[lo, hi) (float32, hi defaults to 1), or with ``integer`` a
  VP timestep uniform in {lo, ..., hi} (int32, hi required, e.g. T - 1). TDM uses lo = t_{j+1},
  hi = T; TDM-R1's surrogate lo = max(t_{j'+1}, t_min)."""
  if integer:
    if hi is None:
      raise ValueError("sample_tau(integer=True) needs hi (the largest VP timestep, T - 1)")
    lo = jnp.asarray(lo, jnp.int32)
    return jax.random.randint(rng, shape, lo, jnp.asarray(hi, jnp.int32) + 1, jnp.int32)
  u = jax.random.uniform(rng, shape, jnp.float32)
  lo, hi = jnp.asarray(lo, jnp.float32), 1.0 if hi is None else hi
  return lo + (jnp.asarray(hi, jnp.float32) - lo) * u


def renoised_target(x_next: jax.Array, x0_hat: jax.Array, eps: jax.Array, alpha_next,
                    sigma_next, alpha_tau, sigma_tau,
                    prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(x_tau, target): x_tau = ``kernels.renoise``(x_next, eps) from (alpha_next, sigma_next) to
  (alpha_tau, sigma_tau), and the stop-gradient regression target whose clean estimate at x_tau
  is x0_hat: ``param.x0_to_output(x0_hat, x_tau)`` (flow: (x_tau - x0_hat) / sig_tau, eps:
  (x_tau - alpha_tau x0_hat) / sigma_tau). Both come back detached: the fake / surrogate
  regress on them and the generator's gradient goes only through its live x0_hat
  (``dm_loss``). Shared by TDM's fake score, TDM-R1's surrogate and the generator step."""
  x_tau = kernels.renoise(x_next, eps, alpha_next, sigma_next, alpha_tau, sigma_tau)
  target = param.x0_to_output(x0_hat, x_tau, alpha_tau, sigma_tau, prediction_type)
  return jax.lax.stop_gradient(x_tau), jax.lax.stop_gradient(target)


def fake_score_loss(out_fake: jax.Array, out_ref: jax.Array, x_tau: jax.Array,
                    x0_hat: jax.Array, alpha_tau, sigma_tau, prediction_type: str, *,
                    ref_weight: float = 0.02, weight: jax.Array | None = None):
  """TDM's fake-score loss, (loss, metrics):

      L = mean_i w_i [ dsm_i + ref_weight |sg(out_ref) - out_fake|^2 ]

  dsm_i = ``common.dsm_per_sample`` with x0 = x0_hat and eps = (x_tau - alpha_tau x0_hat) /
  sigma_tau, i.e. the target of ``renoised_target``; x0_hat and out_ref are constants."""
  x0_hat = jax.lax.stop_gradient(x0_hat)
  eps = (x_tau - param.bcast(alpha_tau, x_tau) * x0_hat) / param.bcast(sigma_tau, x_tau)
  dsm = common.dsm_per_sample(out_fake, x0_hat, eps, alpha_tau, sigma_tau, prediction_type)
  reg = common.mean_sq_dist(out_fake, jax.lax.stop_gradient(out_ref))
  per = dsm + ref_weight * reg
  loss = jnp.mean(per if weight is None else per * weight)
  return loss, {"fake_dsm": jnp.mean(dsm), "fake_ref_reg": jnp.mean(reg)}


def normalised_target_loss(x0_hat: jax.Array, delta: jax.Array, x0_norm: jax.Array, *,
                           floor: float = 1e-8) -> tuple[jax.Array, jax.Array]:
  """(loss, w) for the stop-gradient target t = x0_hat + delta normalised by
  w = max(mean_dims |x0_hat - x0_norm|, floor), a per-sample constant:

      loss = 0.5 |x0_hat - sg(t')|^2 (sum over dims, mean over batch), t' = x0_hat + delta / w,

  whose gradient with respect to x0_hat is exactly -delta / (w B). ``delta`` and ``w`` are
  stop-gradient. Returns w with shape (B,)."""
  w = common.dmd_normaliser(x0_hat, x0_norm, floor)
  g = -jax.lax.stop_gradient(delta) / w
  return common.stop_gradient_target_loss(x0_hat, g), w.reshape(x0_hat.shape[0])


def dm_loss(x0_hat: jax.Array, x0_ref: jax.Array, x0_fake: jax.Array,
            x0_norm: jax.Array | None = None, *, floor: float = 1e-8):
  """TDM's generator loss (loss, metrics): target t_KL = x0_hat + (x0_ref - x0_fake), normaliser
  w = mean|x0_hat - x0_norm| (x0_norm = x0_ref by default), gradient (x0_fake - x0_ref) / (w B).
  Zero gradient when the fake score equals the reference (student matches the teacher)."""
  x0_norm = x0_ref if x0_norm is None else x0_norm
  loss, w = normalised_target_loss(x0_hat, x0_ref - x0_fake, x0_norm, floor=floor)
  return loss, {"dm_normaliser": jnp.mean(w)}
