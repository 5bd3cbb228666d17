"""VP schedules, DDIM steps / sampler with log-probs, parameterisations and kernels, checked
against diffusers' DDIMScheduler and independent float64 NumPy formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from didr_jax.diffusion import ddim, kernels, param
from didr_jax.diffusion.schedules import VPSchedule, ddim_timesteps

SD_CFG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 8, 8, 4)  # NHWC; every step is elementwise, so torch sees the same array



def key(seed):
  # XLA's RngBitGenerator compiles much faster than threefry on this small CPU box.
  return jax.random.key(seed, impl="unsafe_rbg")

def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def fake_jax(x, t):
  """A deterministic, time-dependent stand-in for a denoiser."""
  c = jnp.cos(t.astype(jnp.float32) * 0.01)
  return 0.6 * jnp.tanh(x) + 0.2 * param.bcast(c, x) * x


def fake_torch(x, t):
  return 0.6 * torch.tanh(x) + 0.2 * torch.cos(torch.tensor(float(t)) * 0.01) * x


def diffusers_schedule(cfg):
  """Our schedule with diffusers' float32 abar swapped in, to test step formulas bitwise."""
  ours = VPSchedule.from_diffusers(cfg)
  ref = DDIMScheduler(**cfg)
  return dataclasses.replace(ours, alphas_cumprod=jnp.asarray(ref.alphas_cumprod.numpy()),
                             final_alpha_cumprod=jnp.asarray(ref.final_alpha_cumprod.numpy())), ref


@pytest.fixture(scope="module")
def x_T():
  return np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)


# ---------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("cfg", [
    dict(beta_schedule="linear"),
    SD_CFG,
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD_CFG, rescale_betas_zero_snr=True),
    dict(trained_betas=list(np.linspace(1e-4, 0.03, 500)), num_train_timesteps=500),
], ids=["linear", "scaled_linear", "cosine", "zero_snr", "trained"])
def test_alphas_cumprod_match_diffusers(cfg):
  ours = VPSchedule.from_diffusers(cfg)
  ref = DDIMScheduler(**cfg)
  a, b = np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy()
  assert ours.alphas_cumprod.dtype == jnp.float32 and a.shape == b.shape
  # We accumulate in float64 and round once; diffusers accumulates in float32.
  assert np.abs(a - b).max() < 1e-6
  assert (np.abs(a - b) / np.maximum(b, 1e-3)).max() < 2e-5
  assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def test_from_diffusers_options():
  sd14 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
          "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None, "clip_sample": False}
  s = VPSchedule.from_diffusers(sd14)
  assert (s.steps_offset, s.clip_sample, s.timestep_spacing) == (1, False, "leading")
  assert float(s.final_alpha_cumprod) == pytest.approx(float(s.alphas_cumprod[0]))
  # Absent keys take DDIMScheduler's defaults, as DDIMScheduler.from_config does.
  d = VPSchedule.from_diffusers({"beta_schedule": "linear"})
  assert d.clip_sample and float(d.final_alpha_cumprod) == 1.0
  for key, value in (("thresholding", True), ("use_karras_sigmas", True),
                     ("timestep_type", "continuous"), ("beta_schedule", "sigmoid"),
                     ("prediction_type", "flow"), ("timestep_spacing", "karras")):
    with pytest.raises(ValueError, match=key):
      VPSchedule.from_diffusers({key: value})
  with pytest.raises(ValueError, match="my_option"):
    VPSchedule.from_diffusers({"my_option": 1})
  VPSchedule.from_diffusers({"my_option": 1}, ignore_unknown=True)
  # A pytree: arrays are leaves, options static.
  leaves, treedef = jax.tree.flatten(s)
  assert len(leaves) == 2 and jax.tree.unflatten(treedef, leaves).steps_offset == 1


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                            ("linspace", 0)])
def test_timesteps_match_diffusers(spacing, offset):
  cfg = dict(SD_CFG, timestep_spacing=spacing, steps_offset=offset)
  s = VPSchedule.from_diffusers(cfg)
  ref = DDIMScheduler(**cfg)
  for n in (1, 2, 3, 4, 7, 10, 20, 25, 33, 50, 61, 100, 999, 1000):
    ts, prev = ddim_timesteps(s, n)
    ref.set_timesteps(n)
    want = ref.timesteps.numpy()[:n]  # trailing n=61: diffusers appends a bogus -1
    np.testing.assert_array_equal(ts, want)
    # step() moves every timestep back by T // n, whatever the spacing.
    np.testing.assert_array_equal(prev, want - 1000 // n)
    assert ts.dtype == np.int32 and len(ts) == n
  with pytest.raises(ValueError):
    ddim_timesteps(s, 1001)


# ---------------------------------------------------------------------------------- DDIM steps


@pytest.mark.parametrize("pred,clip,one", [("epsilon", False, False), ("epsilon", True, True),
                                           ("v_prediction", False, True),
                                           ("sample", True, False)])
def test_ddim_step_eta0_matches_diffusers(pred, clip, one, x_T):
  cfg = dict(SD_CFG, prediction_type=pred, clip_sample=clip, set_alpha_to_one=one,
             steps_offset=1)
  sched, ref = diffusers_schedule(cfg)
  ref.set_timesteps(10)
  ts, prev = ddim_timesteps(sched, 10)
  out = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
  step = jax.jit(lambda o, x, t, tp: ddim.ddim_step(o, x, t, tp, sched, 0.0, None))
  worst = 0.0
  for t, tp in zip(ts, prev):
    want = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x_T), eta=0.0).prev_sample
    got, lp, mean, std = step(out, x_T, t, tp)
    worst = max(worst, rel_err(got, want.numpy()))
    assert float(std) == 0.0 and np.array_equal(np.asarray(got), np.asarray(mean))
    assert np.isfinite(np.asarray(lp)).all()
  assert worst < 1e-6, worst


