"""The exact benchmark's closed forms (didr_jax.exact) against independent float64 references:
NumPy Monte Carlo (self-normalised importance sampling over draws of the data) and, in 2-D, grid
quadrature of p(x0 | x_t) built from the data density alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax import exact as ex
from didr_jax.diffusion import kernels, param
from didr_jax.diffusion.schedules import VPSchedule

SCHEDULE = VPSchedule.from_diffusers(dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                          beta_end=0.012))


def _numpy_draws(mix, n, seed, prompt=None):
  """Draws from the mixture by NumPy with Cholesky factors (not the module's eigen sampler)."""
  r = np.random.default_rng(seed)
  w = mix.weights if prompt is None else mix.weights * mix.prompt_masks[prompt]
  k = r.choice(mix.num_components, size=n, p=w / w.sum())
  x = r.standard_normal((n, mix.dim))
  for j, chol in enumerate(np.linalg.cholesky(mix.covs)):
    x[k == j] = mix.means[j] + x[k == j] @ chol.T
  return x


def _snis_posterior_mean(x0, x_t, alpha, sigma):
  """E[x0 | x_t] by self-normalised importance sampling of prior draws x0 (n, D), weights
  N(x_t; alpha x0, sigma^2 I); returns (estimate (D,), standard error (D,), ESS)."""
  logw = -0.5 * np.sum((x_t - alpha * x0) ** 2, axis=1) / sigma ** 2
  w = np.exp(logw - logw.max())
  w /= w.sum()
  mean = w @ x0
  se = np.sqrt(w ** 2 @ (x0 - mean) ** 2)
  return mean, se, 1.0 / np.sum(w ** 2)


def _alpha_sigma_points():
  vp = [tuple(float(v) for v in kernels.vp_alpha_sigma(SCHEDULE, t)) for t in (50, 400, 900)]
  flow = [tuple(float(v) for v in kernels.flow_alpha_sigma(s)) for s in (0.2, 0.6, 0.95)]
  return vp + flow


@pytest.mark.parametrize("case", ["ring_2d", "random_16d_prompt"])
def test_posterior_mean_matches_float64_monte_carlo(case):
  """The closed form E[x0 | x_t] agrees with SNIS over 200k prior draws within 5 standard errors
  (plus 1e-3 for the SE's own noise), at VP and flow times, on x_t drawn from the joint; the
  16-D case is prompt-conditional. ESS is asserted so a degenerate estimate cannot pass."""
  if case == "ring_2d":
    mix, prompt, points = ex.ring_2d(), None, _alpha_sigma_points()
  else:
    mix, prompt = ex.random_mixture(dim=16), 1
    points = [p for p in _alpha_sigma_points() if p[1] >= 0.55]  # SNIS needs overlap in 16-D
  x0 = _numpy_draws(mix, 200_000, seed=1, prompt=prompt)
  r = np.random.default_rng(2)
  with jax.enable_x64(True):
    for alpha, sigma in points:
      x_t = alpha * x0[:3] + sigma * r.standard_normal((3, mix.dim))
      p = None if prompt is None else jnp.full((3,), prompt)
      exact = np.asarray(ex.posterior_mean(mix, jnp.asarray(x_t), alpha, sigma, p))
      assert exact.dtype == np.float64
      for i in range(3):
        mc, se, ess = _snis_posterior_mean(x0, x_t[i], alpha, sigma)
        assert ess > 200, (alpha, sigma, ess)
        np.testing.assert_array_less(np.abs(exact[i] - mc), 5 * se + 1e-3)


def test_posterior_mean_matches_2d_quadrature_and_tweedie():
  """2-D: E[x0 | x_t] equals a 400^2-point grid quadrature of p(x0) N(x_t; alpha x0, sigma^2)
  (1e-6), and the score alpha E[x0|x_t] - x_t over sigma^2 is grad log p_t (autodiff of
  ``noisy_log_prob``), with per-sample (alpha, sigma) arrays."""
  mix = ex.ring_2d()
  g = np.linspace(-7.0, 7.0, 400)
  grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
  with jax.enable_x64(True):
    log_p = np.asarray(ex.log_prob(mix, jnp.asarray(grid)))
    pts = np.array([[0.3, -2.5], [2.0, 2.0], [-0.5, 0.1], [2.9, 0.2]])
    alpha = np.array([0.9, 0.5, 0.3, 0.97])
    sigma = np.sqrt(1 - alpha ** 2)
    exact = np.asarray(ex.posterior_mean(mix, jnp.asarray(pts), alpha, sigma))
    for i in range(len(pts)):
      lw = log_p - 0.5 * np.sum((pts[i] - alpha[i] * grid) ** 2, 1) / sigma[i] ** 2
      w = np.exp(lw - lw.max())
      np.testing.assert_allclose(exact[i], w @ grid / w.sum(), atol=1e-6)
    score = jax.vmap(jax.grad(lambda x, a, s: ex.noisy_log_prob(mix, x[None], a, s)[0]))(
        jnp.asarray(pts), jnp.asarray(alpha), jnp.asarray(sigma))
    np.testing.assert_allclose(
        score, param.score_from_x0(jnp.asarray(pts), jnp.asarray(exact), alpha, sigma),
        rtol=1e-9, atol=1e-9)


def test_denoise_prediction_types_prompts_and_cfg():
  """Every prediction type maps back (param.to_x0) to the posterior mean; a prompt's mean uses
  only its components (equal to a mixture built from them alone); CFG scale 1 is the conditional
  output, scale 0 the unconditional one, and scale 3 their extrapolation."""
  mix = ex.ring_2d(num_prompts=2)
  sub = ex.GaussianMixture.create(mix.weights[::2], mix.means[::2], mix.covs[::2])
  x_t = ex.sample(mix, jax.random.key(0), 6) * 0.8
  pr = jnp.zeros((6,), jnp.int32)
  with jax.enable_x64(True):
    x_t = jnp.asarray(x_t, jnp.float64)
    for alpha, sigma in _alpha_sigma_points()[:2]:
      x0 = ex.posterior_mean(mix, x_t, alpha, sigma, pr)
      np.testing.assert_allclose(x0, ex.posterior_mean(sub, x_t, alpha, sigma), atol=1e-12)
      types = ("epsilon", "v_prediction", "sample")
      for ptype in types:
        out = ex.denoise(mix, x_t, alpha, sigma, ptype, pr)
        np.testing.assert_allclose(param.to_x0(out, x_t, alpha, sigma, ptype), x0, atol=1e-12)
      cond = ex.denoise(mix, x_t, alpha, sigma, "epsilon", pr)
      unc = ex.denoise(mix, x_t, alpha, sigma, "epsilon")
      np.testing.assert_allclose(ex.denoise(mix, x_t, alpha, sigma, "epsilon", pr, 1.0), cond)
      np.testing.assert_allclose(ex.denoise(mix, x_t, alpha, sigma, "epsilon", pr, 0.0), unc)
      np.testing.assert_allclose(ex.denoise(mix, x_t, alpha, sigma, "epsilon", pr, 3.0),
                                 unc + 3.0 * (cond - unc), atol=1e-12)
      assert float(jnp.max(jnp.abs(cond - unc))) > 1e-3
    a, s = kernels.flow_alpha_sigma(0.4)
    v = ex.denoise(mix, x_t, a, s, "flow")
    np.testing.assert_allclose(param.to_x0(v, x_t, a, s, "flow"),
                               ex.posterior_mean(mix, x_t, a, s), atol=1e-12)


def _snis_tilt_moments(x, logw, tilted):
  """SNIS estimates under weights e^{logw} of E[x], E[x x^T] and the tilted mixture's
  responsibilities (which average to its weights exactly when it is the right law), with SEs."""
  w = np.exp(logw - logw.max())
  w /= w.sum()
  with jax.enable_x64(True):
    resp = np.asarray(ex.responsibilities(tilted, jnp.asarray(x)))
  iu = np.triu_indices(x.shape[1])
  feats = np.concatenate([x, (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]], resp], axis=1)
  est = w @ feats
  se = np.sqrt(w ** 2 @ (feats - est) ** 2)
  second = np.einsum("k,kij->ij", tilted.weights,
                     tilted.covs + np.einsum("ki,kj->kij", tilted.means, tilted.means))
  exact = np.concatenate([tilted.weights @ tilted.means, second[iu], tilted.weights])
  return est, se, exact


