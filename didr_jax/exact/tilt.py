"""Reward-tilted optima p*(x) = p_ref(x) e^{r(x)/beta} / Z of a Gaussian mixture, exactly.

- Linear r = b.x: component k becomes N(m_k + S_k b / beta, S_k) with log-weight
  log w_k + b.m_k / beta + b.S_k b / (2 beta^2), renormalised (``tilt_linear``).
- Quadratic r = -0.5 (x - c)^T Q (x - c), Q symmetric PSD (may be singular): with A = Q / beta,
  P'_k = S_k^-1 + A, S'_k = P'_k^-1, h_k = S_k^-1 m_k + A c, m'_k = S'_k h_k and
  log Z_k = 0.5 (log|S'_k| - log|S_k|) - 0.5 (m_k^T S_k^-1 m_k + c^T A c - h_k^T S'_k h_k)
  (completing the square), log w'_k = log w_k + log Z_k renormalised (``tilt_quadratic``).
- Box r = 1[lo <= x <= hi] (not differentiable): p* = p_ref (1 + (e^{1/beta} - 1) 1_box) / Z is
  not a mixture; it is sampled exactly by rejection from p_ref with acceptance e^{(r - 1)/beta}
  (the tilt is bounded by e^{1/beta}), and its component weights and mean reward are exact given
  the per-component box probabilities (``BoxTilt``).

The Diffused Reward Score of a closed-form tilt is s_r(x_t) = grad log E_ref[e^{r/beta} | x_t]
= (alpha / sigma^2)(E*[x0 | x_t] - E_ref[x0 | x_t]) (``exact_drs``), since p*_t = p_ref,t h_t / Z.
Prompts: tilting acts per component, so the prompt masks carry over unchanged (the conditional
tilted law is the tilt of the conditional law).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import param
from didr_jax.exact.mixture import GaussianMixture, component_log_weights, posterior_mean, sample


def _renormalised(mix: GaussianMixture, log_weights, means, covs) -> GaussianMixture:
  return GaussianMixture.create(np.exp(log_weights - log_weights.max()), means, covs,
                                mix.prompt_masks if mix.num_prompts else None)


def tilt_linear(mix: GaussianMixture, b, beta: float) -> GaussianMixture:
  """p_ref e^{b.x / beta} / Z (see module docstring)."""
  b = np.asarray(b, np.float64)
  sb = mix.covs @ b                                            # (K, D)
  logw = mix.log_weights + mix.means @ b / beta + 0.5 * (sb @ b) / beta ** 2
  return _renormalised(mix, logw, mix.means + sb / beta, mix.covs)


def tilt_quadratic(mix: GaussianMixture, q, c, beta: float) -> GaussianMixture:
  """p_ref e^{-0.5 (x - c)^T Q (x - c) / beta} / Z (see module docstring)."""
  a = np.asarray(q, np.float64) / beta
  a = 0.5 * (a + a.T)
  c = np.asarray(c, np.float64)
  prec = np.linalg.inv(mix.covs)
  new_covs = np.linalg.inv(prec + a)
  h = np.einsum("kij,kj->ki", prec, mix.means) + a @ c
  new_means = np.einsum("kij,kj->ki", new_covs, h)
  log_z = 0.5 * (np.linalg.slogdet(new_covs)[1] - np.linalg.slogdet(mix.covs)[1]) - 0.5 * (
      np.einsum("ki,ki->k", mix.means, np.einsum("kij,kj->ki", prec, mix.means)) + c @ a @ c
      - np.einsum("ki,ki->k", h, new_means))
  return _renormalised(mix, mix.log_weights + log_z, new_means, new_covs)


def exact_drs(ref: GaussianMixture, tilted: GaussianMixture, x_t, alpha, sigma,
              prompt=None) -> jax.Array:
  """s_r(x_t) = grad log h_t(x_t) = (alpha / sigma^2)(E*[x0 | x_t] - E_ref[x0 | x_t]) (B, D)."""
  dx0 = posterior_mean(tilted, x_t, alpha, sigma, prompt) - posterior_mean(ref, x_t, alpha, sigma,
                                                                           prompt)
  return param.score_delta_from_x0_delta(dx0, jnp.asarray(alpha, dx0.dtype),
                                         jnp.asarray(sigma, dx0.dtype))


def linear_reward(b):
  """r(x) = b.x on (B, D) -> (B,)."""
  b = jnp.asarray(b)
  return lambda x: x @ b.astype(x.dtype)


def quadratic_reward(q, c):
  """r(x) = -0.5 (x - c)^T Q (x - c) on (B, D) -> (B,)."""
  q, c = jnp.asarray(q), jnp.asarray(c)
  return lambda x: -0.5 * jnp.einsum("bi,ij,bj->b", x - c.astype(x.dtype), q.astype(x.dtype),
                                     x - c.astype(x.dtype))


def box_reward(lo, hi):
  """r(x) = 1 if lo <= x <= hi in every coordinate, else 0 (B,)."""
  lo, hi = jnp.asarray(lo), jnp.asarray(hi)
  return lambda x: jnp.all((x >= lo.astype(x.dtype)) & (x <= hi.astype(x.dtype)),
                           axis=-1).astype(x.dtype)


def _box_probability(mean, cov, lo, hi) -> float:
  """P(lo <= X <= hi) for X ~ N(mean, cov): SciPy's multivariate normal CDF with a lower limit
  (Genz's quasi-Monte Carlo integration, absolute error ~1e-5 by default; meant for small D)."""
  import scipy.stats
  return float(scipy.stats.multivariate_normal(mean, cov).cdf(hi, lower_limit=lo))


@dataclasses.dataclass(frozen=True)
class BoxTilt:
  """p* = p_ref (1 + (e^{1/beta} - 1) 1_box) / Z for r = 1[lo <= x <= hi]. ``box_probs`` (K,):
  P_k(box) per reference component (SciPy's normal CDF; use small D, e.g. 2)."""
  ref: GaussianMixture
  lo: np.ndarray
  hi: np.ndarray
  beta: float
  box_probs: np.ndarray

  @classmethod
  def create(cls, ref: GaussianMixture, lo, hi, beta: float) -> "BoxTilt":
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    probs = np.array([_box_probability(m, s, lo, hi) for m, s in zip(ref.means, ref.covs)])
    return cls(ref, lo, hi, float(beta), probs)

  @property
  def reward(self):
    return box_reward(self.lo, self.hi)

  def component_weights(self, prompt: int | None = None) -> np.ndarray:
    """Exact p*(component k) = w_k (1 + (e^{1/beta} - 1) P_k(box)) / Z (K,)."""
    w = np.exp(np.asarray(component_log_weights(self.ref, None if prompt is None else
                                                np.array([prompt]))).reshape(-1)).astype(
                                                    np.float64)
    w = w * (1.0 + np.expm1(1.0 / self.beta) * self.box_probs)
    return w / w.sum()

  def mean_reward(self, prompt: int | None = None) -> float:
    """Exact E*[r] = P*(box) = sum_k p*(k) e^{1/beta} P_k / (1 + (e^{1/beta} - 1) P_k)."""
    c = np.exp(1.0 / self.beta)
    return float(np.sum(self.component_weights(prompt) * c * self.box_probs
                        / (1.0 + (c - 1.0) * self.box_probs)))

  def sample(self, rng: jax.Array, n: int, prompt: int | None = None, dtype=jnp.float32,
             max_rounds: int = 256) -> jax.Array:
    """n exact draws (one prompt or none) by rejection from p_ref with acceptance
    e^{(r - 1)/beta}: a host-side loop over fixed-size (n) jitted proposal rounds."""
    out, have = [], 0
    for i in range(max_rounds):
      x, accept = _propose(self.ref, jax.random.fold_in(rng, i), n, prompt, self.lo, self.hi,
                           self.beta, dtype)
      out.append(np.asarray(x)[np.asarray(accept)])
      have += out[-1].shape[0]
      if have >= n:
        return jnp.asarray(np.concatenate(out)[:n])
    raise RuntimeError(f"rejection sampling got {have} of {n} draws in {max_rounds} rounds")


@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def _propose(ref, rng, n, prompt, lo, hi, beta, dtype):
  r_rng, u_rng = jax.random.split(rng)
  x = sample(ref, r_rng, n, prompt, dtype)
  accept = jax.random.uniform(u_rng, (n,), dtype) < jnp.exp((box_reward(lo, hi)(x) - 1.0) / beta)
  return x, accept
