"""TDM and TDM-R1 losses (docs/methods.md §4) against closed forms and NumPy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax.diffusion import ddim, flow, kernels, param
from didr_jax.diffusion.schedules import VPSchedule
from didr_jax.losses import common, tdm, tdm_r1


def _vp_schedule(dtype=jnp.float32) -> tuple[VPSchedule, np.ndarray]:
  """SD's scaled-linear schedule (T = 1000), abar in float64 NumPy and as a VPSchedule."""
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  abar = np.cumprod(1.0 - betas)
  sched = VPSchedule(alphas_cumprod=jnp.asarray(abar, dtype),
                     final_alpha_cumprod=jnp.asarray(1.0, dtype), timestep_spacing="trailing")
  return sched, abar


# ------------------------------------------------------------------------------ student step


def test_student_step_is_flow_euler_and_recoverable(rng):
  x = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  sig, sig_n = jnp.asarray([1.0, 0.8, 0.3]), jnp.asarray([0.7, 0.5, 0.0])
  x_next, x0_hat, eps_hat = tdm.student_step(v, x, 1 - sig, sig, 1 - sig_n, sig_n, "flow")
  np.testing.assert_allclose(x_next, flow.euler_step(v, x, sig, sig_n), atol=2e-6)
  np.testing.assert_allclose(x0_hat, x - sig[:, None, None] * v, atol=1e-6)
  np.testing.assert_allclose(eps_hat - x0_hat, v, atol=2e-6)
  np.testing.assert_allclose(tdm.x0_from_states(x, x_next, 1 - sig, sig, 1 - sig_n, sig_n),
                             x0_hat, atol=2e-5)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_student_trajectory_is_ddim_eta0_and_x0_recoverable(rng, ptype):
  """The K-step VP student is ddim_sample(eta=0); each step's x0_hat is recovered from the two
  stored states around it."""
  sched, _ = _vp_schedule()
  sched = VPSchedule(sched.alphas_cumprod, sched.final_alpha_cumprod,
                     timestep_spacing="trailing", prediction_type=ptype)
  w = jnp.asarray(rng.normal(scale=0.3, size=(6, 6)), jnp.float32)
  denoise = lambda x, t: jnp.tanh(x @ w) * (1.0 + t[:, None] / 1000.0)
  x_T = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  out = ddim.ddim_sample(denoise, x_T, sched, 4, eta=0.0)
  x = x_T
  for j, (t, t_n) in enumerate(zip(out.timesteps, out.next_timesteps)):
    a, s = kernels.vp_alpha_sigma(sched, t)
    a_n, s_n = kernels.vp_alpha_sigma(sched, t_n)
    x_next, x0_hat, _ = tdm.student_step(denoise(x, jnp.full((4,), t)), x, a, s, a_n, s_n, ptype)
    np.testing.assert_allclose(x_next, out.latents[j + 1], atol=2e-5)
    if j < 3:  # the last step lands on x0_hat itself (sigma_next = 0)
      np.testing.assert_allclose(tdm.x0_from_states(out.latents[j], out.latents[j + 1], a, s,
                                                    a_n, s_n), x0_hat, atol=5e-4)
    x = x_next
  np.testing.assert_allclose(out.latents[-1], x0_hat, atol=2e-5)


# ------------------------------------------------------------------------------ re-noising kernel


_FLOW_PAIRS = [(0.0, 0.3), (0.25, 0.25), (0.25, 0.6), (0.5, 0.999), (0.75, 1.0)]
_VP_PAIRS = [(0, 10), (249, 499), (499, 999), (100, 100), (749, 999)]


def _kernel_coeffs(family, s, tau, sched):
  """(a, b) of x_tau = a x_s + b eps read off the kernel itself (it is linear in (x_s, eps))."""
  one, zero = jnp.ones((1, 1), jnp.float64), jnp.zeros((1, 1), jnp.float64)
  if family == "flow":
    f = lambda x, e: kernels.flow_renoise(x, e, jnp.float64(s), jnp.float64(tau))
  else:
    f = lambda x, e: kernels.vp_renoise(x, e, sched, s, tau)
  return float(f(one, zero)[0, 0]), float(f(zero, one)[0, 0])


