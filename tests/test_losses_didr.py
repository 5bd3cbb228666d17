"""DIDR / DI / DI++ losses (didr_jax/losses/didr.py) against closed forms on Gaussian problems,
float64 NumPy references and central finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from didr_jax.diffusion import param
from didr_jax.diffusion.schedules import VPSchedule
from didr_jax.losses import didr

BETAS = np.linspace(1e-4, 0.02, 1000)   # DDPM's linear schedule
M = np.array([0.5, -0.3])
S = np.array([[1.0, 0.6], [0.6, 0.8]])
B_VEC = np.array([1.0, -0.5])


def _process(kind: str) -> didr.Process:
  """flow, or the linear-beta VP schedule. v-prediction uses alpha^2 + sigma^2 = 1, which the
  float32 table of ``VPSchedule`` meets only to ~1e-7, so for it the same schedule is tabulated
  in float64 (call inside ``jax.enable_x64``) to keep the checks exact."""
  if kind == "flow":
    return didr.flow_process()
  vp = didr.vp_process(VPSchedule.from_betas(BETAS, prediction_type=kind))
  if kind != "v_prediction":
    return vp
  abar = jnp.asarray(np.cumprod(1.0 - BETAS))
  return didr.Process(alpha_sigma=lambda t: (jnp.sqrt(abar[t]), jnp.sqrt(1.0 - abar[t])),
                      prediction_type=kind, integer_time=True, sample_time=vp.sample_time)


def _times(kind: str, n: int = 5):
  """n times spread over the process: VP integer timesteps, flow sigmas."""
  if kind == "flow":
    return jnp.asarray(np.linspace(0.02, 0.98, n))
  return jnp.asarray(np.linspace(20, 980, n).round().astype(np.int32))


def _coeffs(process, t, dtype):
  a, s = process.alpha_sigma(t)
  return jnp.asarray(a, dtype), jnp.asarray(s, dtype)


def gaussian_denoiser(m, cov, process):
  """The exact (Tweedie) denoiser of N(m, cov) in the process's prediction type:
  x0_hat = m + a cov (a^2 cov + s^2 I)^{-1} (x_t - a m)."""
  def fn(x, t):
    a, s = _coeffs(process, jnp.broadcast_to(t, x.shape[:1]), x.dtype)
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    c = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * eye
    y = jnp.linalg.solve(c, (x - a[:, None] * m)[..., None])[..., 0]
    x0 = m + a[:, None] * y @ cov.T
    return param.x0_to_output(x0, x, a, s, process.prediction_type)
  return fn


def exact_drs(x_t, t, process, b, reward_scale):
  """Closed-form DRS of a linear reward b.x on N(m, S): (a^2 S + s^2 I)^{-1} a S b / beta."""
  a, s = (np.asarray(v, np.float64) for v in _coeffs(process, t, jnp.float64))
  out = []
  for ai, si in zip(a, s):
    c = ai ** 2 * S + si ** 2 * np.eye(2)
    out.append(np.linalg.solve(c, ai * S @ b) * reward_scale)
  return np.stack(out)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_drp_k1_is_the_exact_diffused_reward_score(kind):
  """Gaussian reference, linear reward: the K = 1 DRP with the exact Tweedie denoiser equals the
  closed-form DRS at every t, and s_ref + s_r is the score of the diffused tilted target."""
  with jax.enable_x64(True):
    process = _process(kind)
    t = _times(kind)
    x_t = jnp.asarray(np.random.default_rng(0).normal(size=(t.shape[0], 2)) * 1.5)
    lam = 2.5
    ref = gaussian_denoiser(jnp.asarray(M), jnp.asarray(S), process)
    s_r, metrics = didr.diffused_reward_score(ref, lambda x: x @ jnp.asarray(B_VEC), x_t, t,
                                              process, reward_scale=lam, num_steps=1)
    assert s_r.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(s_r), exact_drs(x_t, t, process, B_VEC, lam),
                               rtol=1e-10, atol=1e-12)
    # s_ref + DRS = score of N(a m*, a^2 S + s^2 I), m* = m + S b / beta.
    a, s = _coeffs(process, t, jnp.float64)
    s_ref = param.score_from_output(ref(x_t, t), x_t, a, s, process.prediction_type)
    tilted = gaussian_denoiser(jnp.asarray(M + lam * S @ B_VEC), jnp.asarray(S), process)
    s_tilted = param.score_from_output(tilted(x_t, t), x_t, a, s, process.prediction_type)
    np.testing.assert_allclose(np.asarray(s_ref + s_r), np.asarray(s_tilted), rtol=1e-9,
                               atol=1e-10)
    # t_max zeroes the DRS at later times only.
    t_max = t[2]
    s_cut, _ = didr.diffused_reward_score(ref, lambda x: x @ jnp.asarray(B_VEC), x_t, t, process,
                                          reward_scale=lam, num_steps=1, t_max=t_max)
    keep = np.asarray(t <= t_max)
    np.testing.assert_array_equal(np.asarray(s_cut)[keep], np.asarray(s_r)[keep])
    assert np.all(np.asarray(s_cut)[~keep] == 0.0) and keep.sum() == 3


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
def test_ancestral_drp_is_exact_for_any_k_and_ddim_is_not(kind):
  """Gaussian reference, linear reward, exact denoiser: with eta = 1 (DDPM posterior steps) the
  K-step DRP equals the exact DRS for every K (the chain's mean map is the posterior mean, by the
  tower rule, and its Jacobian does not depend on the noise); with eta = 0 (DDIM / Euler) K >= 2
  overshoots, increasingly with t (x0 Jacobian of the ODE map instead of the posterior mean)."""
  with jax.enable_x64(True):
    process = _process(kind)
    t = _times(kind)
    x_t = jnp.asarray(np.random.default_rng(5).normal(size=(t.shape[0], 2)))
    ref = gaussian_denoiser(jnp.asarray(M), jnp.asarray(S), process)
    exact = exact_drs(x_t, t, process, B_VEC, 1.0)
    cases = [(eta, k) for eta in (0.0, 1.0) for k in (2, 3)]

    @jax.jit
    def all_cases(x):
      return [didr.diffused_reward_score(
          ref, lambda y: y @ jnp.asarray(B_VEC), x, t, process, num_steps=k, eta=eta,
          num_draws=2, rng=jax.random.key(k))[0] for eta, k in cases]
    ratios = {}
    for (eta, k), s_r in zip(cases, all_cases(x_t)):
      ratios[eta, k] = np.linalg.norm(s_r, axis=1) / np.linalg.norm(exact, axis=1)
      if eta == 1.0:
        np.testing.assert_allclose(np.asarray(s_r), exact, rtol=1e-9, atol=1e-12)
    # eta = 0: exact only in the small-noise limit; at the largest t off by > 10x (VP K=2: ~36x,
    # flow K=2: ~24x), and more so with more steps.
    assert np.all(ratios[0.0, 2] > 1.0) and ratios[0.0, 2][-1] > 10, ratios
    assert np.all(ratios[0.0, 3] >= ratios[0.0, 2]), ratios


def _mlp_denoiser(xp, rng_seed: int = 1):
  """A small nonlinear denoiser out = tanh(x W1 + alpha u) W2 + 0.1 x, written for both NumPy
  (the float64 reference) and jax.numpy; ``alpha_of`` maps t to alpha."""
  r = np.random.default_rng(rng_seed)
  w1, u, w2 = r.normal(size=(2, 8)), r.normal(size=(8,)), r.normal(size=(8, 2)) * 0.5

  def fn(x, alpha):
    return xp.tanh(x @ w1 + alpha[:, None] * u) @ w2 + 0.1 * x
  return fn


def _reward(xp):
  return lambda x: xp.sum(xp.sin(1.3 * x), axis=-1) + 0.5 * xp.tanh(x[:, 0] * x[:, 1])


def _np_drp_objective(x, t, kind, lam, *, noise=None, eta=0.0, mode="softmax"):
  """NumPy float64 reference of the K = 2 DRP objective F(x) (didr module docstring)."""
  net, reward = _mlp_denoiser(np), _reward(np)
  if kind == "flow":
    ts = [t, t / 2]
    coeff = [(1 - tk, tk) for tk in ts]
  else:
    # The schedule's float32 coefficients (kernels.vp_alpha_sigma takes its sqrt in float32).
    abar = np.asarray(VPSchedule.from_betas(BETAS).alphas_cumprod, np.float32)
    ts = [t, np.round(t / 2).astype(np.int64)]
    coeff = [(np.sqrt(abar[tk]).astype(np.float64),
              np.sqrt(np.float32(1) - abar[tk]).astype(np.float64)) for tk in ts]

  def to_x0_eps(out, x, a, s):
    if kind == "flow":                                         # velocity v = eps - x0
      return x - s[:, None] * out, x + a[:, None] * out
    return (x - s[:, None] * out) / a[:, None], out            # epsilon

  draws = [None] if noise is None else list(noise)
  rs = []
  for xi in draws:
    (a0, s0), (a1, s1) = coeff
    x0, eps = to_x0_eps(net(x, a0), x, a0, s0)
    std = eta * s1 * np.sqrt(np.maximum(1 - (a0 * s1 / (a1 * s0)) ** 2, 0))
    x1 = a1[:, None] * x0 + np.sqrt(s1 ** 2 - std ** 2)[:, None] * eps
    if xi is not None:
      x1 = x1 + std[:, None] * xi[0]
    rs.append(reward(to_x0_eps(net(x1, a1), x1, a1, s1)[0]))
  rs = np.stack(rs)
  if mode == "softmax":
    return np.log(np.mean(np.exp(lam * rs), axis=0))
  return lam * np.mean(rs, axis=0)


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
@pytest.mark.parametrize("draws", [(1, 0.0, "softmax"), (3, 1.0, "softmax"), (3, 1.0, "mean")])
def test_drp_vjp_matches_finite_differences(kind, draws):
  """K = 2 with a nonlinear reward and a nonlinear denoiser: the DRP (jax.vjp, remat) equals
  central finite differences of an independent float64 NumPy implementation of F(x)."""
  num_draws, eta, mode = draws
  with jax.enable_x64(True):
    process = _process(kind)
    t = _times(kind, 4) if kind == "flow" else jnp.asarray([20, 300, 640, 980], jnp.int32)
    x = np.random.default_rng(2).normal(size=(4, 2))
    net = _mlp_denoiser(jnp)
    denoise = lambda x, t: net(x, _coeffs(process, t, x.dtype)[0])  # noqa: E731
    lam = 0.7
    noise = didr.drp_noise(jax.random.key(3), num_draws, 2, x.shape, jnp.float64) if eta else None
    s_r, metrics = jax.jit(lambda x: didr.diffused_reward_score(
        denoise, _reward(jnp), x, t, process, reward_scale=lam, num_steps=2,
        num_draws=num_draws, eta=eta, draw_weights=mode, noise=noise))(jnp.asarray(x))
    tn = np.asarray(t)
    nz = None if noise is None else np.asarray(noise)
    f = lambda x: _np_drp_objective(x, tn, kind, lam, noise=nz, eta=eta, mode=mode)  # noqa: E731

    def central(i, h):
      e = np.zeros_like(x)
      e[:, i] = h
      return (f(x + e) - f(x - e)) / (2 * h)
    # Richardson-extrapolated central differences (error O(h^4)): at t = 980, 1/alpha ~ 150
    # makes the third derivative large enough to spoil a plain central difference at 1e-7.
    h = 1e-5
    fd = np.stack([(4 * central(i, h / 2) - central(i, h)) / 3 for i in range(2)], axis=-1)
    np.testing.assert_allclose(np.asarray(s_r), fd, rtol=1e-7, atol=1e-9)
    assert np.isfinite(float(metrics["drp_reward"]))
    assert np.abs(fd).min() > 1e-3   # a non-trivial gradient in every entry


def _affine_generator(params, z):
  return z @ params["A"].T + params["mu"]


def _generator_setup(process, config, reward):
  ref = gaussian_denoiser(jnp.asarray(M), jnp.asarray(S), process)

  def loss(params, z, eps, t, rng=None):
    p_sg = jax.lax.stop_gradient(params)
    fake = gaussian_denoiser(p_sg["mu"], p_sg["A"] @ p_sg["A"].T, process)
    x0 = _affine_generator(params, z)
    return didr.generator_loss(x0, eps, t, process, fake_fn=fake, ref_fn=ref, reward_fn=reward,
                               config=config, rng=rng)[0]
  return loss


def _sigma_points(dim: int, reps: int):
  """The 2n points +-sqrt(n) e_i of N(0, I_n), n = 2 dim: their mean reproduces every Gaussian
  moment up to order 3, so batch means of the (quadratic) per-sample gradients are exact."""
  n = 2 * dim
  u = np.concatenate([np.eye(n), -np.eye(n)]) * np.sqrt(n)
  u = np.tile(u, (reps, 1))
  return jnp.asarray(u[:, :dim]), jnp.asarray(u[:, dim:])


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
def test_zero_reward_didr_equals_di(kind):
  with jax.enable_x64(True):
    process = _process(kind)
    params = {"A": jnp.asarray([[0.9, 0.1], [-0.2, 0.7]]), "mu": jnp.asarray([0.2, 0.1])}
    rng = np.random.default_rng(4)
    z, eps = jnp.asarray(rng.normal(size=(16, 2))), jnp.asarray(rng.normal(size=(16, 2)))
    t = process.sample_time(jax.random.key(0), (16,), 0.02, 0.98)
    zero = lambda x: jnp.zeros(x.shape[:1], x.dtype)  # noqa: E731
    nonzero = _reward(jnp)
    cases = [
        ("di", didr.DIDRConfig(mode="di"), None),
        ("didr_r0", didr.DIDRConfig(mode="didr", num_steps=2), zero),
        ("didr_scale0", didr.DIDRConfig(mode="didr", num_steps=2, reward_scale=0.0), nonzero),
        ("dipp_scale0", didr.DIDRConfig(mode="dipp", reward_scale=0.0), nonzero),
        ("didr", didr.DIDRConfig(mode="didr", num_steps=2), nonzero)]
    grads = jax.jit(lambda *a: {name: jax.grad(_generator_setup(process, config, reward))(*a)
                                for name, config, reward in cases})(params, z, eps, t)
    for name in ("didr_r0", "didr_scale0", "dipp_scale0"):
      for k in params:
        np.testing.assert_allclose(grads[name][k], grads["di"][k], rtol=1e-12, atol=1e-14)
    assert np.abs(np.asarray(grads["didr"]["mu"] - grads["di"]["mu"])).max() > 1e-3


def _gauss_kl(mu1, c1, mu2, c2):
  d = mu1.shape[0]
  c2inv = jnp.linalg.inv(c2)
  diff = mu2 - mu1
  return 0.5 * (jnp.trace(c2inv @ c1) + diff @ c2inv @ diff - d
                + jnp.linalg.slogdet(c2)[1] - jnp.linalg.slogdet(c1)[1])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_generator_gradient_is_the_integral_kl_gradient(kind):
  """Affine generator x0 = A z + mu, exact fake score of N(mu, A A^T), exact reference, linear
  reward with the K = 1 DRP, "snr" weighting, no normaliser: the loss gradient over the sigma
  points equals grad_(A, mu) of the closed-form mean_t KL(p_theta,t || p*_t) exactly."""
  with jax.enable_x64(True):
    process = _process(kind)
    lam = 0.8
    config = didr.DIDRConfig(mode="didr", num_steps=1, reward_scale=lam, normalise=False,
                             time_weighting="snr")
    loss = _generator_setup(process, config, lambda x: x @ jnp.asarray(B_VEC))
    params = {"A": jnp.asarray([[0.9, 0.1], [-0.2, 0.7]]), "mu": jnp.asarray([0.2, 0.1])}
    ts = _times(kind, 3)
    z, eps = _sigma_points(2, 1)
    n = z.shape[0]
    z, eps = jnp.tile(z, (3, 1)), jnp.tile(eps, (3, 1))
    t = jnp.repeat(ts, n)
    got = jax.jit(jax.grad(loss))(params, z, eps, t)

    target_mean = jnp.asarray(M + lam * S @ B_VEC)

    def integral_kl(p):
      a, s = _coeffs(process, ts, jnp.float64)
      kls = [_gauss_kl(ai * p["mu"], ai ** 2 * p["A"] @ p["A"].T + si ** 2 * jnp.eye(2),
                       ai * target_mean, ai ** 2 * jnp.asarray(S) + si ** 2 * jnp.eye(2))
             for ai, si in zip(a, s)]
      return jnp.mean(jnp.stack(kls))
    want = jax.grad(integral_kl)(params)
    for k in params:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)
    assert np.abs(np.asarray(want["mu"])).max() > 1e-2


# ------------------------------------------------------------------- 2-D training, known target


def _train(process, config, *, steps=1000, batch=256, lr=3e-2, seed=0, reward=None):
  """Trains the affine generator (init: the reference N(m, S)) with exact Gaussian ref / fake
  denoisers and ``reward`` (default the linear b.x); returns (mean, covariance) of its final
  distribution."""
  if reward is None:
    reward = lambda x: x @ jnp.asarray(B_VEC, x.dtype)  # noqa: E731
  loss = _generator_setup(process, config, reward)
  opt = optax.adam(optax.exponential_decay(lr, steps, 0.01), b1=0.9)
  params = {"A": jnp.asarray(np.linalg.cholesky(S), jnp.float32),
            "mu": jnp.asarray(M, jnp.float32)}

  def step(carry, key):
    p, o = carry
    kz, ke, kt, kd = jax.random.split(key, 4)
    z = jax.random.normal(kz, (batch, 2))
    eps = jax.random.normal(ke, (batch, 2))
    t = process.sample_time(kt, (batch,), 0.02, 0.98)
    g = jax.grad(loss)(p, z, eps, t, kd)
    upd, o = opt.update(g, o, p)
    return (optax.apply_updates(p, upd), o), None

  (p, _), _ = jax.jit(lambda p, o, keys: jax.lax.scan(step, (p, o), keys))(
      params, opt.init(params), jax.random.split(jax.random.key(seed), steps))
  return np.asarray(p["mu"], np.float64), np.asarray(p["A"] @ p["A"].T, np.float64)


def test_2d_didr_reaches_the_tilted_target_and_dipp_drifts():
  """Reference N(m, S), reward b.x, 1/beta = 1: the tilted target is N(m + S b, S) = N((1.2,
  -0.1), S). Affine generator from the reference, exact Gaussian fake / reference denoisers,
  1000 Adam steps of batch 256, t ~ U{20..980} (VP, linear betas).

  - DIDR lands on the target within 0.03 in every mean and covariance entry with the K = 1 DRP
    (DMD-normalised default and the plain Integral-KL "snr" form) and with the K = 2 ancestral
    DRP (eta = 1, 2 draws). Measured: error < 1e-3.
  - DIDR with the deterministic K = 2 DRP (eta = 0) overshoots (its DRS is too large at high
    noise) and has no fixed point at the target: measured mean (3.60, 0.87), covariance
    [[0.17, 0.07], [0.07, 0.58]] after 1000 steps ((4.14, 0.99) after 1500: still moving).
  - DI++ at the same reward strength ("snr", no normaliser) lands on its own closed-form
    minimiser m + [E_t a^2 (a^2 S + s^2)^{-1}]^{-1} b = (3.32, -0.23) (measured (3.28, -0.24)),
    2.1 past the target mean with the right covariance; with the DMD normaliser it lands at mean
    (1.34, -0.62) with a distorted covariance [[2.51, 0.21], [0.21, 1.06]] (the per-sample
    normaliser couples mean and spread).
  """
  process = _process("epsilon")
  target = M + S @ B_VEC
  tol = 0.03
  res = {}
  for name, config in [
      ("didr_dmd", didr.DIDRConfig(mode="didr", num_steps=1)),
      ("didr_snr", didr.DIDRConfig(mode="didr", num_steps=1, normalise=False,
                                   time_weighting="snr")),
      ("didr_k2_ancestral", didr.DIDRConfig(mode="didr", num_steps=2, eta=1.0, num_draws=2)),
      ("didr_k2_ddim", didr.DIDRConfig(mode="didr", num_steps=2)),
      ("dipp_snr", didr.DIDRConfig(mode="dipp", normalise=False, time_weighting="snr")),
      ("dipp_dmd", didr.DIDRConfig(mode="dipp"))]:
    res[name] = _train(process, config)
  report = {k: (np.round(mu, 3).tolist(), np.round(cov, 3).tolist()) for k, (mu, cov) in
            res.items()}
  for name in ("didr_dmd", "didr_snr", "didr_k2_ancestral"):
    mu, cov = res[name]
    assert np.abs(mu - target).max() < tol, (name, report, target)
    assert np.abs(cov - S).max() < tol, (name, report)
  assert np.linalg.norm(res["didr_k2_ddim"][0] - target) > 1.0, report
  # DI++'s closed-form landing point under t ~ U{20..980} (the same range as training).
  t = jnp.arange(20, 981)
  a, s = (np.asarray(v, np.float64) for v in process.alpha_sigma(t))
  w = np.mean([ai ** 2 * np.linalg.inv(ai ** 2 * S + si ** 2 * np.eye(2)) for ai, si in zip(a, s)],
              axis=0)
  dipp_mean = M + np.linalg.solve(w, B_VEC)
  mu, cov = res["dipp_snr"]
  assert np.abs(mu - dipp_mean).max() < 0.05, (report, dipp_mean)
  assert np.abs(cov - S).max() < tol, report
  assert np.linalg.norm(dipp_mean - target) > 1.0, (dipp_mean, target)
  assert np.linalg.norm(res["dipp_dmd"][0] - target) > 0.3, report


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_fake_score_loss_is_dsm_on_detached_samples(kind):
  """fake_score_loss = mean_i mean_dims (f(x_t, t) - target)^2 with target eps | alpha eps -
  sigma x0 | eps - x0 (NumPy), and no gradient reaches the generator's samples."""
  process = _process(kind) if kind != "v_prediction" else didr.vp_process(
      VPSchedule.from_betas(BETAS, prediction_type=kind))
  rng = np.random.default_rng(6)
  x0 = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
  t = _times(kind, 4).astype(jnp.float32 if kind == "flow" else jnp.int32)
  w = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
  fake = lambda x, t: jnp.tanh(x @ w)  # noqa: E731
  loss = didr.fake_score_loss(fake, x0, eps, t, process)
  a, s = (np.asarray(v, np.float64)[:, None, None, None] for v in process.alpha_sigma(t))
  x0n, epsn = np.asarray(x0, np.float64), np.asarray(eps, np.float64)
  x_t = a * x0n + s * epsn
  target = {"epsilon": epsn, "v_prediction": a * epsn - s * x0n, "flow": epsn - x0n}[kind]
  want = np.mean((np.tanh(x_t @ np.asarray(w, np.float64)) - target) ** 2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert np.all(np.asarray(jax.grad(lambda x: didr.fake_score_loss(fake, x, eps, t, process))(x0))
                == 0.0)


def test_generator_loss_on_image_batches_under_jit():
  """(B, H, W, C) bfloat16 samples, every mode, jitted: gradient on x0 is g / B with g from
  ``generator_direction`` (recomputed here from the denoiser outputs), finite, in x0's dtype."""
  process = didr.vp_process(VPSchedule.from_betas(BETAS))
  rng = np.random.default_rng(7)
  x0 = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.bfloat16)
  eps = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.bfloat16)
  t = jnp.asarray([50, 500, 900], jnp.int32)
  w1, w2 = (jnp.asarray(rng.normal(size=(2, 2)) * 0.5, jnp.float32) for _ in range(2))
  ref = lambda x, t: jnp.tanh(x.astype(jnp.float32) @ w1)  # noqa: E731
  fake = lambda x, t: jnp.tanh(x.astype(jnp.float32) @ w2)  # noqa: E731
  reward = lambda x: jnp.mean(jnp.sin(x.astype(jnp.float32)), axis=(1, 2, 3))  # noqa: E731
  for config in (didr.DIDRConfig(mode="di"), didr.DIDRConfig(mode="didr", t_max=600),
                 didr.DIDRConfig(mode="didr", num_steps=3, eta=1.0, num_draws=2),
                 didr.DIDRConfig(mode="dipp", reward_scale=0.3)):
    f = jax.jit(jax.value_and_grad(lambda x: didr.generator_loss(
        x, eps, t, process, fake_fn=fake, ref_fn=ref, reward_fn=reward, config=config,
        rng=jax.random.key(0))[0]))
    loss, g = f(x0)
    assert g.dtype == jnp.bfloat16 and g.shape == x0.shape and np.isfinite(float(loss))
    # Recompute g from its parts for the deterministic modes.
    if config.num_draws == 1:
      a, s = process.coeffs(t, x0)
      x_t = (param.bcast(a, x0) * x0.astype(jnp.float32)
             + param.bcast(s, x0) * eps.astype(jnp.float32)).astype(jnp.bfloat16)
      x0f = param.to_x0(fake(x_t, t), x_t, a, s, "epsilon")
      x0r = param.to_x0(ref(x_t, t), x_t, a, s, "epsilon")
      drs = grad_r = None
      if config.mode == "didr":
        drs = didr.diffused_reward_score(ref, reward, x_t, t, process, num_steps=2, t_max=600)[0]
        assert np.all(np.asarray(drs[2]) == 0.0) and np.abs(np.asarray(drs[1])).max() > 0
      if config.mode == "dipp":
        grad_r = didr.reward_and_grad(reward, x0)[1]
      want = didr.generator_direction(x0, x0f, x0r, a, s, drs=drs, reward_grad=grad_r,
                                      reward_scale=config.reward_scale) / x0.shape[0]
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want, np.float32),
                                 rtol=1.6e-2, atol=1e-5)  # ~2 bfloat16 ulps