@pytest.mark.parametrize("pred,eta,spacing", [("epsilon", 0.0, "leading"),
                                              ("v_prediction", 0.0, "trailing"),
                                              ("epsilon", 1.0, "leading"),
                                              ("v_prediction", 1.0, "linspace")])
def test_ddim_trajectory_matches_diffusers(pred, eta, spacing, x_T):
  """Scanned, jitted sampler == a Python loop over DDIMScheduler.step (same noise)."""
  n = 8
  cfg = dict(SD_CFG, prediction_type=pred, clip_sample=False, set_alpha_to_one=False,
             steps_offset=1, timestep_spacing=spacing,
             rescale_betas_zero_snr=(pred == "v_prediction" and spacing == "trailing"))
  sched = VPSchedule.from_diffusers(cfg)  # our own float64-built abar
  ref = DDIMScheduler(**cfg)
  ref.set_timesteps(n)
  noise = np.random.default_rng(3).standard_normal((n,) + SHAPE).astype(np.float32)
  x = torch.from_numpy(x_T)
  want = [x.numpy()]
  for i, t in enumerate(ref.timesteps):
    x = ref.step(fake_torch(x, t), t, x, eta=eta,
                 variance_noise=torch.from_numpy(noise[i]) if eta > 0 else None).prev_sample
    want.append(x.numpy())
  sample = jax.jit(ddim.ddim_sample, static_argnums=(0, 3),
                   static_argnames=("return_outputs",))
  traj = sample(fake_jax, x_T, sched, n, eta=eta, noise=noise)
  assert traj.latents.shape == (n + 1,) + SHAPE and traj.log_probs.shape == (n, 2)
  np.testing.assert_array_equal(traj.timesteps, ref.timesteps.numpy())
  err = rel_err(traj.latents, np.stack(want))
  assert err < 5e-6, err  # measured ~6e-7 (float64-built abar vs diffusers' float32 one)
  np.testing.assert_array_equal(traj.sample, traj.latents[-1])


def test_eta_one_with_rng_matches_given_noise(x_T):
  """rng-drawn noise is reproducible and the same path as passing that noise explicitly."""
  sched = VPSchedule.from_diffusers(dict(SD_CFG, clip_sample=False))
  sample = jax.jit(ddim.ddim_sample, static_argnums=(0, 3))
  traj = sample(fake_jax, x_T, sched, 4, eta=1.0, rng=key(0))
  keys = jax.random.split(key(0), 4)
  noise = jnp.stack([jax.random.normal(k, SHAPE) for k in keys])  # (rbg is not vmap-invariant)
  again = sample(fake_jax, x_T, sched, 4, eta=1.0, noise=noise)
  assert rel_err(traj.latents, again.latents) < 1e-6
  with pytest.raises(ValueError, match="rng"):
    ddim.ddim_sample(fake_jax, x_T, sched, 4, eta=1.0)


# ---------------------------------------------------------------------------------- log-probs


