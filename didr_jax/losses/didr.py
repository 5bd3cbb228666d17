"""DIDR: Diff-Instruct with Diffused Reward, with the DI and DI++ baselines (docs/methods.md §3).

A one-step generator x0 = g_theta(z) is trained to minimise the Integral KL to the reward-tilted
reference, diffused along the forward process x_t = alpha_t x0 + sigma_t eps:

    p*_0 = p_ref e^{r/beta} / Z,   p*_t(x_t) = p_ref,t(x_t) h_t(x_t) / Z,
    h_t(x_t) = E_{p_ref(x0 | x_t)}[e^{r(x0)/beta}],   s*_t = s_ref,t + s_r,
    s_r = grad_{x_t} log h_t                              (the Diffused Reward Score, DRS)
    L(theta) = int w(t) KL(p_theta,t || p*_t) dt

whose minimiser is the clean RLHF optimum p*_0. Its gradient (Diff-Instruct; the generator's own
score is not differentiated because E_p[grad_theta log p_theta] = 0):

    grad_theta L = E_{t,z,eps} w(t) [s_psi(x_t) - s_ref(x_t) - s_r(x_t)]^T alpha_t dx0/dtheta,

with s_psi an online "fake" score of the generator's samples (trained by ``fake_score_loss``).
Using s_A - s_B = (alpha / sigma^2)(x0_A - x0_B) (``param``), the direction on x0 is written in x0
units,

    g = w_x0(t) [x0_hat_psi - x0_hat_ref - (sigma^2 / alpha) s_r] / n(x0)

and pushed through the generator with the stop-gradient target loss 0.5 ||x0 - sg(x0 - g)||^2
(``common.stop_gradient_target_loss``; its gradient on x0 is exactly g). Options
(``DIDRConfig``):

- ``normalise`` (default True): n = mean|x0 - x0_hat_ref| per sample, a constant (the DMD
  normaliser, ``common.dmd_normaliser``); False: n = 1.
- ``time_weighting``: "uniform" (w_x0 = 1: the DMD / DMD2 form, default) or "snr"
  (w_x0 = alpha^2 / sigma^2: exactly the Integral-KL gradient above with w(t) = 1 in score units,
  since (alpha^2/sigma^2)(x0_psi - x0_ref) - alpha s_r = alpha (s_psi - s_ref - s_r)).
- the time range is where the caller samples t (``Process.sample_time``; docs/methods.md §3.9 default
  [0.02, 0.98] of the process).

Modes (``DIDRConfig.mode``), one code path:

- "di":   no reward (s_r = 0): Diff-Instruct / DMD distribution matching to the reference.
- "didr": s_r from the Diffused Reward Proxy (``diffused_reward_score``).
- "dipp": DI++, the terminal-reward baseline: the DRS term is replaced by a reward gradient on the
  clean sample, g = w_x0 (x0_hat_psi - x0_hat_ref) / n - alpha_r grad_{x0} r(x0), i.e. the
  gradient of Integral-KL - alpha_r E r(x0); the reward term is neither time-weighted nor
  normalised. alpha_r = ``reward_scale``, so DIDR and DI++ at the same ``reward_scale`` = 1/beta
  put the same weight on the reward relative to an Integral KL whose time weights average to
  one (with "snr" and ``normalise=False``). DI++'s minimiser is not p*_0: Integral KL is a weaker
  regulariser than KL_0, so the reward term over-drives it (tests/test_losses_didr.py measures
  how far on a Gaussian problem).

The DRP **[reconstruction]** (docs/methods.md §3.6): s_r(x_t) ~ (1/beta) grad_{x_t} r(D_K(x_t)),
D_K = K differentiable denoising steps of the frozen reference from t to 0 on the sub-grid
t_k = t (K - k) / K (k = 0..K-1; rounded to integers for VP timesteps): at each t_k the
reference gives (x0_hat, eps_hat); the step to t_{k+1} is the DDIM step in (alpha, sigma) form,

    x_{k+1} = alpha_{k+1} x0_hat + sqrt(sigma_{k+1}^2 - std^2) eps_hat + std xi,
    std = eta sigma_{k+1} sqrt(1 - (alpha_k sigma_{k+1} / (alpha_{k+1} sigma_k))^2)

(eta = 0: DDIM / the flow Euler step, which are the same map; eta = 1: the ancestral DDPM
posterior step), and D_K returns x0_hat at t_{K-1}; K = 1 is Tweedie's x0_hat. No x0 clipping.
The gradient is one ``jax.vjp`` through reward and D_K on a stop-gradient copy of x_t, with
``jax.checkpoint`` (remat) on every denoiser call. DRS is set to 0 where t > ``t_max``.

Multi-draw variant **[reconstruction]** (``num_draws`` M > 1, needs K >= 2 and eta > 0 for the
draws to differ): M independent ancestral noises xi_m give M reparameterised draws
x0_m = D_K(x_t; xi_m), approximately from p_ref(x0 | x_t), and

    s_r ~ grad_{x_t} log (1/M) sum_m exp(r(x0_m)/beta) = sum_m softmax_m(r_m/beta) grad r(x0_m)/beta

("softmax", a consistent estimator of grad log h_t as M -> inf and the sampler -> exact), or the
plain average (1/M) sum_m grad r(x0_m)/beta ("mean", the small-reward limit). With M = 1 both are
the single-draw DRP.

What the exact Gaussian checks show (tests/test_losses_didr.py; reference N(m, S), reward b.x,
exact denoiser, where the true DRS is (a^2 S + s^2 I)^{-1} a S b / beta):
- K = 1 (Tweedie) is exact at every t, and so is the ancestral DRP (eta = 1) for every K and any
  number of draws: the DDPM posterior chain's mean map is the posterior mean (tower rule).
- The deterministic DRP (eta = 0, e.g. K = 2) is NOT: it differentiates the ODE
  end point, whose Jacobian does not vanish at high noise as the posterior mean's (alpha S C^-1)
  does. |DRP| / |DRS| for K = 2 (K = 64): VP t = 100 / 500 / 980: 1.07 / 2.2 / 36 (1.15 / 3.9 /
  134); flow sig = 0.1 / 0.5 / 0.98: 1.01 / 1.33 / 24 (1.02 / 1.68 / 51). In the 2-D training
  test this moves DIDR's landing point far past the tilted target. With eta = 0 keep K = 1 or cut
  high noise with ``t_max``; eta = 1 (with ``rng``) is the consistent choice for K >= 2.
- For nonlinear rewards every K is a proxy (r(E[x0 | x_t]) != log E[e^{r(x0)/beta} | x_t]). With
  a concave quadratic reward (``_study`` in the test file) K = 1 over-drives at high noise, where
  the proxy's push no longer shrinks with the posterior spread; ``t_max`` at half the range
  brought DIDR from 0.87 to 0.16 off the target mean (covariance within 0.015), while DI++ ("snr")
  collapsed the covariance (its smallest variance 0.015 against the target's 0.32).

Denoisers are callables ``denoise_fn(x_t, t) -> output`` in the process's prediction type (the
samplers' convention: VP integer timesteps, flow sigmas; CFG already applied), so any backbone
fits. A ``Process`` says how t maps to (alpha, sigma). Rewards are ``reward_fn(x0) -> (B,)``,
per-sample independent (no batch coupling), differentiable.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from didr_jax.diffusion import kernels, param
from didr_jax.diffusion.schedules import VPSchedule
from didr_jax.losses import common

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
RewardFn = Callable[[jax.Array], jax.Array]

MODES = ("di", "didr", "dipp")
TIME_WEIGHTINGS = ("uniform", "snr")
DRAW_WEIGHTS = ("softmax", "mean")


@dataclasses.dataclass(frozen=True, eq=False)
class Process:
  """A backbone's forward process: t (its native time) -> (alpha, sigma), its prediction type,
  whether t is an integer timestep, and its training-time sampler. Close over it (or pass it as
  a static argument: it hashes by identity). Build with ``vp_process`` / ``flow_process``."""
  alpha_sigma: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  prediction_type: str
  integer_time: bool
  sample_time: Callable[..., jax.Array]   # (rng, shape, t_min, t_max) -> t, fractions in [0, 1]

  def coeffs(self, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) at t in the compute dtype of ``like`` (at least float32), so that
    coefficient arithmetic such as sigma^2 / alpha is as precise as the data."""
    dtype = common.compute_dtype(like)
    alpha, sigma = self.alpha_sigma(t)
    return jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)

  def subgrid(self, t: jax.Array, num_steps: int) -> list[jax.Array]:
    """[t_0 = t, ..., t_{K-1}] with t_k = t (K - k) / K (rounded half-to-even for integer t)."""
    out = []
    t = jnp.asarray(t)
    for k in range(num_steps):
      frac = (num_steps - k) / num_steps
      out.append(jnp.round(t.astype(jnp.float32) * frac).astype(jnp.int32) if self.integer_time
                 else t * jnp.asarray(frac, t.dtype))
    return out


