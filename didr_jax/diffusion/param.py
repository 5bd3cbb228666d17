"""Model-output parameterisations for both families, written once against (alpha_t, sigma_t).

Forward process x_t = alpha_t x0 + sigma_t eps with

- VP (SD / SDXL):      alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)   (alpha^2 + sigma^2 = 1)
- flow (Z-Image, SD3): alpha = 1 - sig,      sigma = sig                 (alpha + sigma = 1)

Prediction types (what the network outputs):

- "epsilon":       eps
- "v_prediction":  v = alpha eps - sigma x0              (VP only; uses alpha^2 + sigma^2 = 1)
- "sample":        x0
- "flow":          velocity v = eps - x0 = dx_t/dsig     (flow only; uses alpha + sigma = 1)

Score of the Gaussian forward kernel: s(x_t) = -(x_t - alpha x0_hat) / sigma^2 = -eps_hat / sigma,
so two x0 estimates give score differences s_A - s_B = (alpha / sigma^2) (x0_A - x0_B).

Coefficients are scalars or per-sample (B,) arrays; they broadcast over the remaining (image) dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def bcast(c, x: jax.Array) -> jax.Array:
  """Reshapes a scalar or leading-axes coefficient (e.g. (B,)) to broadcast against x."""
  c = jnp.asarray(c)
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def _check(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def to_x0_eps(output: jax.Array, x_t: jax.Array, alpha, sigma,
              prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(x0_hat, eps_hat) from a model output.

  - epsilon:      eps = out,                x0 = (x_t - sigma eps) / alpha
  - v_prediction: x0 = alpha x_t - sigma v, eps = alpha v + sigma x_t
  - sample:       x0 = out,                 eps = (x_t - alpha x0) / sigma
  - flow:         x0 = x_t - sigma v,       eps = x_t + alpha v
  (the v_prediction forms are diffusers' and the flow ones docs/methods.md §0; they use the
  family's constraint, so do not mix types across families.)
  """
  _check(prediction_type)
  a, s = bcast(alpha, x_t), bcast(sigma, x_t)
  if prediction_type == "epsilon":
    return (x_t - s * output) / a, output
  if prediction_type == "v_prediction":
    return a * x_t - s * output, a * output + s * x_t
  if prediction_type == "sample":
    return output, (x_t - a * output) / s
  return x_t - s * output, x_t + a * output


def to_x0(output, x_t, alpha, sigma, prediction_type: str) -> jax.Array:
  """x0_hat from a model output (see ``to_x0_eps``)."""
  return to_x0_eps(output, x_t, alpha, sigma, prediction_type)[0]


def x0_eps_to_output(x0: jax.Array, eps: jax.Array, alpha, sigma,
                     prediction_type: str) -> jax.Array:
  """The model output that corresponds to (x0, eps): eps | alpha eps - sigma x0 | x0 | eps - x0.
  With the true (x0, eps) of a forward sample this is the denoising-score-matching target."""
  _check(prediction_type)
  if prediction_type == "epsilon":
    return eps
  if prediction_type == "v_prediction":
    return bcast(alpha, x0) * eps - bcast(sigma, x0) * x0
  if prediction_type == "sample":
    return x0
  return eps - x0


def x0_to_output(x0: jax.Array, x_t: jax.Array, alpha, sigma, prediction_type: str) -> jax.Array:
  """Inverse of ``to_x0``: the output that would give x0_hat = x0 at x_t, using
  eps = (x_t - alpha x0) / sigma."""
  eps = (x_t - bcast(alpha, x_t) * x0) / bcast(sigma, x_t)
  return x0_eps_to_output(x0, eps, alpha, sigma, prediction_type)


def convert(output: jax.Array, x_t: jax.Array, alpha, sigma, from_type: str,
            to_type: str) -> jax.Array:
  """Re-expresses a model output in another prediction type (through x0 and eps)."""
  x0, eps = to_x0_eps(output, x_t, alpha, sigma, from_type)
  return x0_eps_to_output(x0, eps, alpha, sigma, to_type)


def score_from_x0(x_t: jax.Array, x0: jax.Array, alpha, sigma) -> jax.Array:
  """s(x_t) = -(x_t - alpha x0) / sigma^2."""
  return -(x_t - bcast(alpha, x_t) * x0) / bcast(sigma, x_t) ** 2


def score_from_eps(eps: jax.Array, sigma) -> jax.Array:
  """s(x_t) = -eps / sigma."""
  return -eps / bcast(sigma, eps)


def x0_from_score(score: jax.Array, x_t: jax.Array, alpha, sigma) -> jax.Array:
  """Tweedie: x0 = (x_t + sigma^2 s) / alpha."""
  return (x_t + bcast(sigma, x_t) ** 2 * score) / bcast(alpha, x_t)


def score_from_output(output, x_t, alpha, sigma, prediction_type: str) -> jax.Array:
  """Score of a model output: -(x_t - alpha x0_hat) / sigma^2."""
  return score_from_x0(x_t, to_x0(output, x_t, alpha, sigma, prediction_type), alpha, sigma)


def score_delta_from_x0_delta(dx0: jax.Array, alpha, sigma) -> jax.Array:
  """s_A - s_B = (alpha / sigma^2) (x0_A - x0_B)."""
  return bcast(alpha, dx0) / bcast(sigma, dx0) ** 2 * dx0


def x0_delta_from_score_delta(dscore: jax.Array, alpha, sigma) -> jax.Array:
  """x0_A - x0_B = (sigma^2 / alpha) (s_A - s_B); e.g. DIDR's reward-score term in x0 units."""
  return bcast(sigma, dscore) ** 2 / bcast(alpha, dscore) * dscore