@pytest.mark.parametrize("case", ["linear_2d", "quadratic_2d_singular", "linear_16d",
                                  "quadratic_16d"])
def test_tilted_mixture_matches_importance_weighted_base(case):
  """p_ref e^{r/beta}/Z in closed form against the base's draws weighted by e^{r/beta}:
  mean, second moments and mixture weights within 5 SE + 1e-3 (100k draws; ESS asserted)."""
  beta = 0.7
  if case.endswith("2d"):
    mix = ex.ring_2d()
  else:
    mix = ex.random_mixture(dim=16)
  d = mix.dim
  r = np.random.default_rng(3)
  if case.startswith("linear"):
    b = r.standard_normal(d) * (0.6 if d == 2 else 0.2)
    tilted = ex.tilt_linear(mix, b, beta)
    reward = ex.linear_reward(b)
  else:
    q = np.diag([1.0, 0.0]) if d == 2 else np.eye(d) * 0.05
    c = np.full(d, 1.5)
    tilted = ex.tilt_quadratic(mix, q, c, beta)
    reward = ex.quadratic_reward(q, c)
  x = _numpy_draws(mix, 100_000, seed=4)
  with jax.enable_x64(True):
    logw = np.asarray(reward(jnp.asarray(x))) / beta
  est, se, exact = _snis_tilt_moments(x, logw, tilted)
  w = np.exp(logw - logw.max())
  assert np.sum(w) ** 2 / np.sum(w ** 2) > 1000              # effective sample size
  np.testing.assert_array_less(np.abs(est - exact), 5 * se + 1e-3)
  assert np.abs(tilted.weights - mix.weights).max() > 0.02   # the tilt moved the weights


