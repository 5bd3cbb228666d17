"""Flow-matching schedules, Euler / SDE steps with log-probs, the flow sampler, the flow
re-noising kernel and Z-Image's CFG options, checked against diffusers and float64 NumPy."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift as ref_shift,
                                                          get_default_z_image_sigmas)

from didr_jax.diffusion import ddim, flow, guidance, kernels, param
from didr_jax.diffusion.flow import FlowMatchConfig

SHAPE = (2, 8, 8, 4)
ZIMAGE_CFG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.36.0",
              "num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}



def key(seed):
  # XLA's RngBitGenerator compiles much faster than threefry on this small CPU box.
  return jax.random.key(seed, impl="unsafe_rbg")

def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def fake_v(x, sig):
  return 0.7 * jnp.tanh(x) - 0.3 * param.bcast(jnp.sin(3.0 * sig), x) * x


def fake_v_torch(x, sig):
  return 0.7 * torch.tanh(x) - 0.3 * torch.sin(3.0 * sig) * x


@pytest.fixture(scope="module")
def x_1():
  return np.random.default_rng(11).standard_normal(SHAPE).astype(np.float32)


# ---------------------------------------------------------------------------------- schedules


SCHED_CASES = {
    "static_shift": dict(shift=3.0),
    "no_shift": dict(),
    "dynamic_exp": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    "dynamic_linear": dict(use_dynamic_shifting=True, time_shift_type="linear"),
    "terminal": dict(shift=3.0, shift_terminal=0.05),
}


@pytest.mark.filterwarnings("ignore:invalid value")  # shift_terminal with n = 1: 0 / 0 in both
@pytest.mark.parametrize("case", list(SCHED_CASES))
def test_flow_sigmas_match_diffusers(case):
  cfg_dict = SCHED_CASES[case]
  cfg = FlowMatchConfig.from_diffusers(cfg_dict)
  ref = FlowMatchEulerDiscreteScheduler(**cfg_dict)
  for n in (1, 4, 9, 28, 50):
    for seq_len in (1024, 4096):
      mu = cfg.mu(seq_len) if cfg.use_dynamic_shifting else None
      assert mu is None or mu == ref_shift(seq_len)
      ref.set_timesteps(n, mu=mu)  # the scheduler's own default grid
      sig, ts = flow.flow_sigmas(cfg, n, mu=mu)
      np.testing.assert_array_equal(sig, ref.sigmas.numpy())
      np.testing.assert_array_equal(ts, ref.timesteps.numpy())
      # The ZImagePipeline grid: sigmas = linspace(1, 1/n, n), mu from the latent token count.
      # Given the pipeline's base grid the result is bitwise equal; our own float64-rounded base
      # grid differs from torch.linspace's float32 one by at most an ulp.
      base = get_default_z_image_sigmas(n)
      ref.set_timesteps(sigmas=base, mu=ref_shift(seq_len))
      sig, ts = flow.zimage_sigmas(cfg, n, seq_len, sigmas=base)
      np.testing.assert_array_equal(sig, ref.sigmas.numpy())
      np.testing.assert_array_equal(ts, ref.timesteps.numpy())
      sig, ts = flow.zimage_sigmas(cfg, n, seq_len)
      np.testing.assert_allclose(sig, ref.sigmas.numpy(), rtol=0, atol=2.4e-7)  # nan == nan
      np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=0, atol=1.3e-4)
      assert sig.dtype == np.float32 and sig.shape == (n + 1,) and sig[-1] == 0


def test_flow_config_options():
  z = FlowMatchConfig.from_diffusers(ZIMAGE_CFG)
  assert (z.shift, z.use_dynamic_shifting, z.base_shift) == (3.0, False, 0.5)
  assert FlowMatchConfig.from_diffusers({"base_shift": None}).base_shift == 0.5
  for key, value in (("invert_sigmas", True), ("use_karras_sigmas", True),
                     ("stochastic_sampling", True), ("time_shift_type", "cubic"),
                     ("my_option", 1)):
    with pytest.raises(ValueError, match=key if key != "time_shift_type" else "cubic"):
      FlowMatchConfig.from_diffusers({key: value})
  with pytest.raises(ValueError, match="mu"):
    flow.flow_sigmas(FlowMatchConfig(use_dynamic_shifting=True), 4)
  assert flow.calculate_shift(777, 256, 4096, 0.5, 1.15) == ref_shift(777, 256, 4096, 0.5, 1.15)
  # Z-Image's transformer time: (1000 - T) / 1000 with T = 1000 sig, float32.
  sig, ts = flow.zimage_sigmas(z, 8, 4096)
  want = ((1000 - torch.from_numpy(ts).float()) / 1000).numpy()
  # (to an ulp: XLA:CPU float32 division is not correctly rounded)
  np.testing.assert_allclose(flow.zimage_model_time(sig[:-1]), want, rtol=0, atol=6e-8)


# ---------------------------------------------------------------------------------- steps


def test_euler_trajectory_matches_diffusers(x_1):
  """flow_sample with a = 0 == a Python loop over FlowMatchEulerDiscreteScheduler.step."""
  cfg = FlowMatchConfig.from_diffusers(ZIMAGE_CFG)
  ref = FlowMatchEulerDiscreteScheduler(**ZIMAGE_CFG)
  n = 6
  sig, _ = flow.zimage_sigmas(cfg, n, 1024)
  ref.set_timesteps(sigmas=get_default_z_image_sigmas(n), mu=ref_shift(1024))
  x = torch.from_numpy(x_1)
  want = [x.numpy()]
  for i, t in enumerate(ref.timesteps):
    x = ref.step(fake_v_torch(x, ref.sigmas[i]), t, x).prev_sample
    want.append(x.numpy())
  # A literal a = 0 (static) needs no rng.
  sample = jax.jit(flow.flow_sample, static_argnums=0, static_argnames=("a", "return_outputs"))
  traj = sample(fake_v, x_1, sig, a=0.0, return_outputs=True)
  assert traj.latents.shape == (n + 1,) + SHAPE and traj.log_probs.shape == (n, 2)
  err = rel_err(traj.latents, np.stack(want))
  assert err < 1e-6, err
  # A single Euler step is diffusers' step bitwise.
  v = traj.outputs[2]
  ref._step_index = 2
  want2 = ref.step(torch.tensor(np.asarray(v)), ref.timesteps[2],
                   torch.tensor(np.asarray(traj.latents[2]))).prev_sample.numpy()
  np.testing.assert_array_equal(flow.euler_step(v, traj.latents[2], sig[2], sig[3]), want2)


def test_sde_a0_is_euler(x_1):
  v = fake_v(x_1, jnp.full((2,), 0.6))
  z = np.random.default_rng(12).standard_normal(SHAPE).astype(np.float32)
  sde = jax.jit(lambda s, s_next: flow.sde_step(v, x_1, s, s_next, 0.0, z))
  euler = jax.jit(lambda s, s_next: flow.euler_step(v, x_1, s, s_next))
  for s, s_next in ((1.0, 0.8), (0.6, 0.45), (0.1, 0.0)):
    x_next, lp, mean, std = sde(s, s_next)
    np.testing.assert_array_equal(x_next, euler(s, s_next))
    assert float(std) == 0.0
    np.testing.assert_array_equal(lp, [0.0] * 2)  # no density: log-prob 0


def test_sde_log_prob_matches_float64(x_1):
  """Mean, std and log-prob of Flow-GRPO steps against float64 NumPy, incl. sig = 1."""
  rng = np.random.default_rng(13)
  grid = np.array([1.0, 0.9, 0.55, 0.2, 0.0])
  cap = 0.9  # largest grid sigma below 1
  v = rng.standard_normal(SHAPE).astype(np.float32)
  z = rng.standard_normal(SHAPE).astype(np.float32)
  a = 0.7
  for i in range(len(grid) - 1):
    # Per-sample sigmas: sample 0 at grid[i], sample 1 one step later (or the same).
    j = min(i + 1, len(grid) - 2)
    s, s_next = grid[[i, j]], grid[[i + 1, j + 1]]
    x_next, lp, mean, std = flow.sde_step(v, x_1, s.astype(np.float32),
                                          s_next.astype(np.float32), a, z, sigma_cap=cap)
    sb, snb = s[:, None, None, None], s_next[:, None, None, None]
    dt = snb - sb
    sig_t = a * np.sqrt(sb / (1 - np.where(sb == 1, cap, sb)))
    mu = (x_1 * (1 + sig_t ** 2 / (2 * sb) * dt)
          + v.astype(np.float64) * (1 + sig_t ** 2 * (1 - sb) / (2 * sb)) * dt)
    sd = sig_t * np.sqrt(-dt)
    xn = np.asarray(x_next, np.float64)
    want = (-(xn - mu) ** 2 / (2 * sd ** 2) - np.log(sd) - 0.5 * np.log(2 * np.pi)).mean((1, 2, 3))
    assert rel_err(mean, mu) < 1e-6 and rel_err(std, sd[:, 0, 0, 0]) < 1e-6
    assert rel_err(x_next, mu + sd * z) < 1e-6
    np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flow.sde_log_prob(v, x_1, x_next, s.astype(np.float32),
                                                 s_next.astype(np.float32), a, sigma_cap=cap),
                               lp, rtol=1e-6, atol=1e-6)
  # Default cap = sig_next, i.e. the largest sigma below 1 on a grid that starts at 1.
  np.testing.assert_array_equal(flow.sde_step(v, x_1, 1.0, 0.9, a, z)[0],
                                flow.sde_step(v, x_1, 1.0, 0.9, a, z, sigma_cap=0.9)[0])


def test_flow_sample_ratio_is_one(x_1):
  cfg = FlowMatchConfig.from_diffusers(ZIMAGE_CFG)
  sig, _ = flow.zimage_sigmas(cfg, 5, 1024)
  sample = jax.jit(flow.flow_sample, static_argnums=0, static_argnames="return_outputs")
  traj = sample(fake_v, x_1, jnp.asarray(sig), a=0.7, rng=key(3),
                return_outputs=True)
  np.testing.assert_array_equal(traj.timesteps, sig[:-1])
  np.testing.assert_array_equal(traj.next_timesteps, sig[1:])
  cap = flow.largest_sigma_below_one(sig)
  assert float(cap) == sig[1]
  re = jax.jit(jax.vmap(lambda v, x, xn, s, sn: flow.sde_log_prob(v, x, xn, s, sn, 0.7,
                                                                  sigma_cap=cap)))(
      traj.outputs, traj.latents[:-1], traj.latents[1:], sig[:-1], sig[1:])
  diff = np.abs(np.asarray(re) - np.asarray(traj.log_probs)).max()
  assert diff < 1e-5, diff
  assert np.isfinite(np.asarray(traj.latents)).all()
  with pytest.raises(ValueError, match="rng"):
    flow.flow_sample(fake_v, x_1, sig, a=0.7)


def test_cps_step_and_log_prob_match_float64(x_1):
  """CPS mean, std and log-prob against float64 NumPy (std = sig' sin(a pi/2), mean =
  (1 - sig') x0_hat + sqrt(sig'^2 - std^2) x1_hat), incl. sig = 1 and the last step (std 0)."""
  rng = np.random.default_rng(21)
  v = rng.standard_normal(SHAPE).astype(np.float32)
  z = rng.standard_normal(SHAPE).astype(np.float32)
  x = x_1.astype(np.float64)
  for a in (0.3, 0.7, 1.0):
    for s, s_next in ((1.0, 0.8), (0.6, 0.45), (0.2, 0.05)):
      mean, std = flow.cps_mean_std(v, x_1, np.float32(s), np.float32(s_next), a)
      sd = s_next * np.sin(a * np.pi / 2)
      x0_hat, x1_hat = x - s * v, x + (1 - s) * v
      mu = (1 - s_next) * x0_hat + np.sqrt(s_next ** 2 - sd ** 2) * x1_hat
      assert rel_err(mean, mu) < 2e-6 and abs(float(std) - sd) < 1e-6
      xn = (mu + sd * z).astype(np.float32)
      want = (-(xn - mu) ** 2 / (2 * sd ** 2) - np.log(sd) - 0.5 * np.log(2 * np.pi)).mean(
          (1, 2, 3))
      lp = ddim.gaussian_log_prob(jnp.asarray(xn), mean, std)
      np.testing.assert_allclose(lp, want, rtol=2e-5, atol=2e-5)
      # the KL scale of CPS is the step std itself
      assert abs(float(flow.step_kl_std(s, s_next, a, "cps")) - sd) < 1e-6
  # the last step (sig' = 0) is deterministic: std 0, mean = x0_hat
  mean, std = flow.cps_mean_std(v, x_1, np.float32(0.1), np.float32(0.0), 0.7)
  assert float(std) == 0.0 and rel_err(mean, x - 0.1 * v) < 1e-6


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_a0_is_the_euler_step_in_both_types(x_1, sde_type):
  v = fake_v(x_1, jnp.full((2,), 0.6))
  for s, s_next in ((1.0, 0.8), (0.6, 0.45), (0.1, 0.0)):
    mean, std = flow.step_mean_std(v, x_1, s, s_next, 0.0, sde_type)
    np.testing.assert_array_equal(mean, flow.euler_step(v, x_1, s, s_next))
    assert float(np.max(std)) == 0.0


def test_sde_kl_scale_is_the_noise_coefficient():
  """Flow-GRPO's KL divides by sig_t^2 = a^2 sig / (1 - sig) (cap at sig = 1), not by the step
  variance sig_t^2 |dt|; kl_to_reference then is ||dmu||^2 / (2 sig_t^2) over dims."""
  a, cap = 0.7, 0.9
  s = np.array([1.0, 0.9, 0.55, 0.2])
  s_next = np.array([0.9, 0.55, 0.2, 0.0])
  got = flow.step_kl_std(s.astype(np.float32), s_next.astype(np.float32), a, sigma_cap=cap)
  want = a * np.sqrt(s / (1 - np.where(s == 1, cap, s)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # std of the step = sig_t sqrt(|dt|): the KL scale is not the step std
  _, step_std = flow.sde_mean_std(jnp.zeros(SHAPE), jnp.zeros(SHAPE), s.astype(np.float32)[:2],
                                  s_next.astype(np.float32)[:2], a, cap)
  np.testing.assert_allclose(step_std, want[:2] * np.sqrt(s[:2] - s_next[:2]), rtol=1e-6)
  from didr_jax.losses import ddpo
  rng = np.random.default_rng(4)
  mu, mu_ref = rng.standard_normal((2, 4, 5, 3)), rng.standard_normal((2, 4, 5, 3))
  kl = ddpo.kl_to_reference(jnp.asarray(mu, jnp.float32), jnp.asarray(mu_ref, jnp.float32),
                            got[:2])
  np.testing.assert_allclose(kl, ((mu - mu_ref) ** 2).mean((1, 2, 3)) / (2 * want[:2] ** 2),
                             rtol=1e-5)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_per_step_levels_window_and_ratio_one(x_1, sde_type):
  """A per-step level vector: ODE steps (level 0, and CPS's last step) carry log-prob 0 and are
  marked not stochastic; the window's steps have the log-prob a recomputation gives (ratio 1);
  the final ODE step is the Euler step of the stored velocity."""
  cfg = FlowMatchConfig.from_diffusers(ZIMAGE_CFG)
  n = 6
  sig, _ = flow.zimage_sigmas(cfg, n, 1024)
  levels = np.array([0.0, 0.7, 0.7, 0.0, 0.0, 0.0], np.float32)  # window (1, 2)
  sample = jax.jit(flow.flow_sample, static_argnums=0,
                   static_argnames=("return_outputs", "sde_type"))
  traj = sample(fake_v, x_1, jnp.asarray(sig), a=jnp.asarray(levels), sde_type=sde_type,
                rng=key(5), return_outputs=True)
  np.testing.assert_array_equal(traj.levels, levels)
  np.testing.assert_array_equal(traj.stochastic, levels > 0)
  lp = np.asarray(traj.log_probs)
  assert (lp[levels == 0] == 0).all() and (lp[levels > 0] != 0).all()
  cap = flow.largest_sigma_below_one(sig)
  for i in range(n):
    mean, std = flow.step_mean_std(traj.outputs[i], traj.latents[i], sig[i], sig[i + 1],
                                   levels[i], sde_type, cap)
    if levels[i] == 0:  # ODE step: the Euler step (to float32 rounding of another program)
      assert rel_err(traj.latents[i + 1], mean) < 1e-6
    else:
      re = ddim.gaussian_log_prob(traj.latents[i + 1], mean, std)
      assert np.abs(np.asarray(re) - lp[i]).max() < 1e-5
      assert rel_err(traj.latents[i + 1], mean) > 1e-3  # noise was added
  # a level vector of literal zeros needs no rng, as a literal 0 does
  ode = flow.flow_sample(fake_v, x_1, sig, a=np.zeros(n, np.float32), sde_type=sde_type)
  assert not np.asarray(ode.stochastic).any()


# ---------------------------------------------------------------------------------- kernels


def test_flow_renoise_kernel_marginal():
  """x_tau = a x_s + b eps, a = (1 - sig_tau)/(1 - sig_s), b = sqrt(sig_tau^2 - (sig_s a)^2):
  from x_s ~ q(x_s | x0) it has q(x_tau | x0) = N((1 - sig_tau) x0, sig_tau^2)."""
  s, tau = jnp.array([0.1, 0.4, 0.75]), jnp.array([0.3, 0.95, 0.75])
  a, b = kernels.renoise_coeffs(*kernels.flow_alpha_sigma(s), *kernels.flow_alpha_sigma(tau))
  s64, t64 = np.asarray(s, np.float64), np.asarray(tau, np.float64)
  a64 = (1 - t64) / (1 - s64)
  np.testing.assert_allclose(a, a64, rtol=1e-6)
  np.testing.assert_allclose(b, np.sqrt(np.maximum(t64 ** 2 - (s64 * a64) ** 2, 0)), atol=1e-6)
  np.testing.assert_allclose(a * (1 - s), 1 - tau, rtol=1e-6)                 # mean
  np.testing.assert_allclose(a ** 2 * s ** 2 + b ** 2, tau ** 2, rtol=1e-5)    # variance
  k1, k2 = jax.random.split(key(4))
  m = 200_000
  x0 = jnp.full((3, m), -0.8)
  x_s = kernels.q_sample(x0, jax.random.normal(k1, (3, m)), *kernels.flow_alpha_sigma(s))
  x_tau = kernels.flow_renoise(x_s, jax.random.normal(k2, (3, m)), s, tau)
  np.testing.assert_allclose(x_tau.mean(1), -0.8 * (1 - tau), atol=0.01)
  np.testing.assert_allclose(x_tau.std(1), tau, atol=0.01)


# ---------------------------------------------------------------------------------- guidance


def test_cfg_basic_and_batched_call():
  rng = np.random.default_rng(14)
  u, c = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
  np.testing.assert_allclose(guidance.cfg(u, c, 4.5), u + 4.5 * (c - u), rtol=1e-6)
  np.testing.assert_allclose(guidance.cfg(u, c, jnp.array([1.0, 3.0]))[0], c[0], atol=1e-6)
  calls = []

  def model_fn(x, t, ctx):
    calls.append(x.shape[0])
    return x * ctx["scale"][:, None, None, None] + param.bcast(t, x)

  ctx_c, ctx_u = {"scale": jnp.array([2.0, 3.0])}, {"scale": jnp.array([0.5, 0.5])}
  x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  out = guidance.guided(model_fn, ctx_c, ctx_u, 5.0)(x, jnp.float32(0.3))
  assert calls == [4]  # one batched call for cond + uncond
  want = guidance.cfg(model_fn(x, 0.3, ctx_u), model_fn(x, 0.3, ctx_c), 5.0)
  assert rel_err(out, want) < 1e-6
  calls.clear()
  guidance.guided(model_fn, ctx_c, ctx_u, 1.0)(x, 0.3)
  assert calls == [2]  # scale 1: conditional pass only


def test_zimage_cfg_options_match_pipeline_logic(x_1):
  """guided(...) with normalization / truncation == the ZImagePipeline's per-step CFG logic."""
  g, norm, trunc, n = 3.0, 1.2, 0.5, 6
  cfg = FlowMatchConfig.from_diffusers(ZIMAGE_CFG)
  ref = FlowMatchEulerDiscreteScheduler(**ZIMAGE_CFG)
  ref.set_timesteps(sigmas=get_default_z_image_sigmas(n), mu=ref_shift(1024))
  sig, _ = flow.zimage_sigmas(cfg, n, 1024)

  def model_fn(x, t, ctx):  # t is the flow sigma the sampler passes
    return jnp.tanh(x * ctx[:, None, None, None]) + param.bcast(t, x) * ctx[:, None, None, None]

  pos_ctx, neg_ctx = jnp.array([1.0, 0.2]), jnp.array([0.9, -1.5])
  denoise = jax.jit(guidance.guided(model_fn, pos_ctx, neg_ctx, guidance.zimage_scale(g),
                                    normalization=norm, truncation=trunc))
  t_norms = ((1000 - ref.timesteps.float()) / 1000).tolist()
  n_truncated = n_renormed = 0
  for i in range(n):
    s = jnp.full((2,), sig[i])
    pos = np.array(model_fn(jnp.asarray(x_1), s, pos_ctx))
    neg = np.array(model_fn(jnp.asarray(x_1), s, neg_ctx))
    scale = 0.0 if t_norms[i] > trunc else g
    want = []
    for j in range(2):
      p, q = torch.from_numpy(pos[j]), torch.from_numpy(neg[j])
      if scale > 0:
        pred = p + scale * (p - q)
        max_norm = torch.linalg.vector_norm(p) * norm
        if torch.linalg.vector_norm(pred) > max_norm:
          pred = pred * (max_norm / torch.linalg.vector_norm(pred))
          n_renormed += 1
      else:
        pred = p
        n_truncated += 1
      want.append(pred.numpy())
    got = denoise(jnp.asarray(x_1), sig[i])
    assert rel_err(got, np.stack(want)) < 1e-5, i
  assert n_truncated > 0 and n_renormed > 0  # both options were exercised
  # Truncation threshold compares like Python floats: progress == fl32(c) > c is truncated.
  c = 0.1  # fl32(0.1) > 0.1
  p = jnp.float32(c)
  out = guidance.guided_output(jnp.zeros((1, 2)), jnp.ones((1, 2)), 3.0, truncation=c,
                               progress=p)
  assert float(p) > c and np.array_equal(out, np.ones((1, 2)))