def test_drp_remats_every_denoiser_call_and_config_errors():
  process = didr.flow_process()
  fn = lambda x, t: jnp.tanh(x) * t[:, None]  # noqa: E731
  x, t = jnp.ones((2, 2)), jnp.asarray([0.3, 0.9])

  def jaxpr(remat):
    return jax.make_jaxpr(lambda x: didr.diffused_reward_score(
        fn, lambda y: jnp.sum(y ** 2, -1), x, t, process, num_steps=3, remat=remat))(x)
  assert str(jaxpr(True)).count("remat") >= 3 and "remat" not in str(jaxpr(False))
  for bad in (dict(mode="dpo"), dict(time_weighting="edm"), dict(num_steps=0),
              dict(num_draws=2), dict(draw_weights="max")):
    with pytest.raises(ValueError, match=next(iter(bad))):
      didr.DIDRConfig(**bad)
  with pytest.raises(ValueError, match="one value per sample"):
    didr.diffused_reward_score(fn, lambda y: y, x, t, process, num_steps=1)
  with pytest.raises(ValueError, match="needs rng or noise"):
    didr.diffused_reward_score(fn, lambda y: y.sum(-1), x, t, process, num_steps=2, eta=1.0)


# --------------------------------------------- the study behind the numbers in the docstrings

