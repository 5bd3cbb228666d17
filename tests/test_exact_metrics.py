"""Sanity of the exact benchmark's sample metrics (didr_jax.exact.metrics): exact draws score as
the law they come from and a shifted or reweighted law does not."""

import jax
import numpy as np
import pytest

from didr_jax import exact as ex

N = 2000


@pytest.mark.parametrize("case", ["ring_2d", "random_16d"])
def test_distances_separate_same_law_from_shifted_law(case):
  """Two independent exact samples of one law: energy distance within 0.01 of 0 (its U-statistic
  has mean 0; SD ~0.002 at n = 2000) and sliced W2 below 0.2 (its finite-n floor); against the
  law with every mean moved by 0.5 per coordinate, energy > 0.04 and sliced W2 > 0.3."""
  mix = ex.ring_2d() if case == "ring_2d" else ex.random_mixture(dim=16)
  moved = ex.GaussianMixture.create(mix.weights, mix.means + 0.5, mix.covs)
  x = ex.sample(mix, jax.random.key(0), N)
  y = ex.sample(mix, jax.random.key(1), N)
  z = ex.sample(moved, jax.random.key(2), N)
  assert abs(float(ex.energy_distance(x, y))) < 0.01
  assert float(ex.energy_distance(x, z)) > 0.04
  assert float(ex.sliced_wasserstein(x, y)) < 0.2
  assert float(ex.sliced_wasserstein(x, z)) > 0.3
  np.testing.assert_allclose(float(ex.sliced_wasserstein(x, x)), 0.0, atol=1e-6)


def test_component_errors_exact_versus_wrong_law():
  """Exact draws recover the weights (TV < 0.05), means (weighted error < 0.07) and covariances
  (relative Frobenius < 0.15) of their mixture, the hard mode fractions sum to one and match the
  weights within 0.05; against a linearly tilted law the weights are far off (TV > 0.4); with a
  prompt only its components receive mass."""
  mix = ex.ring_2d(num_prompts=2)
  x = ex.sample(mix, jax.random.key(3), N)
  err = ex.component_errors(x, mix)
  assert err["weight_tv"] < 0.05 and err["mean_error"] < 0.07 and err["cov_error"] < 0.15
  np.testing.assert_allclose(err["mode_weights"].sum(), 1.0, atol=1e-6)
  np.testing.assert_allclose(err["mode_weights"], mix.weights, atol=0.05)
  assert ex.component_errors(x, ex.tilt_linear(mix, [1.0, 0.0], 1.0))["weight_tv"] > 0.4
  xp = ex.sample(mix, jax.random.key(4), N, prompt=1)
  errp = ex.component_errors(xp, mix, prompt=1)
  assert errp["weight_tv"] < 0.05 and errp["mean_error"] < 0.07
  assert np.all(errp["mode_weights"][::2] == 0) and errp["mode_weights"][1::2].min() > 0.1


def test_evaluate_box_target_and_base():
  """``evaluate`` on exact draws of a box-tilted target: near the target (energy < 0.01, weight
  TV < 0.05) and far from the base (energy > 0.1, weight TV > 0.2); the mean reward is within 4
  binomial SE of the exact one and well above the base's."""
  mix = ex.ring_2d()
  box = ex.BoxTilt.create(mix, [1.5, -1.0], [4.0, 1.2], 0.5)
  x = box.sample(jax.random.key(5), N)
  out = ex.evaluate(x, {"target": box, "base": mix}, jax.random.key(6), reward=box.reward,
                    num_reference=N)
  assert abs(out["target/energy"]) < 0.01 and out["target/weight_tv"] < 0.05
  assert out["base/energy"] > 0.1 and out["base/weight_tv"] > 0.2
  p = box.mean_reward()
  assert abs(out["reward"] - p) < 4 * np.sqrt(p * (1 - p) / N)
  assert out["base/reward"] < 0.5 * p
  assert {"base/mean_error", "base/cov_error"} <= set(out) and "target/mean_error" not in out
