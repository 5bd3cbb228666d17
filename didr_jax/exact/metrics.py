"""Metrics of samples against an exactly known law (a ``GaussianMixture`` or a ``BoxTilt``).

- Component statistics by soft responsibilities r_k(x) under the law's mixture. They are unbiased
  for exact samples, because r_k(x) p(x) = w_k N_k(x): E_p[r_k] = w_k, E_p[r_k x] / w_k = m_k,
  E_p[r_k (x - m_k)(x - m_k)^T] / w_k = S_k. ``mode_weights`` are the hard fractions (each sample
  to its most responsible component), the readable mode-coverage figure.
- Distances: sliced 2-Wasserstein over fixed random directions (``sliced_wasserstein``; positive
  at finite n even between two exact samples) and the energy distance with U-statistics
  (``energy_distance``; mean zero between two samples of one law).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.exact.mixture import GaussianMixture, component_log_weights, responsibilities, sample
from didr_jax.exact.tilt import BoxTilt


@jax.jit
def component_stats(x, mix: GaussianMixture, prompt=None) -> dict:
  """Soft ``weights`` (K,), ``means`` (K, D), ``covs`` (K, D, D) and hard ``mode_weights`` (K,)
  of samples x (n, D) under ``mix``'s responsibilities (``prompt`` an int or None)."""
  x = jnp.asarray(x)
  p = None if prompt is None else jnp.full((x.shape[0],), prompt, jnp.int32)
  r = responsibilities(mix, x, prompt=p)
  mass = jnp.sum(r, axis=0)
  safe = jnp.maximum(mass, 1e-12)
  means = (r.T @ x) / safe[:, None]
  dev = x[:, None, :] - means[None]
  covs = jnp.einsum("nk,nki,nkj->kij", r, dev, dev) / safe[:, None, None]
  hard = jnp.bincount(jnp.argmax(r, axis=-1), length=mix.num_components) / x.shape[0]
  return dict(weights=mass / x.shape[0], means=means, covs=covs, mode_weights=hard)


def _weights(law, prompt=None) -> np.ndarray:
  if isinstance(law, BoxTilt):
    return law.component_weights(prompt)
  return np.exp(np.asarray(component_log_weights(
      law, None if prompt is None else np.array([prompt])), np.float64).reshape(-1))


def component_errors(x, law, prompt=None) -> dict:
  """Against a law's exact components: ``weight_tv`` = 0.5 sum |w_hat - w| (soft weights),
  ``mode_weights`` (hard fractions, reported as they are); for a mixture also ``mean_error`` =
  sum_k w_k ||m_hat_k - m_k|| and ``cov_error`` = sum_k w_k ||S_hat_k - S_k||_F / ||S_k||_F."""
  mix = law.ref if isinstance(law, BoxTilt) else law
  st = {k: np.asarray(v, np.float64) for k, v in component_stats(x, mix, prompt).items()}
  w = _weights(law, prompt)
  out = dict(weight_tv=0.5 * float(np.sum(np.abs(st["weights"] - w))),
             mode_weights=st["mode_weights"])
  if not isinstance(law, BoxTilt):
    out["mean_error"] = float(np.sum(w * np.linalg.norm(st["means"] - law.means, axis=-1)))
    out["cov_error"] = float(np.sum(w * np.linalg.norm(st["covs"] - law.covs, axis=(1, 2))
                                    / np.linalg.norm(law.covs, axis=(1, 2))))
  return out


@functools.partial(jax.jit, static_argnames=("num_projections", "seed"))
def sliced_wasserstein(x, y, num_projections: int = 128, seed: int = 0) -> jax.Array:
  """sqrt(mean over directions u of W2^2(u.x, u.y)), directions fixed by ``seed``; the 1-D W2
  compares quantiles at (i + 0.5) / m, m = min(n_x, n_y)."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  u = np.random.default_rng(seed).standard_normal((x.shape[1], num_projections))
  u = jnp.asarray(u / np.linalg.norm(u, axis=0), x.dtype)
  m = min(x.shape[0], y.shape[0])
  levels = (jnp.arange(m, dtype=x.dtype) + 0.5) / m
  qx = jnp.quantile(x @ u, levels, axis=0)
  qy = jnp.quantile(y @ u, levels, axis=0)
  return jnp.sqrt(jnp.mean((qx - qy) ** 2))


def _mean_distance(a, b, exclude_diagonal: bool) -> jax.Array:
  d2 = jnp.sum(a ** 2, -1)[:, None] + jnp.sum(b ** 2, -1)[None] - 2 * a @ b.T
  d = jnp.sqrt(jnp.maximum(d2, 0.0))
  if exclude_diagonal:
    n = a.shape[0]
    return (jnp.sum(d) - jnp.sum(jnp.diag(d))) / (n * (n - 1))
  return jnp.mean(d)


@jax.jit
def energy_distance(x, y) -> jax.Array:
  """2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics for the within-sample terms)."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  return (2 * _mean_distance(x, y, False) - _mean_distance(x, x, True)
          - _mean_distance(y, y, True))


def sample_law(law, rng, n: int, prompt=None, dtype=jnp.float32) -> jax.Array:
  """Exact draws from a ``GaussianMixture`` or a ``BoxTilt``."""
  if isinstance(law, BoxTilt):
    return law.sample(rng, n, prompt, dtype)
  return sample(law, rng, n, prompt, dtype)


def evaluate(x, laws: dict, rng, reward=None, prompt=None, num_reference: int = 4096) -> dict:
  """Metrics of samples x (n, D) against each named exact law (e.g. {"target": tilted, "base":
  ref}): per law ``sliced_w2`` and ``energy`` against ``num_reference`` exact draws, plus
  ``component_errors``; with ``reward`` also ``reward`` = mean r(x) and per law the exact-sample
  ``<name>/reward``. Keys "<name>/<metric>"."""
  x = jnp.asarray(x)
  out = {}
  if reward is not None:
    out["reward"] = float(jnp.mean(reward(x)))
  for i, (name, law) in enumerate(laws.items()):
    ref = sample_law(law, jax.random.fold_in(rng, i), num_reference, prompt, x.dtype)
    out[f"{name}/sliced_w2"] = float(sliced_wasserstein(x, ref))
    out[f"{name}/energy"] = float(energy_distance(x, ref))
    for key, value in component_errors(x, law, prompt).items():
      out[f"{name}/{key}"] = value
    if reward is not None:
      out[f"{name}/reward"] = float(jnp.mean(reward(ref)))
  return out