def test_gaussian_log_prob_matches_float64(rng):
  x = rng.standard_normal(SHAPE).astype(np.float32)
  mean = (x + 0.3 * rng.standard_normal(SHAPE)).astype(np.float32)
  std = np.array([0.2, 0.7], np.float32)
  got = ddim.gaussian_log_prob(x, mean, std)
  s = std.astype(np.float64)[:, None, None, None]
  want = (-(x.astype(np.float64) - mean) ** 2 / (2 * s ** 2) - np.log(s)
          - 0.5 * np.log(2 * np.pi)).mean(axis=(1, 2, 3))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # a deterministic step (std 0) has no density: log-prob 0, even when a recomputed mean is
  # off by rounding.
  np.testing.assert_array_equal(ddim.gaussian_log_prob(x, x, 0.0), [0.0] * 2)
  np.testing.assert_array_equal(ddim.gaussian_log_prob(x, x * (1 + 1e-7), 0.0), [0.0] * 2)


def test_ddim_step_log_prob_matches_float64(x_T):
  """Mean, std and log-prob of an eta=1 step against an independent float64 evaluation."""
  sched = VPSchedule.from_diffusers(dict(SD_CFG, clip_sample=False, set_alpha_to_one=False))
  rng = np.random.default_rng(4)
  out = rng.standard_normal(SHAPE).astype(np.float32)
  z = rng.standard_normal(SHAPE).astype(np.float32)
  t, tp = np.array([801, 401], np.int32), np.array([701, -99], np.int32)  # per-sample times
  x_prev, lp, mean, std = ddim.ddim_step(out, x_T, t, tp, sched, 1.0, z)

  ac = np.asarray(sched.alphas_cumprod, np.float64)
  a_t = ac[t][:, None, None, None]
  a_p = np.where(tp >= 0, ac[np.maximum(tp, 0)], ac[0])[:, None, None, None]
  x0 = (x_T - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
  sd = np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
  mu = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sd ** 2) * out
  xp = np.asarray(x_prev, np.float64)
  want = (-(xp - mu) ** 2 / (2 * sd ** 2) - np.log(sd) - 0.5 * np.log(2 * np.pi)).mean((1, 2, 3))
  assert rel_err(mean, mu) < 1e-6 and rel_err(std, sd[:, 0, 0, 0]) < 1e-6
  assert rel_err(x_prev, mu + sd * z) < 1e-6
  np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)


def test_ratio_is_one_and_gradient_through_mean(x_T):
  """ddim_log_prob of each stored transition == the log-prob returned while sampling."""
  sched = VPSchedule.from_diffusers(dict(SD_CFG, clip_sample=False))
  traj = jax.jit(ddim.ddim_sample, static_argnums=(0, 3), static_argnames="return_outputs")(
      fake_jax, x_T, sched, 6, eta=1.0, rng=key(5), return_outputs=True)
  assert traj.outputs.shape == (6,) + SHAPE
  re = jax.jit(jax.vmap(lambda o, x, xp, t, tp: ddim.ddim_log_prob(o, x, xp, t, tp, sched, 1.0)))(
      traj.outputs, traj.latents[:-1], traj.latents[1:], traj.timesteps, traj.next_timesteps)
  diff = np.abs(np.asarray(re) - np.asarray(traj.log_probs)).max()
  assert diff < 1e-5, diff
  assert np.exp(np.asarray(re) - np.asarray(traj.log_probs)).max() == pytest.approx(1.0, abs=1e-5)

  # Gradient w.r.t. the model output flows only through the mean (x_prev is a constant).
  out, t, tp = traj.outputs[0], traj.timesteps[0], traj.next_timesteps[0]
  z = jax.random.normal(key(6), SHAPE)

  @jax.jit
  def grads(out):
    x_prev = ddim.ddim_step(out, x_T, t, tp, sched, 1.0, z)[0]
    g1 = jax.grad(lambda o: ddim.ddim_step(o, x_T, t, tp, sched, 1.0, z)[1].sum())(out)
    g2 = jax.grad(lambda o: ddim.ddim_log_prob(o, x_T, x_prev, t, tp, sched, 1.0).sum())(out)
    return g1, g2

  g1, g2 = grads(out)
  assert np.abs(np.asarray(g1)).max() > 0
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------- param


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_param_roundtrip_and_score_identity(family, rng):
  x0 = rng.standard_normal(SHAPE).astype(np.float32)
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  if family == "vp":
    sched = VPSchedule.from_diffusers(SD_CFG)
    alpha, sigma = kernels.vp_alpha_sigma(sched, jnp.array([100, 700]))
    types = ("epsilon", "v_prediction", "sample")
  else:
    alpha, sigma = kernels.flow_alpha_sigma(jnp.array([0.3, 0.85]))
    types = ("epsilon", "sample", "flow")
  x_t = kernels.q_sample(x0, eps, alpha, sigma)
  for pt in types:
    out = param.x0_eps_to_output(x0, eps, alpha, sigma, pt)
    x0_hat, eps_hat = param.to_x0_eps(out, x_t, alpha, sigma, pt)
    assert rel_err(x0_hat, x0) < 2e-5 and rel_err(eps_hat, eps) < 2e-5, pt
    assert rel_err(param.x0_to_output(x0, x_t, alpha, sigma, pt), out) < 2e-5, pt
    for pt2 in types:
      back = param.convert(param.convert(out, x_t, alpha, sigma, pt, pt2), x_t, alpha, sigma,
                           pt2, pt)
      assert rel_err(back, out) < 2e-5, (pt, pt2)
  # Tweedie and the score identity s_A - s_B = (a / s^2)(x0_A - x0_B).
  score = param.score_from_x0(x_t, x0, alpha, sigma)
  assert rel_err(score, param.score_from_eps(eps, sigma)) < 1e-5
  assert rel_err(param.x0_from_score(score, x_t, alpha, sigma), x0) < 1e-5
  x0_b = x0 + 0.1 * rng.standard_normal(SHAPE).astype(np.float32)
  ds = score - param.score_from_x0(x_t, x0_b, alpha, sigma)
  a64, s64 = np.asarray(alpha, np.float64)[:, None, None, None], np.asarray(
      sigma, np.float64)[:, None, None, None]
  assert rel_err(ds, a64 / s64 ** 2 * (x0 - x0_b.astype(np.float64))) < 1e-4
  assert rel_err(param.score_delta_from_x0_delta(x0 - x0_b, alpha, sigma), ds) < 1e-4
  assert rel_err(param.x0_delta_from_score_delta(ds, alpha, sigma), x0 - x0_b) < 1e-4
  with pytest.raises(ValueError):
    param.to_x0(x0, x_t, alpha, sigma, "velocity")


