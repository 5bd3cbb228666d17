"""Gaussian-mixture data with an exact denoiser (the exact benchmark's reference model, issue 27).

p(x0) = sum_k w_k N(x0; m_k, S_k) in D dimensions, optionally conditioned on a prompt: prompt p
keeps the components of ``prompt_masks[p]`` and renormalises their weights (p < 0 or None: the
unconditional mixture, i.e. CFG's null prompt).

Forward process x_t = alpha x0 + sigma eps (VP: ``kernels.vp_alpha_sigma``; flow:
``kernels.flow_alpha_sigma``, alpha = 1 - s, sigma = s). The marginal is again a mixture,

    p_t(x_t) = sum_k w_k N(x_t; alpha m_k, C_k),   C_k = alpha^2 S_k + sigma^2 I,

and the posterior mean is exact:

    E[x0 | x_t] = sum_k r_k(x_t) [m_k + alpha S_k C_k^-1 (x_t - alpha m_k)],
    r_k(x_t) = softmax_k(log w_k + log N(x_t; alpha m_k, C_k)).

Each S_k is stored with its eigendecomposition S_k = U_k diag(lam_k) U_k^T (computed once in
float64), so C_k^-1 = U_k diag(1 / (alpha^2 lam_k + sigma^2)) U_k^T for any (alpha, sigma) without a
per-call factorisation, and the responsibilities are a log-sum-exp. Everything below is jit-able
and works in the dtype of its inputs (float64 under ``jax.experimental.enable_x64``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import guidance, param


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
  """Leaves: ``log_weights`` (K,), ``means`` (K, D), ``covs`` (K, D, D), ``eigvals`` (K, D),
  ``eigvecs`` (K, D, D) (columns), ``prompt_masks`` (P, K) bool (P may be 0). Build with
  ``GaussianMixture.create``; the leaves are float64 NumPy arrays until JAX converts them."""
  log_weights: np.ndarray
  means: np.ndarray
  covs: np.ndarray
  eigvals: np.ndarray
  eigvecs: np.ndarray
  prompt_masks: np.ndarray

  @classmethod
  def create(cls, weights, means, covs, prompt_masks=None) -> "GaussianMixture":
    """weights (K,) positive (normalised here), means (K, D), covs (K, D, D) symmetric positive
    definite; prompt_masks (P, K) bool, each row with at least one component."""
    w = np.asarray(weights, np.float64)
    m = np.asarray(means, np.float64)
    s = np.asarray(covs, np.float64)
    k, d = m.shape
    if w.shape != (k,) or s.shape != (k, d, d) or np.any(w <= 0):
      raise ValueError(f"weights {w.shape} (positive), means {m.shape}, covs {s.shape} disagree")
    s = 0.5 * (s + np.swapaxes(s, 1, 2))
    lam, u = np.linalg.eigh(s)
    if np.any(lam <= 0):
      raise ValueError("covariances must be positive definite")
    masks = (np.ones((0, k), bool) if prompt_masks is None
             else np.asarray(prompt_masks, bool).reshape(-1, k))
    if np.any(~masks.any(axis=1)):
      raise ValueError("every prompt must keep at least one component")
    return cls(np.log(w / w.sum()), m, s, lam, u, masks)

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def num_prompts(self) -> int:
    return self.prompt_masks.shape[0]

  @property
  def weights(self) -> np.ndarray:
    return np.exp(np.asarray(self.log_weights))


jax.tree_util.register_dataclass(
    GaussianMixture,
    data_fields=["log_weights", "means", "covs", "eigvals", "eigvecs", "prompt_masks"],
    meta_fields=[])


def component_log_weights(mix: GaussianMixture, prompt=None) -> jax.Array:
  """Normalised log weights: (K,) for prompt None, else (B,) int prompts -> (B, K); a prompt < 0
  is the unconditional mixture. Components outside a prompt get -inf."""
  logw = jnp.asarray(mix.log_weights)
  if prompt is None:
    return logw
  prompt = jnp.asarray(prompt, jnp.int32)
  if mix.num_prompts == 0:
    return jnp.broadcast_to(logw, prompt.shape + logw.shape)
  keep = jnp.asarray(mix.prompt_masks)[jnp.clip(prompt, 0, mix.num_prompts - 1)]
  keep = keep | (prompt < 0)[..., None]
  logw = jnp.where(keep, logw, -jnp.inf)
  return logw - jax.scipy.special.logsumexp(logw, axis=-1, keepdims=True)


def _projected(mix: GaussianMixture, x_t, alpha, sigma):
  """Per component, in the eigenbasis: z = U_k^T (x_t - alpha m_k) (B, K, D), the variances
  c = alpha^2 lam + sigma^2 (B, K, D) and log N(x_t; alpha m_k, C_k) (B, K)."""
  dtype = x_t.dtype
  a = jnp.broadcast_to(jnp.asarray(alpha, dtype), x_t.shape[:1])[:, None, None]
  s = jnp.broadcast_to(jnp.asarray(sigma, dtype), x_t.shape[:1])[:, None, None]
  means, lam = jnp.asarray(mix.means, dtype), jnp.asarray(mix.eigvals, dtype)
  u = jnp.asarray(mix.eigvecs, dtype)
  z = jnp.einsum("kde,bkd->bke", u, x_t[:, None, :] - a * means[None])
  c = a ** 2 * lam[None] + s ** 2
  log_n = -0.5 * jnp.sum(z ** 2 / c + jnp.log(c), axis=-1) - 0.5 * mix.dim * math.log(2 * math.pi)
  return z, c, a, lam, u, means, log_n


@jax.jit
def noisy_log_prob(mix: GaussianMixture, x_t, alpha, sigma, prompt=None) -> jax.Array:
  """log p_t(x_t) (B,) of the diffused mixture (alpha = 1, sigma = 0: log p(x0))."""
  x_t = jnp.asarray(x_t)
  log_n = _projected(mix, x_t, alpha, sigma)[-1]
  logw = component_log_weights(mix, prompt).astype(x_t.dtype)
  return jax.scipy.special.logsumexp(logw + log_n, axis=-1)


def log_prob(mix: GaussianMixture, x, prompt=None) -> jax.Array:
  """log p(x) (B,)."""
  return noisy_log_prob(mix, x, 1.0, 0.0, prompt)


@jax.jit
def responsibilities(mix: GaussianMixture, x_t, alpha=1.0, sigma=0.0, prompt=None) -> jax.Array:
  """r_k(x_t) = p(component k | x_t) (B, K); alpha = 1, sigma = 0 gives them for clean x."""
  x_t = jnp.asarray(x_t)
  log_n = _projected(mix, x_t, alpha, sigma)[-1]
  logw = component_log_weights(mix, prompt).astype(x_t.dtype)
  return jax.nn.softmax(logw + log_n, axis=-1)


@jax.jit
def posterior_mean(mix: GaussianMixture, x_t, alpha, sigma, prompt=None) -> jax.Array:
  """E[x0 | x_t] (B, D) for x_t = alpha x0 + sigma eps; alpha, sigma scalars or (B,)."""
  x_t = jnp.asarray(x_t)
  z, c, a, lam, u, means, log_n = _projected(mix, x_t, alpha, sigma)
  logw = component_log_weights(mix, prompt).astype(x_t.dtype)
  r = jax.nn.softmax(logw + log_n, axis=-1)
  # m_k + alpha S_k C_k^-1 (x_t - alpha m_k) = m_k + U_k (alpha lam / c * z)
  per_k = means[None] + jnp.einsum("kde,bke->bkd", u, a * lam[None] / c * z)
  return jnp.einsum("bk,bkd->bd", r, per_k)


def denoise(mix: GaussianMixture, x_t, alpha, sigma, prediction_type: str, prompt=None,
            guidance_scale=None) -> jax.Array:
  """The exact model output in ``prediction_type`` ("epsilon", "v_prediction", "sample",
  "flow"; see ``param``). With ``guidance_scale`` w: CFG between the prompt-conditional and the
  unconditional mixture, uncond + w (cond - uncond), in output space as the pipelines do."""
  x_t = jnp.asarray(x_t)
  out = param.x0_to_output(posterior_mean(mix, x_t, alpha, sigma, prompt), x_t, alpha, sigma,
                           prediction_type)
  if guidance_scale is None:
    return out
  uncond = param.x0_to_output(posterior_mean(mix, x_t, alpha, sigma, None), x_t, alpha, sigma,
                              prediction_type)
  return guidance.cfg(uncond, out, guidance_scale)


@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def sample(mix: GaussianMixture, rng: jax.Array, n: int, prompt=None,
           dtype=jnp.float32) -> jax.Array:
  """n exact draws (n, D): a component by its (prompt-conditional) weight, then m_k + U_k
  sqrt(lam_k) xi. ``prompt`` None, an int, or (n,) ints. Jitted (n and dtype static)."""
  k_rng, x_rng = jax.random.split(rng)
  if prompt is not None:
    prompt = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (n,))
  logw = jnp.broadcast_to(component_log_weights(mix, prompt), (n, mix.num_components))
  k = jax.random.categorical(k_rng, logw.astype(dtype), axis=-1)
  xi = jax.random.normal(x_rng, (n, mix.dim), dtype)
  u = jnp.asarray(mix.eigvecs, dtype)[k]
  scale = jnp.sqrt(jnp.asarray(mix.eigvals, dtype))[k]
  return jnp.asarray(mix.means, dtype)[k] + jnp.einsum("bde,be->bd", u, scale * xi)


# ------------------------------------------------------------------------------------ presets

def ring_2d(num_prompts: int = 2) -> GaussianMixture:
  """Eight components on a ring of radius 3 with random-ish full covariances, unequal weights;
  prompt p keeps the components k with k % num_prompts == p (num_prompts 0: no prompts)."""
  k = 8
  ang = 2 * np.pi * np.arange(k) / k
  means = 3.0 * np.stack([np.cos(ang), np.sin(ang)], axis=1)
  cos, sin = np.cos(ang), np.sin(ang)
  rot = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], axis=1)  # (K, 2, 2)
  scales = np.stack([0.45 + 0.1 * (np.arange(k) % 3), np.full(k, 0.2)], axis=1)
  covs = np.einsum("kij,kj,klj->kil", rot, scales ** 2, rot)
  weights = 1.0 + 0.5 * (np.arange(k) % 3)
  masks = None if num_prompts == 0 else np.arange(k)[None] % num_prompts == np.arange(
      num_prompts)[:, None]
  return GaussianMixture.create(weights, means, covs, masks)


def random_mixture(dim: int = 16, num_components: int = 6, num_prompts: int = 2,
                   seed: int = 0) -> GaussianMixture:
  """A fixed random mixture in ``dim`` dimensions: means ~ N(0, 2^2 I), S_k = A A^T / dim +
  0.05 I with A ~ N(0, 0.5^2) (full, anisotropic), weights ~ Uniform[1, 2]; prompt p keeps the
  components k % num_prompts == p."""
  r = np.random.default_rng(seed)
  means = 2.0 * r.standard_normal((num_components, dim))
  a = 0.5 * r.standard_normal((num_components, dim, dim))
  covs = np.einsum("kij,klj->kil", a, a) / dim + 0.05 * np.eye(dim)
  weights = r.uniform(1.0, 2.0, num_components)
  masks = None if num_prompts == 0 else np.arange(num_components)[None] % num_prompts == \
      np.arange(num_prompts)[:, None]
  return GaussianMixture.create(weights, means, covs, masks)