def _study():
  """Where DIDR (several DRPs) and DI++ land on the 2-D Gaussian problem, for the linear reward
  b.x and for a concave quadratic reward -(x - c)^T Q (x - c) / 2, whose tilted target is also
  Gaussian: precision S^-1 + Q / beta, mean (S^-1 + Q/beta)^-1 (S^-1 m + Q c / beta).
  Run: PYTHONPATH=$PWD python tests/test_losses_didr.py (about 2 min on 2 CPU cores)."""
  process = _process("epsilon")
  c, q = np.array([1.5, 0.5]), np.array([[2.0, 0.0], [0.0, 0.5]])
  quad = lambda x: -0.5 * jnp.sum((x - c) @ jnp.asarray(q, x.dtype) * (x - c), -1)  # noqa: E731
  prec = np.linalg.inv(S) + q
  quad_target = (np.linalg.solve(prec, np.linalg.solve(S, M) + q @ c), np.linalg.inv(prec))
  configs = [
      ("DIDR K=1", didr.DIDRConfig(num_steps=1)),
      ("DIDR K=1 t_max=500", didr.DIDRConfig(num_steps=1, t_max=500)),
      ("DIDR K=1 snr", didr.DIDRConfig(num_steps=1, normalise=False, time_weighting="snr")),
      ("DIDR K=2 DDIM", didr.DIDRConfig(num_steps=2)),
      ("DIDR K=4 eta=1 M=4", didr.DIDRConfig(num_steps=4, eta=1.0, num_draws=4)),
      ("DI++ snr", didr.DIDRConfig(mode="dipp", normalise=False, time_weighting="snr")),
      ("DI++", didr.DIDRConfig(mode="dipp")),
      ("DI", didr.DIDRConfig(mode="di"))]
  for title, reward, (t_mean, t_cov) in [("linear b.x", None, (M + S @ B_VEC, S)),
                                        ("quadratic", quad, quad_target)]:
    print(f"{title}: target mean {np.round(t_mean, 3)} cov {np.round(t_cov, 3).tolist()}")
    for name, config in configs:
      mu, cov = _train(process, config, steps=1500, reward=reward)
      print(f"  {name:20s} mean {np.round(mu, 3)} |d mean| {np.linalg.norm(mu - t_mean):.3f} "
            f"cov {np.round(cov, 3).tolist()} max|d cov| {np.abs(cov - t_cov).max():.3f}")