def vp_process(schedule: VPSchedule) -> Process:
  """VP: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) at integer t; times from
  ``kernels.sample_vp_timesteps``."""
  return Process(
      alpha_sigma=lambda t: kernels.vp_alpha_sigma(schedule, t),
      prediction_type=schedule.prediction_type, integer_time=True,
      sample_time=lambda rng, shape, t_min=0.0, t_max=1.0: kernels.sample_vp_timesteps(
          rng, shape, schedule.num_train_timesteps, t_min, t_max))


def flow_process(shift: float = 1.0) -> Process:
  """Flow matching: alpha = 1 - sig, sigma = sig, velocity output; times from
  ``kernels.sample_flow_sigmas`` with the scheduler's static ``shift``."""
  return Process(
      alpha_sigma=kernels.flow_alpha_sigma, prediction_type="flow", integer_time=False,
      sample_time=lambda rng, shape, t_min=0.0, t_max=1.0: kernels.sample_flow_sigmas(
          rng, shape, t_min, t_max, shift))


@dataclasses.dataclass(frozen=True)
class DIDRConfig:
  """Options of the generator loss (see the module docstring). ``reward_scale`` is 1/beta for
  DIDR and alpha_r for DI++; ``t_max`` is in the process's native time (None: no cut)."""
  mode: str = "didr"
  reward_scale: float = 1.0
  num_steps: int = 2
  t_max: float | None = None
  num_draws: int = 1
  eta: float = 0.0
  draw_weights: str = "softmax"
  normalise: bool = True
  time_weighting: str = "uniform"
  remat: bool = True
  data_range: tuple[float, float] | None = None
  drp_clip: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
    if self.time_weighting not in TIME_WEIGHTINGS:
      raise ValueError(f"time_weighting={self.time_weighting!r}: expected one of "
                       f"{TIME_WEIGHTINGS}")
    if self.draw_weights not in DRAW_WEIGHTS:
      raise ValueError(f"draw_weights={self.draw_weights!r}: expected one of {DRAW_WEIGHTS}")
    if self.num_steps < 1 or self.num_draws < 1:
      raise ValueError(f"num_steps={self.num_steps} and num_draws={self.num_draws} must be >= 1")
    if self.data_range is not None and not self.data_range[0] < self.data_range[1]:
      raise ValueError(f"data_range={self.data_range}: expected (lo, hi) with lo < hi")
    if self.drp_clip and self.data_range is None:
      raise ValueError("drp_clip needs a data_range")
    if self.num_draws > 1 and (self.eta == 0 or self.num_steps < 2):
      raise ValueError(f"num_draws={self.num_draws} needs eta > 0 and num_steps >= 2 (the draws "
                       "would all be equal)")