@pytest.mark.parametrize("family", ["flow", "vp"])
def test_renoise_kernel_marginal_float64(family):
  """q(x_tau | x_s) composed with q(x_s | x0) is the forward q(x_tau | x0): exactly (moment
  propagation of the kernel's own coefficients) and by Monte Carlo on a non-Gaussian x0, in
  float64, against alpha / sigma computed independently in NumPy."""
  with jax.enable_x64(True):
    sched, abar = _vp_schedule(jnp.float64)
    pairs = _FLOW_PAIRS if family == "flow" else _VP_PAIRS
    key = jax.random.key(0)
    for s, tau in pairs:
      if family == "flow":
        (al_s, sg_s), (al_t, sg_t) = (1 - s, s), (1 - tau, tau)
      else:
        (al_s, sg_s), (al_t, sg_t) = ((np.sqrt(abar[s]), np.sqrt(1 - abar[s])),
                                      (np.sqrt(abar[tau]), np.sqrt(1 - abar[tau])))
      a, b = _kernel_coeffs(family, s, tau, sched)
      # Given x0: E = a alpha_s x0, Var = a^2 sigma_s^2 + b^2 must be alpha_tau x0, sigma_tau^2.
      np.testing.assert_allclose(a * al_s, al_t, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(a * a * sg_s ** 2 + b * b, sg_t ** 2, rtol=1e-12, atol=1e-14)
      # Monte Carlo with x0 from a two-point mixture: E x_tau = alpha_tau E x0,
      # Var x_tau = alpha_tau^2 Var x0 + sigma_tau^2, Cov(x_tau, x_s) = a Var x_s.
      n = 200_000
      key, k0, k1, k2 = jax.random.split(key, 4)
      x0 = jnp.where(jax.random.bernoulli(k0, 0.3, (n, 1)), 2.0, -0.5).astype(jnp.float64)
      x_s = kernels.q_sample(x0, jax.random.normal(k1, (n, 1), jnp.float64), al_s, sg_s)
      if family == "flow":
        x_tau = kernels.flow_renoise(x_s, jax.random.normal(k2, (n, 1), jnp.float64),
                                     jnp.float64(s), jnp.float64(tau))
      else:
        x_tau = kernels.vp_renoise(x_s, jax.random.normal(k2, (n, 1), jnp.float64), sched, s,
                                   tau)
      assert x_tau.dtype == jnp.float64
      x0n, xs, xt = (np.asarray(v)[:, 0] for v in (x0, x_s, x_tau))
      mean_w, var_w = al_t * x0n.mean(), al_t ** 2 * x0n.var() + sg_t ** 2
      se = np.sqrt(var_w / n)
      assert abs(xt.mean() - mean_w) < 5 * se, (s, tau, xt.mean(), mean_w)
      assert abs(xt.var() / var_w - 1) < 5 * np.sqrt(2.0 / n) * 2, (s, tau, xt.var(), var_w)
      cov = np.mean((xt - xt.mean()) * (xs - xs.mean()))
      assert abs(cov - a * xs.var()) < 5 * np.sqrt(var_w * xs.var() / n), (s, tau)


def test_sample_tau_ranges():
  key = jax.random.key(1)
  lo = jnp.asarray([0.0, 0.5, 0.9])
  sig = tdm.sample_tau(key, (1000, 3), lo, 1.0)
  assert bool(jnp.all(sig >= lo)) and bool(jnp.all(sig < 1.0))
  assert float(jnp.min(sig[:, 1])) < 0.51 and float(jnp.max(sig[:, 1])) > 0.99
  t = tdm.sample_tau(key, (4000,), 300, 999, integer=True)
  assert t.dtype == jnp.int32 and int(t.min()) == 300 and int(t.max()) == 999


# ------------------------------------------------------------------------------ fake-score loss


@pytest.mark.parametrize("family", ["flow", "vp"])
def test_fake_score_loss_target_value_and_gradient(rng, family):
  b, d = 5, 7
  x_next = rng.normal(size=(b, d))
  x0_hat = rng.normal(size=(b, d))
  eps = rng.normal(size=(b, d))
  if family == "flow":
    sig_n, sig_tau = np.full(b, 0.4), rng.uniform(0.4, 1.0, b)
    (al_n, sg_n), (al_t, sg_t), ptype = (1 - sig_n, sig_n), (1 - sig_tau, sig_tau), "flow"
  else:
    sched, abar = _vp_schedule()
    t_n, t_tau = np.full(b, 249), rng.integers(249, 1000, b)
    al_n, sg_n = np.sqrt(abar[t_n]), np.sqrt(1 - abar[t_n])
    al_t, sg_t = np.sqrt(abar[t_tau]), np.sqrt(1 - abar[t_tau])
    ptype = "epsilon"
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  x_tau, target = tdm.renoised_target(f32(x_next), f32(x0_hat), f32(eps), f32(al_n), f32(sg_n),
                                      f32(al_t), f32(sg_t), ptype)
  aa = al_t / al_n
  x_tau_np = aa[:, None] * x_next + np.sqrt(sg_t ** 2 - (aa * sg_n) ** 2)[:, None] * eps
  np.testing.assert_allclose(x_tau, x_tau_np, rtol=1e-5, atol=1e-5)
  if family == "flow":  # docs/methods.md §4: v = (x_tau - x0_hat) / sig_tau
    tgt_np = (x_tau_np - x0_hat) / sig_tau[:, None]
  else:  # eps = (x_tau - alpha_tau x0_hat) / sigma_tau
    tgt_np = (x_tau_np - al_t[:, None] * x0_hat) / sg_t[:, None]
  np.testing.assert_allclose(target, tgt_np, rtol=1e-4, atol=1e-4)

  out_fake = rng.normal(size=(b, d))
  out_ref = rng.normal(size=(b, d))
  fn = lambda o: tdm.fake_score_loss(o, f32(out_ref), x_tau, f32(x0_hat), f32(al_t), f32(sg_t),
                                     ptype)[0]
  loss, grad = jax.value_and_grad(fn)(f32(out_fake))
  tgt = np.asarray(target, np.float64)
  want = np.mean(np.mean((out_fake - tgt) ** 2, 1) + 0.02 * np.mean((out_fake - out_ref) ** 2, 1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  want_grad = 2.0 / (b * d) * ((out_fake - tgt) + 0.02 * (out_fake - out_ref))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  # The loss is minimised exactly by the target when the reference agrees with it.
  assert float(fn(target)) > 0.0 and abs(float(tdm.fake_score_loss(
      target, target, x_tau, f32(x0_hat), f32(al_t), f32(sg_t), ptype)[0])) < 1e-10


# ------------------------------------------------------------------------------ generator targets


def test_generator_targets_have_the_formula_gradients(rng):
  """dL_G / dx0_hat = -[w_cfg 3.5 (c - u) / w_ref + w_rew (phi - ref_rew) / w_phi
  + w_kl (c - fake) / w_ref] / B, with the normalisers held constant."""
  b, shape = 4, (3, 5)
  x = {k: rng.normal(size=(b, *shape)) for k in
       ["x0_hat", "cond", "uncond", "fake", "phi", "ref_rew"]}
  cfg = x["uncond"] + 4.5 * (x["cond"] - x["uncond"])
  f32 = lambda v: jnp.asarray(v, jnp.float32)

  def loss(x0, **w):
    return tdm_r1.generator_loss(x0, x0_ref_cond=f32(x["cond"]), x0_ref_uncond=f32(x["uncond"]),
                                 x0_ref_cfg=f32(cfg), x0_fake=f32(x["fake"]),
                                 x0_phi_cfg=f32(x["phi"]), x0_ref_rew=f32(x["ref_rew"]), **w)

  w_ref = np.mean(np.abs(x["x0_hat"] - cfg), axis=(1, 2), keepdims=True)
  w_phi = np.mean(np.abs(x["x0_hat"] - x["phi"]), axis=(1, 2), keepdims=True)
  d_kl = (x["cond"] - x["fake"]) / w_ref
  d_cfg = 3.5 * (x["cond"] - x["uncond"]) / w_ref
  d_rew = (x["phi"] - x["ref_rew"]) / w_phi
  for weights in [{}, dict(w_kl=0.0, w_cfg=1.0, w_rew=0.0), dict(w_kl=0.0, w_cfg=0.0, w_rew=2.0)]:
    wk, wc, wr = weights.get("w_kl", 1.0), weights.get("w_cfg", 0.3), weights.get("w_rew", 0.7)
    (val, m), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(f32(x["x0_hat"]),
                                                                     **weights)
    want = -(wk * d_kl + wc * d_cfg + wr * d_rew) / b
    np.testing.assert_allclose(grad, want, rtol=2e-4, atol=1e-6)
    half_sq = lambda d: 0.5 * np.mean(np.sum(d ** 2, axis=(1, 2)))
    np.testing.assert_allclose(m["loss_kl"], half_sq(d_kl), rtol=1e-4)
    np.testing.assert_allclose(m["loss_cfg"], half_sq(d_cfg), rtol=1e-4)
    np.testing.assert_allclose(m["loss_rew"], half_sq(d_rew), rtol=1e-4)
    np.testing.assert_allclose(val, wk * half_sq(d_kl) + wc * half_sq(d_cfg)
                               + wr * half_sq(d_rew), rtol=1e-4)
  # TDM's own target is the KL term: dm_loss with the CFG normaliser gives the same gradient.
  g_dm = jax.grad(lambda x0: tdm.dm_loss(x0, f32(x["cond"]), f32(x["fake"]), f32(cfg))[0])(
      f32(x["x0_hat"]))
  np.testing.assert_allclose(g_dm, -d_kl / b, rtol=2e-4, atol=1e-6)


def _gauss_post_x0(x_tau, alpha, sigma, m, c):
  """E[x0 | x_tau] for x0 ~ N(m, c^2), x_tau = alpha x0 + sigma eps (elementwise)."""
  return m + alpha * c ** 2 / (alpha ** 2 * c ** 2 + sigma ** 2) * (x_tau - alpha * m)


@pytest.mark.parametrize("family", ["flow", "vp"])
def test_dm_gradient_zero_for_perfect_student_and_kl_descent_otherwise(family):
  """Gaussian world, float64: data N(mu, s^2) per dim; the student's last step (boundary
  sig = 1 to 0, flow or VP-eps output) maps x_T to x0_hat = m + c x_T. The fake score is the
  student's true posterior mean E[x0_hat | x_tau] (the minimiser of the fake loss), the
  reference the data's. At (m, c) = (mu, s) the DM gradient vanishes (to float64 rounding);
  elsewhere the batch gradient is parallel to grad KL(p_student,tau || p_data,tau) and a step
  along it lowers that KL."""
  with jax.enable_x64(True):
    _dm_gaussian_check(family)


def _dm_gaussian_check(family):
  mu, s = 0.7, 1.3
  b, d = 64, 256
  k1, k2 = jax.random.split(jax.random.key(3))
  x_T = jax.random.normal(k1, (b, d), jnp.float64)
  eps = jax.random.normal(k2, (b, d), jnp.float64)
  if family == "flow":
    sig = 0.6
    alpha, sigma, ptype, a_T, s_T = 1 - sig, sig, "flow", 0.0, 1.0
  else:
    _, abar = _vp_schedule()
    alpha, sigma, ptype = float(np.sqrt(abar[600])), float(np.sqrt(1 - abar[600])), "epsilon"
    a_T, s_T = float(np.sqrt(abar[999])), float(np.sqrt(1 - abar[999]))

  def dm(theta):
    m, c = theta
    x0_target = m + c * x_T
    x_t = a_T * x0_target + s_T * x_T  # a state whose clean estimate is m + c x_T
    out = param.x0_to_output(x0_target, x_t, a_T, s_T, ptype)
    x_next, x0_hat, _ = tdm.student_step(out, x_t, a_T, s_T, 1.0, 0.0, ptype)
    x_tau, _ = tdm.renoised_target(x_next, x0_hat, eps, 1.0, 0.0, alpha, sigma, ptype)
    x0_fake = _gauss_post_x0(x_tau, alpha, sigma, jax.lax.stop_gradient(m),
                             jax.lax.stop_gradient(c))
    x0_ref = _gauss_post_x0(x_tau, alpha, sigma, mu, s)
    return tdm.dm_loss(x0_hat, x0_ref, x0_fake)[0]

  def kl(theta):  # KL of the tau-marginals, per dim times d
    m, c = theta
    v1, v2 = alpha ** 2 * c ** 2 + sigma ** 2, alpha ** 2 * s ** 2 + sigma ** 2
    return d * 0.5 * (v1 / v2 + (alpha * (m - mu)) ** 2 / v2 - 1 + jnp.log(v2 / v1))

  grad_dm, kl_and_grad = jax.jit(jax.grad(dm)), jax.jit(jax.value_and_grad(kl))
  g0 = np.asarray(grad_dm(jnp.asarray([mu, s], jnp.float64)))
  assert g0.dtype == np.float64
  for theta in ([0.2, 1.3], [0.7, 0.6], [1.5, 2.0]):
    theta = jnp.asarray(theta, jnp.float64)
    g, (kl0, gk) = np.asarray(grad_dm(theta)), kl_and_grad(theta)
    assert np.max(np.abs(g0)) < 1e-10 * np.linalg.norm(g), (g0, g)
    cos = float(np.dot(g, gk) / (np.linalg.norm(g) * np.linalg.norm(gk)))
    assert cos > 0.999, (theta, g, gk)
    assert float(kl_and_grad(theta - 0.05 * g / np.linalg.norm(g))[0]) < float(kl0)


def test_dm_gradient_zero_when_fake_equals_ref_through_student():
  """Full TDM generator path with callables (student step, re-noise, fake and reference
  networks): identical fake and reference networks give a zero gradient on the
  student's parameters, a different fake a nonzero one."""
  key = jax.random.key(4)
  kw, kr, kf, kx, ke = jax.random.split(key, 5)
  d = 6
  student = {"w": jax.random.normal(kw, (d, d)) * 0.3}
  ref = {"w": jax.random.normal(kr, (d, d)) * 0.3}
  other = {"w": jax.random.normal(kf, (d, d)) * 0.3}
  net = lambda p, x, sig: jnp.tanh(x @ p["w"]) * (1 + sig[:, None])
  x_t = jax.random.normal(kx, (8, d))
  eps = jax.random.normal(ke, (8, d))
  sig_t, sig_n, sig_tau = jnp.full((8,), 0.8), jnp.full((8,), 0.55), jnp.full((8,), 0.7)

  def loss(p_student, p_fake):
    v = net(p_student, x_t, sig_t)
    x_next, x0_hat, _ = tdm.student_step(v, x_t, 1 - sig_t, sig_t, 1 - sig_n, sig_n, "flow")
    x_tau, _ = tdm.renoised_target(x_next, x0_hat, eps, 1 - sig_n, sig_n, 1 - sig_tau, sig_tau,
                                   "flow")
    x0 = lambda p: param.to_x0(net(p, x_tau, sig_tau), x_tau, 1 - sig_tau, sig_tau, "flow")
    return tdm.dm_loss(x0_hat, x0(ref), x0(p_fake))[0]

  grad = jax.jit(jax.grad(loss))
  g_same, g_diff = grad(student, ref), grad(student, other)
  # zero up to float32 rounding (exactly 0 when XLA computes x0(ref) once; ~3e-8 at LLVM -O0)
  assert float(jnp.max(jnp.abs(g_same["w"]))) < 1e-6
  assert float(jnp.max(jnp.abs(g_diff["w"]))) > 1e-4


# ------------------------------------------------------------------------------ DGPO


def test_boundary_sampling_and_group_shared_noise():
  p = tdm_r1.boundary_probs(4)
  np.testing.assert_allclose(p, [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
  j = tdm_r1.sample_boundary(jax.random.key(0), 4, (40_000,))
  freq = np.bincount(np.asarray(j), minlength=4) / 40_000
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)
  np.testing.assert_allclose(tdm_r1.boundary_weight(jnp.arange(4)), [0.25, 0.5, 0.75, 1.0])
  ids = jnp.asarray([0, 0, 1, 1, 1, 2])
  z = tdm_r1.group_shared_normal(jax.random.key(1), ids, 3, (2, 3))
  assert z.shape == (6, 2, 3)
  assert bool(jnp.all(z[0] == z[1])) and bool(jnp.all(z[2] == z[4]))
  assert not bool(jnp.allclose(z[1], z[2]))
  tau = tdm_r1.group_shared_uniform(jax.random.key(2), ids, 3, 0.3)
  assert float(tau[2]) == float(tau[3]) == float(tau[4]) and float(tau[0]) != float(tau[5])
  assert bool(jnp.all((tau >= 0.3) & (tau < 1.0)))


def _np_dgpo_grad(l_phi, l_ref, l_old, d, adv, ids, beta, clip, thr, j, k=4):
  """NumPy: masks and dL/dl_phi, dL/d(anchor_dist) of the DGPO loss."""
  n = len(l_phi)
  s = np.zeros(n)
  for g in np.unique(ids):
    m = ids == g
    s[m] = np.sum(adv[m] * beta * (l_phi[m] - l_ref[m])) / m.sum()
  r = np.exp(l_old - l_phi)
  trust = ((adv > 0) & (r > 1 + clip)) | ((adv < 0) & (r < 1 - clip))
  anchor = (d > thr) & (adv * (l_ref - l_phi) > 0)
  scale = (j + 1) / k
  g_l = np.where(trust | anchor, 0.0, scale / (1 + np.exp(-s)) * adv / n)
  return trust, anchor, g_l, np.full(n, scale * 1e-3 / n)


def test_dgpo_clips_detach_exactly_the_formula_samples(rng):
  """Hand-built cases for each branch, plus random ones: the gradient through l_phi is zero
  exactly for the samples each clip names and equals sigmoid(S_g) A_i (j'+1)/4 / B otherwise."""
  c, thr = 1e-3, 0.05
  #           A     l_old - l_phi   d     l_ref - l_phi   -> trust, anchor
  cases = [(+1.0, 2e-3, 0.01, -0.1),   # A>0, r > 1+c: trust
           (+1.0, -2e-3, 0.01, -0.1),  # A>0, r < 1-c: kept (wrong direction is not clipped)
           (-1.0, -2e-3, 0.01, 0.1),   # A<0, r < 1-c: trust
           (-1.0, 2e-3, 0.01, 0.1),    # A<0, r > 1+c: kept
           (+1.0, 5e-4, 0.01, -0.1),   # inside the trust region: kept
           (+1.0, 0.0, 0.10, 0.1),     # far from ref, moved with A>0: anchor
           (+1.0, 0.0, 0.10, -0.1),    # far, moved against A: kept
           (-1.0, 0.0, 0.10, -0.1),    # far, moved with A<0: anchor
           (-1.0, 0.0, 0.04, -0.1),    # moved with A but within 0.05: kept
           (0.0, 2e-3, 0.10, 0.1)]     # A = 0: never clipped, zero gradient
  adv = np.array([cc[0] for cc in cases])
  l_phi = rng.uniform(0.5, 1.5, len(cases))
  l_old = l_phi + np.array([cc[1] for cc in cases])
  d = np.array([cc[2] for cc in cases])
  l_ref = l_phi + np.array([cc[3] for cc in cases])
  ids = np.repeat(np.arange(5), 2)
  want_trust = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], bool)
  want_anchor = np.array([0, 0, 0, 0, 0, 1, 0, 1, 0, 0], bool)
  r_adv = rng.normal(size=30)
  r_lphi = rng.uniform(0.5, 1.5, 30)
  rand = dict(adv=r_adv, l_phi=r_lphi, l_old=r_lphi + rng.normal(scale=2e-3, size=30),
              d=rng.uniform(0.0, 0.1, 30), l_ref=r_lphi + rng.normal(scale=0.1, size=30),
              ids=np.repeat(np.arange(5), 6))
  hand = dict(adv=adv, l_phi=l_phi, l_old=l_old, d=d, l_ref=l_ref, ids=ids)
  for case, j in ((hand, 3), (rand, 1)):
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    case32 = {k: np.asarray(f32(v), np.float64) if k != "ids" else v for k, v in case.items()}
    trust, anchor, g_l, g_d = _np_dgpo_grad(case32["l_phi"], case32["l_ref"], case32["l_old"],
                                            case32["d"], case32["adv"], case32["ids"], 10.0, c,
                                            thr, j)
    fn = lambda lp, dd: tdm_r1.dgpo_loss(lp, f32(case["l_ref"]), f32(case["l_old"]), dd,
                                         f32(case["adv"]), jnp.asarray(case["ids"]),
                                         int(case["ids"].max()) + 1, boundary=j, beta=10.0,
                                         clip=c, anchor_threshold=thr)
    (_, m), (gl, gd) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        f32(case["l_phi"]), f32(case["d"]))
    np.testing.assert_array_equal(m["trust_clipped"], trust)
    np.testing.assert_array_equal(m["anchor_clipped"], anchor)
    if case is hand:
      np.testing.assert_array_equal(trust, want_trust)
      np.testing.assert_array_equal(anchor, want_anchor)
    detached = trust | anchor
    assert np.all(np.asarray(gl)[detached] == 0.0)
    live = ~detached & (case["adv"] != 0)
    assert np.all(np.abs(np.asarray(gl)[live]) > 0)
    np.testing.assert_allclose(gl, g_l, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(gd, g_d, rtol=1e-6)  # the 1e-3 anchor term stays live for all
    if case is rand:
      assert 0 < detached.sum() < 30  # the random case exercises both outcomes


def test_dgpo_anchor_reduce_batch_compares_the_mean_distance(rng):
  """anchor_reduce="batch" (the authors' trainer): the anchor clip compares the batch mean of
  |v_phi - v_ref|^2 with the threshold, so it detaches every sample moved in its advantage's
  direction once the mean passes it, and none before; "sample" looks at each sample's own."""
  n = 8
  adv = jnp.asarray(np.tile([1.0, -1.0], n // 2), jnp.float32)
  l_phi = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
  l_ref = l_phi + 0.1 * adv                           # every sample moved with its advantage
  d = jnp.asarray([0.2] + [0.01] * (n - 1), jnp.float32)   # one far sample, mean 0.034
  kw = dict(clip=1.0, anchor_threshold=0.05)
  ids = jnp.arange(n) // 2
  m_s = tdm_r1.dgpo_loss(l_phi, l_ref, l_phi, d, adv, ids, n // 2, **kw)[1]
  m_b = tdm_r1.dgpo_loss(l_phi, l_ref, l_phi, d, adv, ids, n // 2, anchor_reduce="batch", **kw)[1]
  np.testing.assert_array_equal(m_s["anchor_clipped"], np.arange(n) == 0)
  assert not np.any(m_b["anchor_clipped"])
  m_b = tdm_r1.dgpo_loss(l_phi, l_ref, l_phi, d * 2, adv, ids, n // 2, anchor_reduce="batch",
                         **kw)[1]                       # mean 0.0675 > 0.05
  assert np.all(m_b["anchor_clipped"])


def test_dgpo_surrogate_gradient_is_the_group_dpo_gradient(rng):
  """Without clips, the surrogate's gradient is the gradient of the group DPO objective
  sum_g -log sigmoid(-S_g) with S_g = beta sum_{i in g} A_i (l_phi,i - l_ref,i) / K_g (the
  implicit reward of sample i being -beta (l_phi,i - l_ref,i)), up to the constant
  beta B / K_g; the (j' + 1) / 4 factor scales it."""
  beta, groups, k = 3.0, 4, 5
  b = groups * k
  ids = jnp.repeat(jnp.arange(groups), k)
  l_phi = jnp.asarray(rng.uniform(0.5, 1.5, b), jnp.float32)
  l_ref = l_phi + jnp.asarray(rng.normal(scale=0.3, size=b), jnp.float32)
  adv = jnp.asarray(rng.normal(size=b), jnp.float32)

  def dpo(lp):
    s = jax.ops.segment_sum(adv * beta * (lp - l_ref), ids, groups) / k
    return jnp.sum(-jax.nn.log_sigmoid(-s))

  g_dpo = jax.grad(dpo)(l_phi)
  for j in (0, 3):
    g = jax.grad(lambda lp: tdm_r1.dgpo_loss(lp, l_ref, l_phi, jnp.zeros(b), adv, ids, groups,
                                             boundary=j, beta=beta)[0])(l_phi)
    np.testing.assert_allclose(g * beta * b / k / ((j + 1) / 4), g_dpo, rtol=1e-5, atol=1e-7)


def test_dgpo_step_lowers_denoising_loss_of_high_advantage_samples():
  """Tiny flow network phi = ref = old; one SGD step on the DGPO loss lowers the denoising loss
  of high-advantage samples relative to low-advantage ones (measured on the same x_tau')."""
  d, hidden, groups, k = 8, 32, 3, 6
  b = groups * k
  keys = jax.random.split(jax.random.key(5), 8)
  params = {"w1": jax.random.normal(keys[0], (d + 1, hidden)) / np.sqrt(d + 1),
            "w2": jax.random.normal(keys[1], (hidden, d)) / np.sqrt(hidden),
            "b2": jnp.zeros((d,))}

  def net(p, x, sig):
    h = jnp.tanh(jnp.concatenate([x, sig[:, None]], 1) @ p["w1"])
    return h @ p["w2"] + p["b2"]

  ids = jnp.repeat(jnp.arange(groups), k)
  # Stored boundary j' = 3 (the clean sample: x_{j'+1} = x0_hat = x0, t_{j'+1} = 0).
  x0 = jax.random.normal(keys[2], (b, d))
  rewards = jax.random.normal(keys[3], (b,))
  adv = common.group_advantages(rewards, ids, groups, clip=5.0)
  eps = tdm_r1.group_shared_normal(keys[4], ids, groups, (d,))
  sig = tdm_r1.group_shared_uniform(keys[5], ids, groups, 0.3)
  x_tau, target = tdm.renoised_target(x0, x0, eps, 1.0, 0.0, 1 - sig, sig, "flow")
  ref_out = net(params, x_tau, sig)

  def loss(p):
    l_phi, l_ref, l_old, dist = tdm_r1.surrogate_losses(net(p, x_tau, sig), ref_out, ref_out,
                                                        target)
    return tdm_r1.dgpo_loss(l_phi, l_ref, l_old, dist, adv, ids, groups, boundary=3, beta=1.0)

  (_, m), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert not bool(jnp.any(m["trust_clipped"])) and not bool(jnp.any(m["anchor_clipped"]))
  before = common.mean_sq_dist(ref_out, target)
  new = jax.tree.map(lambda p, gg: p - 0.5 * gg, params, g)
  after = common.mean_sq_dist(net(new, x_tau, sig), target)
  dl = np.asarray(after - before)
  a = np.asarray(adv)
  hi, lo = a > 0.5, a < -0.5
  assert hi.sum() >= 3 and lo.sum() >= 3
  assert dl[hi].mean() < 0.0 < dl[lo].mean(), (dl[hi], dl[lo])
  assert np.corrcoef(a, dl)[0, 1] < -0.5
  # The same step with the advantages negated moves the losses the other way.
  adv_neg = -adv
  g_neg = jax.jit(jax.grad(lambda p: tdm_r1.dgpo_loss(
      *tdm_r1.surrogate_losses(net(p, x_tau, sig), ref_out, ref_out, target), adv_neg, ids,
      groups, boundary=3)[0]))(params)
  new_neg = jax.tree.map(lambda p, gg: p - 0.5 * gg, params, g_neg)
  dl_neg = np.asarray(common.mean_sq_dist(net(new_neg, x_tau, sig), target) - before)
  assert dl_neg[hi].mean() > dl_neg[lo].mean()


# ------------------------------------------------------------------------------ config sections


def test_tdm_config_sections_validate_and_name_the_bad_key():
  from didr_jax.errors import ConfigError
  from didr_jax.losses.common import SnapshotSchedule
  from didr_jax.train.tdm_config import tdm_section, tdmr1_section, validate_tdm_section
  assert validate_tdm_section(tdm_section()) == {}
  d = tdmr1_section()
  assert validate_tdm_section(d) == {"old": SnapshotSchedule(0.25, 0.005, 0.999, 0)}
  assert (d.w_kl, d.w_cfg, d.w_rew, d.cfg_reward_scale, d.fake_ref_weight) == (1.0, 0.3, 0.7,
                                                                                -1.0, 0.02)
  for key, value in [("boundaries_per_iter", 5), ("trust_clip", 0.0),
                     ("t_min_reward", 1.0), ("ema_decay", 1.0),
                     ("cfg_reward_scale", 3.5), ("rew_ref_cfg", False)]:
    bad = tdmr1_section()
    bad[key] = value
    with pytest.raises(ConfigError, match=rf"^config\.tdm\.{key}: "):
      validate_tdm_section(bad)
  bad = tdmr1_section()
  bad.old.end = 1.5
  with pytest.raises(ConfigError, match=r"^config\.tdm\.old: end"):
    validate_tdm_section(bad)


def test_student_step_clips_x0_as_ddim_clip_sample(rng):
  """clip_range clips x0_hat before the step and keeps eps_hat, as ddim.ddim_mean_std does with
  a clip_sample schedule (float64 NumPy reference)."""
  x = rng.normal(size=(2, 4, 4, 3))
  out = 3.0 * rng.normal(size=(2, 4, 4, 3))
  a, s, a2, s2 = 0.1, float(np.sqrt(1 - 0.01)), 0.5, float(np.sqrt(1 - 0.25))
  with jax.enable_x64(True):
    x_next, x0_hat, eps_hat = tdm.student_step(jnp.asarray(out), jnp.asarray(x), a, s, a2, s2,
                                               "epsilon", 1.0)
  x0 = np.clip((x - s * out) / a, -1.0, 1.0)
  assert np.mean(np.abs((x - s * out) / a) > 1.0) > 0.5          # most entries were clipped
  np.testing.assert_allclose(np.asarray(x0_hat), x0, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(eps_hat), out, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(x_next), a2 * x0 + s2 * out, rtol=1e-12)


@pytest.mark.parametrize("name", ["toy_tdmr1", "tdmr1_sdxl", "tdmr1_zimage"])
def test_every_shipped_tdmr1_config_distils_toward_its_teacher_cfg(name, rng):
  """At phi = ref (the surrogate's start) the gradient of TDM-R1's generator loss equals w_kl
  times TDM's DM gradient toward the teacher at ``tdm.ref_cfg``, for the scale the config gives
  the trainer (``cfg_reward_scale``). With the literal 3.5 the real configs pulled toward
  CFG 2.05 (this test fails for them: checked below)."""
  import importlib.util
  from didr_jax.errors import ConfigError
  from didr_jax.train.tdm_config import cfg_reward_scale
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  d = module.get_config().tdm
  shape = (3, 4, 4, 2)
  x0_hat, ref_c, ref_u, fake = (jnp.asarray(rng.normal(size=shape)) for _ in range(4))
  phi_c, phi_u = ref_c, ref_u                                   # phi = ref
  w = float(d.ref_cfg)

  def grad_r1(s):
    cfg = lambda u, c, scale: u + scale * (c - u)
    return jax.grad(lambda x: tdm_r1.generator_loss(
        x, x0_ref_cond=ref_c, x0_ref_uncond=ref_u, x0_ref_cfg=cfg(ref_u, ref_c, w),
        x0_fake=fake, x0_phi_cfg=cfg(phi_u, phi_c, float(d.surrogate_cfg)),
        x0_ref_rew=cfg(ref_u, ref_c, float(d.surrogate_cfg)), cfg_scale=s, w_kl=float(d.w_kl),
        w_cfg=float(d.w_cfg), w_rew=float(d.w_rew))[0])(x0_hat)

  ref_cfg = ref_u + w * (ref_c - ref_u)
  want = float(d.w_kl) * jax.grad(lambda x: tdm.dm_loss(x, ref_cfg, fake)[0])(x0_hat)
  np.testing.assert_allclose(grad_r1(cfg_reward_scale(d)), want, rtol=1e-5, atol=1e-7)
  assert float(np.max(np.abs(grad_r1(3.5) - want))) > 1e-3 * float(np.max(np.abs(want)))
  d.cfg_reward_scale = 3.5
  with pytest.raises(ConfigError, match=r"^config\.tdm\.cfg_reward_scale: 3\.5 pulls toward CFG"):
    cfg_reward_scale(d)