if __name__ == "__main__":
  _study()


def test_bounded_drs_term_is_the_projection_onto_the_tilted_mean_box(rng=None):
  """``bounded_drs_term`` clips the x0-unit DRS so that clip(x0_ref) + term stays in the data
  range: whenever the true term b lies in that box (exactly when the reference's x0-hat is the
  posterior mean), the bounded estimate is never farther from b than the raw one, coordinate by
  coordinate; zero stays feasible even where a CFG-guided x0-hat leaves the range."""
  r = np.random.default_rng(0)
  f32 = lambda v: np.asarray(v, np.float32)             # rounding is monotone: exact checks
  x0_ref = f32(r.uniform(-1.6, 1.6, size=(4, 64)))        # CFG estimates leave [-1, 1]
  m = np.clip(x0_ref, -1.0, 1.0)
  truth = f32(r.uniform(-1.0, 1.0, size=x0_ref.shape)) - m  # E_tilted - E, both in [-1, 1]
  raw = truth + f32(r.standard_cauchy(size=x0_ref.shape))  # heavy-tailed proxy errors
  got = np.asarray(didr.bounded_drs_term(jnp.asarray(raw), jnp.asarray(x0_ref), (-1.0, 1.0)))
  assert np.all(np.abs(got - truth) <= np.abs(raw - truth) + 1e-12)
  assert np.all(m + got >= -1 - 1e-12) and np.all(m + got <= 1 + 1e-12)
  assert np.all(np.abs(got) <= 2.0)
  np.testing.assert_array_equal(
      didr.bounded_drs_term(jnp.zeros_like(got), jnp.asarray(x0_ref), (-1.0, 1.0)), 0.0)
  np.testing.assert_array_equal(didr.bounded_drs_term(jnp.asarray(raw), x0_ref, None), raw)
  with pytest.raises(ValueError, match="data_range"):
    didr.DIDRConfig(data_range=(1.0, -1.0))