def test_box_tilt_weights_reward_and_rejection_sampler():
  """The box-indicator tilt: exact component weights and mean reward against SNIS of 100k base
  draws (5 SE), and the rejection sampler's mean reward within 4 binomial SE of the exact one."""
  mix, beta = ex.ring_2d(), 0.5
  box = ex.BoxTilt.create(mix, [1.5, -1.0], [4.0, 1.2], beta)
  x = _numpy_draws(mix, 100_000, seed=5)
  with jax.enable_x64(True):
    rew = np.asarray(box.reward(jnp.asarray(x)))
    resp = np.asarray(ex.responsibilities(mix, jnp.asarray(x)))
  w = np.exp(rew / beta)
  w /= w.sum()
  feats = np.concatenate([rew[:, None], resp], axis=1)
  est = w @ feats
  se = np.sqrt(w ** 2 @ (feats - est) ** 2)
  exact = np.concatenate([[box.mean_reward()], box.component_weights()])
  np.testing.assert_array_less(np.abs(est - exact), 5 * se + 2e-4)
  draws = box.sample(jax.random.key(6), 4000)
  p = box.mean_reward()
  assert abs(float(jnp.mean(box.reward(draws))) - p) < 4 * np.sqrt(p * (1 - p) / 4000)
  assert p > 3 * float(np.mean(rew))                         # the tilt is not a no-op


@pytest.mark.parametrize("kind", ["linear", "quadratic"])
def test_exact_drs_matches_finite_differences_of_log_h(kind):
  """s_r(x_t) = (alpha/sigma^2)(E*[x0|x_t] - E[x0|x_t]) against central differences (step 1e-4)
  of log h_t(x_t) = log E[e^{r(x0)/beta} | x_t], the expectation by 400^2-point grid quadrature
  of p(x0) N(x_t; alpha x0, sigma^2) (2-D, float64), at VP and flow times."""
  mix, beta = ex.ring_2d(), 0.8
  if kind == "linear":
    b = np.array([0.7, -0.4])
    tilted, reward = ex.tilt_linear(mix, b, beta), ex.linear_reward(b)
  else:
    q, c = np.array([[1.0, 0.3], [0.3, 0.5]]), np.array([2.0, 1.0])
    tilted, reward = ex.tilt_quadratic(mix, q, c, beta), ex.quadratic_reward(q, c)
  g = np.linspace(-7.5, 7.5, 400)
  grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
  with jax.enable_x64(True):
    log_p = np.asarray(ex.log_prob(mix, jnp.asarray(grid)))
    r_over_beta = np.asarray(reward(jnp.asarray(grid))) / beta

    def log_h(x_t, alpha, sigma):
      lw = log_p - 0.5 * np.sum((x_t - alpha * grid) ** 2, 1) / sigma ** 2
      top = lw.max()
      return (np.log(np.sum(np.exp(lw + r_over_beta - top - r_over_beta.max())))
              + r_over_beta.max() - np.log(np.sum(np.exp(lw - top))))

    pts = np.array([[0.5, -2.0], [2.2, 1.9], [-1.0, 0.4]])
    for alpha, sigma in [_alpha_sigma_points()[i] for i in (0, 1, 4)]:
      drs = np.asarray(ex.exact_drs(mix, tilted, jnp.asarray(pts), alpha, sigma))
      h = 1e-4
      for i, p in enumerate(pts):
        fd = [(log_h(p + h * e, alpha, sigma) - log_h(p - h * e, alpha, sigma)) / (2 * h)
              for e in np.eye(2)]
        np.testing.assert_allclose(drs[i], fd, rtol=1e-5, atol=1e-6)
      assert np.abs(drs).max() > 0.05
