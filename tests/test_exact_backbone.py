"""The exact benchmark's backbone (didr_jax.exact.backbone) against the exact mixture: at
initialisation the trainable network is the exact denoiser, the project's own samplers driven by
it reproduce the data law, and the registered rewards are the closed-form ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax import exact as ex, rewards
from didr_jax.exact import backbone as eb
from didr_jax.train import common


@pytest.mark.parametrize("kind", ["exact_ring2d", "exact_ring2d_flow"])
def test_initial_network_is_exact_and_its_sampler_reproduces_the_data(kind):
  """The residual MLP starts at zero: denoise (with CFG 2 against the unconditional mixture)
  equals ``exact.denoise`` to float32 rounding, and its parameters are only the MLP's; the
  backbone's rollout (VP: DDIM eta 1, 40 steps; flow: Euler ODE, 40 steps) from prompt 1 lands
  on prompt 1's mixture: energy distance to exact draws < 0.01 (2000 samples; a moved law
  scores > 0.04 in test_exact_metrics) and no mass on the other prompt's components."""
  bb = eb.build(kind)
  net = common.Net.of(bb.model)
  assert set(net.params) == {"hidden1", "hidden2", "head"}
  model = net.bind(net.params)
  x = jax.random.normal(jax.random.key(0), bb.latent_shape(4)) * 2
  t = jnp.array([10, 300, 600, 900]) if bb.family == "vp" else jnp.array([0.1, 0.3, 0.6, 0.95])
  cond = bb.encode(["group 0", "group 1", "", "group 1"])
  np.testing.assert_array_equal(cond, [0, 1, -1, 1])
  out = jax.jit(lambda m: bb.denoise(m, x, t, cond, bb.negative(1), 2.0))(model)
  a, s = bb.alpha_sigma(t)
  ref = ex.denoise(bb.mixture, x.reshape(4, -1), a, s, bb.prediction_type, cond, 2.0)
  np.testing.assert_allclose(out.reshape(4, -1), ref, rtol=1e-5, atol=1e-5)

  n = 2000
  cond = bb.encode(["group 1"] * n)
  z = jax.random.normal(jax.random.key(1), bb.latent_shape(n))
  traj = bb.rollout(lambda x, t: bb.denoise(model, x, t, cond, None, 1.0), z, num_steps=40,
                    eta=1.0 if bb.family == "vp" else 0.0, rng=jax.random.key(2))
  pts = eb.points(bb.decode(bb.frozen(), traj.sample))
  assert pts.shape == (n, 2)
  exact = ex.sample(bb.mixture, jax.random.key(3), n, prompt=1)
  assert abs(float(ex.energy_distance(pts, exact))) < 0.01
  err = ex.component_errors(pts, bb.mixture, prompt=1)
  assert err["weight_tv"] < 0.05
  assert ex.component_errors(pts, bb.mixture)["mode_weights"][::2].sum() < 0.01


def test_encode_refuses_unknown_prompts_and_rewards_are_closed_form():
  """Prompts other than 'group <p>' / '' raise; the registered exact_ring2d_* rewards score the
  decoded points as the closed forms do (the box one on the host only)."""
  bb = eb.build("exact_ring2d")
  for bad in ["group 2", "grp 0", "a cat"]:
    with pytest.raises(ValueError, match="group <p>"):
      bb.encode([bad])
  pts = jnp.array([[2.0, 0.0], [0.0, 3.0], [3.9, 1.1]])
  images = np.asarray(bb.decode(None, pts.reshape(3, 1, 1, 2)))
  assert images.shape == (3, 1, 2, 3)
  prob = eb.PROBLEMS["ring2d"]
  lin, quad, box = (rewards.make(f"exact_ring2d_{k}") for k in ("linear", "quadratic", "box"))
  np.testing.assert_allclose(lin(images, [""] * 3), pts @ np.array(prob.linear_b), rtol=1e-6)
  np.testing.assert_allclose(lin.jax_fn(None, jnp.asarray(images), None),
                             pts @ np.array(prob.linear_b), rtol=1e-6)
  np.testing.assert_allclose(quad(images, [""] * 3),
                             -0.5 * np.sum((pts - np.array(prob.quadratic_c)) ** 2, 1), rtol=1e-6)
  np.testing.assert_array_equal(box(images, [""] * 3), [1.0, 0.0, 1.0])
  assert lin.differentiable and quad.differentiable and not box.differentiable