# ------------------------------------------------------------------ K-step denoiser and the DRP


def ddim_step(x0: jax.Array, eps: jax.Array, alpha_k, sigma_k, alpha_next, sigma_next,
              eta=0.0, noise: jax.Array | None = None) -> jax.Array:
  """x_next = alpha' x0 + sqrt(sigma'^2 - std^2) eps + std xi with
  std = eta sigma' sqrt(1 - (alpha sigma' / (alpha' sigma))^2), the DDPM posterior std of
  q(x_next | x_t, x0) times eta, for any (alpha, sigma) process (VP: DDIM's formula; flow,
  eta = 0: the Euler step x + (sig' - sig) v). eta = 0 is ``tdm.student_step``'s map."""
  ratio = (jnp.asarray(alpha_k) * sigma_next) / (jnp.asarray(alpha_next) * sigma_k)
  std = eta * sigma_next * jnp.sqrt(jnp.maximum(1.0 - ratio ** 2, 0.0))
  direction = jnp.sqrt(jnp.maximum(jnp.asarray(sigma_next) ** 2 - std ** 2, 0.0))
  x = kernels.q_sample(x0, eps, alpha_next, direction)
  return x if noise is None else x + param.bcast(std, x) * noise


def denoise_k(denoise_fn: DenoiseFn, x_t: jax.Array, t: jax.Array, process: Process,
              num_steps: int, *, eta=0.0, noise: jax.Array | None = None,
              clip: tuple[float, float] | None = None) -> jax.Array:
  """D_K(x_t): K reference calls on ``process.subgrid(t, K)``, ``ddim_step`` between them, and
  x0_hat at the last one (K = 1: Tweedie). ``noise`` (K - 1, B, ...) feeds the eta > 0 steps.
  ``clip`` = (lo, hi) clips every x0_hat to the data range (a sampler's ``clip_sample``; eps_hat
  is kept, as ``ddim`` does), so the reward sees images and no gradient flows through a
  saturated pixel."""
  times = process.subgrid(t, num_steps)
  x = x_t
  for k, tk in enumerate(times):
    alpha, sigma = process.coeffs(tk, x_t)
    x0, eps = param.to_x0_eps(denoise_fn(x, tk), x, alpha, sigma, process.prediction_type)
    if clip is not None:
      x0 = jnp.clip(x0, clip[0], clip[1])
    if k == num_steps - 1:
      return x0
    alpha_n, sigma_n = process.coeffs(times[k + 1], x_t)
    x = ddim_step(x0, eps, alpha, sigma, alpha_n, sigma_n, eta,
                  None if noise is None else noise[k]).astype(x_t.dtype)
  raise AssertionError("unreachable")