# ---------------------------------------------------------------------------------- kernels


def test_vp_renoise_kernel_marginal():
  """x_tau = a x_s + b eps from x_s ~ q(x_s|x0) has q(x_tau|x0)'s mean and variance."""
  sched = VPSchedule.from_diffusers(SD_CFG)
  s, tau = jnp.array([50, 300, 0]), jnp.array([400, 999, 0])
  a_s, s_s = kernels.vp_alpha_sigma(sched, s)
  a_tau, s_tau = kernels.vp_alpha_sigma(sched, tau)
  a, b = kernels.renoise_coeffs(a_s, s_s, a_tau, s_tau)
  np.testing.assert_allclose(a * a_s, a_tau, rtol=1e-6)
  np.testing.assert_allclose(a ** 2 * s_s ** 2 + b ** 2, s_tau ** 2, rtol=1e-5, atol=1e-7)
  ac = np.asarray(sched.alphas_cumprod, np.float64)
  np.testing.assert_allclose(b ** 2, 1 - ac[np.asarray(tau)] / ac[np.asarray(s)], atol=1e-6)
  # Monte Carlo on a scalar x0 = 1.5, 200k draws.
  k1, k2 = jax.random.split(key(7))
  e1 = jax.random.normal(k1, (3, 200_000))
  e2 = jax.random.normal(k2, (3, 200_000))
  x_s = kernels.q_sample(jnp.full((3, 200_000), 1.5), e1, a_s, s_s)
  x_tau = kernels.vp_renoise(x_s, e2, sched, s, tau)
  np.testing.assert_allclose(x_tau.mean(1), 1.5 * a_tau, atol=0.01)
  np.testing.assert_allclose(x_tau.std(1), s_tau, atol=0.01)


def test_sample_timesteps_ranges():
  t = kernels.sample_vp_timesteps(key(0), (4096,), 1000, 0.02, 0.98)
  assert t.dtype == jnp.int32 and int(t.min()) == 20 and int(t.max()) == 980
  u = kernels.sample_fraction(key(1), (4096,), 0.2, 0.6)
  assert 0.2 <= float(u.min()) and float(u.max()) < 0.6
  sig = kernels.sample_flow_sigmas(key(1), (4096,), 0.2, 0.6, shift=3.0)
  np.testing.assert_allclose(sig, 3 * u / (1 + 2 * u), rtol=1e-6)