def test_didr_drs_estimate_against_the_exact_drs():
  """DIDR's DRS estimate (``losses.didr.diffused_reward_score`` through the exact backbone's
  network, Tweedie K = 1, linear reward b.x on ring2d prompt 0) against the exact DRS of the
  tilted mixture, relative RMS error over 256 points x_t drawn from the joint: within 2% at
  t = 100 for 1/beta in {0.1, 1}; within 15% at t = 400 for 1/beta = 0.1 (the small-reward limit,
  grad log E[e^{r/beta} | x_t] -> grad E[r | x_t] / beta); and more than 50% off at t = 400 for
  1/beta = 1, where r(E[x0 | x_t]) is only a proxy of log E[e^{r/beta} | x_t] on a multimodal
  posterior (the measured table: ``benchmarks/exact_drs.py``)."""
  from didr_jax.losses import didr as didr_losses
  bb = eb.build("exact_ring2d")
  net = common.Net.of(bb.model)
  process = didr_losses.vp_process(bb.schedule)
  b = np.asarray(eb.PROBLEMS["ring2d"].linear_b)
  n = 256
  reward = ex.linear_reward(b)
  cond = jnp.zeros((n,), jnp.int32)
  x0 = ex.sample(bb.mixture, jax.random.key(0), n, prompt=0)
  noise = jax.random.normal(jax.random.key(1), x0.shape)

  @jax.jit
  def estimate(params, x_t, t, scale):
    model = net.bind(params)
    return didr_losses.diffused_reward_score(
        lambda x, tt: bb.denoise(model, x, tt, cond, None, 1.0),
        lambda x: reward(x.reshape(n, 2)), x_t, jnp.full((n,), t), process,
        reward_scale=scale, num_steps=1)[0]

  def rel_error(scale, t):
    a, s = bb.alpha_sigma(jnp.int32(t))
    x_t = a * x0 + s * noise
    exact = ex.exact_drs(bb.mixture, ex.tilt_linear(bb.mixture, b, 1 / scale), x_t, a, s, cond)
    est = estimate(net.params, x_t.reshape(n, 1, 1, 2), t, scale).reshape(n, 2)
    return float(jnp.linalg.norm(est - exact) / jnp.linalg.norm(exact))

  assert rel_error(0.1, 100) < 0.02
  assert rel_error(1.0, 100) < 0.02
  assert rel_error(0.1, 400) < 0.15
  assert rel_error(1.0, 400) > 0.5


def test_from_config_refuses_rewards_of_another_problem():
  """A config whose rewards score another problem's points (or images) is one ConfigError
  naming the key, before anything is compiled; the matching rewards build the backbone."""
  from didr_jax.exact import config as exact_config
  from didr_jax.errors import ConfigError
  c = exact_config.exact_base("ddpo", "ring2d:linear")
  assert eb.from_config(c).kind == "exact_ring2d"
  c.rewards = {"exact_mix16d_linear": 1.0}
  with pytest.raises(ConfigError, match=r"config\.rewards: \['exact_mix16d_linear'\]"):
    eb.from_config(c)
  # a method's own reward spec (DIDR's differentiable didr.reward) is held to the same rule
  from didr_jax.train.didr_config import didr_section
  c = exact_config.exact_base("didr", "ring2d:linear")
  c.didr = didr_section()
  c.didr.reward = {"exact_mix16d_linear": 1.0}
  with pytest.raises(ConfigError, match=r"config\.didr\.reward: \['exact_mix16d_linear'\]"):
    eb.from_config(c)