def reward_and_grad(reward_fn: RewardFn, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(r(x) (B,), grad_x r(x) per sample) by one ``jax.vjp`` with a ones cotangent (valid for a
  per-sample reward) on sg(x)."""
  r, vjp = jax.vjp(reward_fn, jax.lax.stop_gradient(x))
  if r.shape != x.shape[:1]:
    raise ValueError(f"reward_fn must return one value per sample {x.shape[:1]}, got {r.shape}")
  return r, vjp(jnp.ones_like(r))[0]


def drp_noise(rng: jax.Array, num_draws: int, num_steps: int, x_shape, dtype=jnp.float32
              ) -> jax.Array:
  """The ancestral noises of the multi-draw DRP: (M, K - 1, *x_shape) standard normals."""
  return jax.random.normal(rng, (num_draws, max(num_steps - 1, 0)) + tuple(x_shape), dtype)


def diffused_reward_score(denoise_fn: DenoiseFn, reward_fn: RewardFn, x_t: jax.Array,
                          t: jax.Array, process: Process, *, reward_scale=1.0, num_steps: int = 2,
                          t_max=None, num_draws: int = 1, eta=0.0, draw_weights: str = "softmax",
                          rng: jax.Array | None = None, noise: jax.Array | None = None,
                          remat: bool = True, clip: tuple[float, float] | None = None
                          ) -> tuple[jax.Array, dict]:
  """The DRP estimate of the DRS (module docstring), (s_r, metrics).

  s_r = grad_x F(x) at x = sg(x_t) with, per sample, lam = ``reward_scale`` (= 1/beta) and
  r_m = r(D_K(x; xi_m)):
    F = log (1/M) sum_m exp(lam r_m)    ("softmax"; M = 1: lam r(D_K(x)))
    F = lam (1/M) sum_m r_m             ("mean")
  zeroed where t > t_max. ``noise`` (M, K - 1, B, ...) or ``rng`` supplies xi (needed when
  eta != 0 and K > 1; ``drp_noise`` draws it). metrics: "drp_reward", the mean of r_m.
  """
  if draw_weights not in DRAW_WEIGHTS:
    raise ValueError(f"draw_weights={draw_weights!r}: expected one of {DRAW_WEIGHTS}")
  stochastic = num_steps > 1 and not (isinstance(eta, (int, float)) and eta == 0)
  if noise is None and stochastic:
    if rng is None:
      raise ValueError("the DRP with eta != 0 and num_steps > 1 needs rng or noise")
    noise = drp_noise(rng, num_draws, num_steps, x_t.shape, x_t.dtype)
  if not stochastic:
    noise = None
  fn = jax.checkpoint(denoise_fn) if remat else denoise_fn

  def objective(x):
    rs = jnp.stack([reward_fn(denoise_k(fn, x, t, process, num_steps, eta=eta,
                                        noise=None if noise is None else noise[m], clip=clip))
                    for m in range(num_draws)])                        # (M, B)
    if draw_weights == "softmax":
      f = jax.nn.logsumexp(reward_scale * rs, axis=0) - jnp.log(num_draws)
    else:
      f = reward_scale * jnp.mean(rs, axis=0)
    return f, rs

  f, vjp, rs = jax.vjp(objective, jax.lax.stop_gradient(x_t), has_aux=True)
  if f.shape != x_t.shape[:1]:
    raise ValueError(f"reward_fn must return one value per sample {x_t.shape[:1]}, got "
                     f"{rs.shape[1:]}")
  s_r = vjp(jnp.ones_like(f))[0]
  if t_max is not None:
    s_r = jnp.where(param.bcast(jnp.asarray(t) <= t_max, s_r), s_r, 0.0)
  return s_r, {"drp_reward": jnp.mean(rs)}


# ------------------------------------------------------------------------- generator and fake


def time_weight(alpha, sigma, kind: str = "uniform") -> jax.Array:
  """w_x0(t): 1 ("uniform") or alpha^2 / sigma^2 ("snr", the Integral-KL weight in x0 units)."""
  if kind == "uniform":
    return jnp.ones_like(jnp.asarray(alpha, jnp.float32))
  if kind == "snr":
    return jnp.asarray(alpha) ** 2 / jnp.asarray(sigma) ** 2
  raise ValueError(f"time_weighting={kind!r}: expected one of {TIME_WEIGHTINGS}")


def bounded_drs_term(term: jax.Array, x0_ref: jax.Array,
                     data_range: tuple[float, float] | None) -> jax.Array:
  """The x0-unit DRS term (sigma^2 / alpha) s_r projected onto the box that holds the exact one.

  Exactly, term = E_tilted[x0 | x_t] - E[x0 | x_t], and the tilted posterior mean is a mean of
  data, so it lies in [lo, hi]: term in [lo - m, hi - m] with m = E[x0 | x_t]. With m estimated
  by the reference's x0_hat clipped to [lo, hi] (so that the box holds 0), the estimate is
  clipped to that box, elementwise. Projecting onto a box that contains the true value never
  moves an estimate away from it, coordinate by coordinate (|clip(a) - b| <= |a - b| for b in
  the box), so the bound can only reduce the DRP's error where m is right; every value ends
  within the range's width hi - lo. None: no bound."""
  if data_range is None:
    return term
  lo, hi = data_range
  m = jnp.clip(jax.lax.stop_gradient(x0_ref), lo, hi)
  return jnp.clip(term, lo - m, hi - m)


def generator_direction(x0: jax.Array, x0_fake: jax.Array, x0_ref: jax.Array, alpha, sigma, *,
                        drs: jax.Array | None = None, reward_grad: jax.Array | None = None,
                        reward_scale=1.0, normalise: bool = True,
                        time_weighting: str = "uniform",
                        data_range: tuple[float, float] | None = None) -> jax.Array:
  """g on x0 (module docstring): w_x0 (x0_fake - x0_ref - B[(sigma^2/alpha) drs]) / n
  - reward_scale * reward_grad (the DI++ term; either term may be None), B = ``bounded_drs_term``
  for ``data_range``. All inputs are treated as constants (stop-gradient)."""
  x0, x0_fake, x0_ref = (jax.lax.stop_gradient(v) for v in (x0, x0_fake, x0_ref))
  delta = x0_fake - x0_ref
  if drs is not None:
    term = param.x0_delta_from_score_delta(jax.lax.stop_gradient(drs), alpha, sigma)
    delta = delta - bounded_drs_term(term, x0_ref, data_range)
  g = param.bcast(time_weight(alpha, sigma, time_weighting), delta) * delta
  if normalise:
    g = g / common.dmd_normaliser(x0, x0_ref)
  if reward_grad is not None:
    g = g - reward_scale * jax.lax.stop_gradient(reward_grad)
  return g


def generator_loss(x0: jax.Array, eps: jax.Array, t: jax.Array, process: Process, *,
                   fake_fn: DenoiseFn, ref_fn: DenoiseFn, reward_fn: RewardFn | None = None,
                   config: DIDRConfig = DIDRConfig(), drp_fn: DenoiseFn | None = None,
                   rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """(loss, metrics) of one generator update; d loss / d x0_i = g_i / B (``generator_direction``).

  x0: the generator's samples (B, ...) carrying the gradient; eps: forward noise; t: (B,) times
  in the process's units. x_t = alpha sg(x0) + sigma eps; x0_hat_psi / x0_hat_ref from
  ``fake_fn`` / ``ref_fn`` (the reference with its CFG) at sg(x_t). The DRP uses ``drp_fn``
  (default ``ref_fn``); ``rng`` feeds its ancestral noise when eta != 0. ``reward_fn`` is needed
  unless mode is "di". metrics: "dm_normaliser", "direction_abs", "reward_share" (the reward
  term's share of the direction, not in mode "di"), "drp_reward" (didr) or "reward" (dipp).
  """
  if config.mode != "di" and reward_fn is None:
    raise ValueError(f"mode={config.mode!r} needs a reward_fn")
  x0_sg = jax.lax.stop_gradient(x0)
  alpha, sigma = process.coeffs(t, x0)
  x_t = kernels.q_sample(x0_sg, eps, alpha, sigma).astype(x0.dtype)
  pt = process.prediction_type
  x0_fake = param.to_x0(fake_fn(x_t, t), x_t, alpha, sigma, pt)
  x0_ref = param.to_x0(ref_fn(x_t, t), x_t, alpha, sigma, pt)
  metrics = {}
  drs = reward_grad = None
  if config.mode == "didr":
    drs, metrics = diffused_reward_score(
        drp_fn or ref_fn, reward_fn, x_t, t, process, reward_scale=config.reward_scale,
        num_steps=config.num_steps, t_max=config.t_max, num_draws=config.num_draws,
        eta=config.eta, draw_weights=config.draw_weights, rng=rng, remat=config.remat,
        clip=config.data_range if config.drp_clip else None)
  elif config.mode == "dipp":
    r, reward_grad = reward_and_grad(reward_fn, x0_sg)
    metrics = {"reward": jnp.mean(r)}
  g = generator_direction(x0_sg, x0_fake, x0_ref, alpha, sigma, drs=drs,
                          reward_grad=reward_grad, reward_scale=config.reward_scale,
                          normalise=config.normalise, time_weighting=config.time_weighting,
                          data_range=config.data_range)
  metrics["dm_normaliser"] = jnp.mean(common.dmd_normaliser(x0_sg, x0_ref))
  metrics["direction_abs"] = jnp.mean(jnp.abs(g))
  if config.mode != "di":
    # the reward term's share of the direction: |g - g_DI| / (|g_DI| + |g - g_DI|), means of
    # absolute values over all elements (0: no reward push, 1: reward push only)
    g_di = generator_direction(x0_sg, x0_fake, x0_ref, alpha, sigma, normalise=config.normalise,
                               time_weighting=config.time_weighting)
    r_abs, d_abs = jnp.mean(jnp.abs(g - g_di)), jnp.mean(jnp.abs(g_di))
    metrics["reward_share"] = r_abs / jnp.maximum(r_abs + d_abs, 1e-30)
  # In at least float32: in bfloat16, x0 - sg(x0 - g) would round g to the ulp of x0.
  dtype = common.compute_dtype(x0)
  return common.stop_gradient_target_loss(x0.astype(dtype), g.astype(dtype)), metrics


def fake_score_loss(fake_fn: DenoiseFn, x0: jax.Array, eps: jax.Array, t: jax.Array,
                    process: Process, weight: jax.Array | None = None) -> jax.Array:
  """Denoising score matching of the fake score on the generator's samples sg(x0):
  ``common.dsm_loss(fake_fn(x_t, t), x0, eps)`` at x_t = alpha sg(x0) + sigma eps."""
  x0 = jax.lax.stop_gradient(x0)
  alpha, sigma = process.coeffs(t, x0)
  x_t = kernels.q_sample(x0, eps, alpha, sigma).astype(x0.dtype)
  return common.dsm_loss(fake_fn(x_t, t), x0, eps, alpha, sigma, process.prediction_type, weight)
