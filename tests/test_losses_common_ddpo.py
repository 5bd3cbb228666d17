"""DDPO losses and the shared loss pieces against hand-written NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax.losses import common, ddpo


def _np_ppo(logp_new, logp_old, adv, eps, amax):
  a = np.clip(adv, -amax, amax)
  r = np.exp(logp_new - logp_old)
  terms = np.maximum(-a * r, -a * np.clip(r, 1 - eps, 1 + eps))
  # d/dlogp_new: the unclipped branch is active when -a r >= -a clip(r); its derivative is -a r.
  active = (-a * r) >= (-a * np.clip(r, 1 - eps, 1 + eps))
  grad = np.where(active, -a * r, 0.0) / len(r)
  return terms.mean(), grad


@pytest.mark.parametrize("eps", [1e-4, 0.2])
def test_ppo_loss_and_gradient_match_formula(rng, eps):
  n = 64
  logp_old = rng.normal(size=n).astype(np.float32)
  logp_new = (logp_old + rng.normal(scale=0.3, size=n)).astype(np.float32)
  adv = rng.normal(scale=3.0, size=n).astype(np.float32)
  want, want_grad = _np_ppo(logp_new.astype(np.float64), logp_old.astype(np.float64),
                            adv.astype(np.float64), eps, 5.0)
  f = lambda lp: ddpo.ppo_loss(lp, jnp.asarray(logp_old), jnp.asarray(adv), clip_range=eps,
                               adv_clip_max=5.0)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp_new))
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  d = logp_new - logp_old
  np.testing.assert_allclose(metrics["approx_kl"], 0.5 * np.mean(d ** 2), rtol=1e-5)
  np.testing.assert_allclose(metrics["clipfrac"], np.mean(np.abs(np.exp(d) - 1) > eps), atol=1e-7)


def test_ppo_ratio_is_one_when_logps_equal(rng):
  lp = jnp.asarray(rng.normal(size=16).astype(np.float32))
  adv = jnp.asarray(rng.normal(size=16).astype(np.float32))
  loss, m = ddpo.ppo_loss(lp, lp, adv)
  assert float(m["ratio_mean"]) == 1.0 and float(m["clipfrac"]) == 0.0
  np.testing.assert_allclose(loss, -np.mean(np.clip(np.asarray(adv), -5, 5)), rtol=1e-6)


@pytest.mark.parametrize("std", ["global", "group"])
def test_group_advantages(rng, std):
  ids = np.repeat(np.arange(4), 6)
  r = rng.normal(size=24).astype(np.float32) + ids
  got = common.group_advantages(jnp.asarray(r), jnp.asarray(ids), 4, std=std, clip=None)
  want = np.empty_like(r)
  for g in range(4):
    m = ids == g
    scale = r.std() if std == "global" else r[m].std()
    want[m] = (r[m] - r[m].mean()) / (scale + 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ema_decay_schedule_and_update():
  steps = np.array([0, 10, 74, 75, 76, 200, 10_000])
  d = common.ema_decay(jnp.asarray(steps), start=0.0, slope=0.0075, end=0.999, start_step=75)
  want = np.where(steps < 75, 0.0, np.minimum(0.0075 * (steps - 75), 0.999))
  np.testing.assert_allclose(d, want, rtol=1e-6, atol=1e-7)
  snap = {"w": jnp.ones(3)}
  new = common.ema_update(snap, {"w": jnp.zeros(3)}, 0.25)
  np.testing.assert_allclose(new["w"], 0.25)


def test_stop_gradient_target_loss_has_gradient_g(rng):
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)).astype(np.float32))
  g = jnp.asarray(rng.normal(size=(3, 4, 4, 2)).astype(np.float32))
  grad = jax.grad(common.stop_gradient_target_loss)(x, g)
  np.testing.assert_allclose(grad, g / 3, rtol=1e-5, atol=1e-6)  # mean over the batch of 3


def test_kl_to_reference_matches_gaussian_kl(rng):
  mu = rng.normal(size=(2, 5)).astype(np.float32)
  mu_ref = rng.normal(size=(2, 5)).astype(np.float32)
  std = np.array([0.5, 2.0], np.float32)
  got = ddpo.kl_to_reference(jnp.asarray(mu), jnp.asarray(mu_ref), jnp.asarray(std))
  want = ((mu - mu_ref) ** 2 / (2 * std[:, None] ** 2)).mean(1)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rwr_weights():
  r = jnp.asarray([0.0, 1.0, 2.0, 3.0])
  w = ddpo.rwr_weights(r, mode="exp", temperature=1.0)
  np.testing.assert_allclose(w, 4 * np.exp([0, 1, 2, 3]) / np.exp([0, 1, 2, 3]).sum(), rtol=1e-6)
  w = ddpo.rwr_weights(r, mode="sparse", percentile=0.75)
  np.testing.assert_allclose(w, [0, 0, 0, 4.0])


def test_rwr_weights_follow_normalised_advantages_not_the_reward_scale():
  """RWR weights come from per-prompt normalised advantages, so any affine change of the reward
  leaves them unchanged; softmax of raw [0, 1] rewards spanned at most e (2.7x)."""
  from didr_jax.losses import common
  rng = np.random.default_rng(0)
  rewards = jnp.asarray(rng.uniform(0.0, 1.0, size=16).astype(np.float32))
  ids = jnp.arange(16) // 4
  adv = lambda r: common.group_advantages(r, ids, 4, std="global", clip=5.0)
  w1 = ddpo.rwr_weights(adv(rewards))
  w2 = ddpo.rwr_weights(adv(21.0 + 3.0 * rewards))           # a PickScore-like scale
  np.testing.assert_allclose(w1, w2, rtol=2e-3)       # up to the std floor eps = 1e-4
  assert float(jnp.max(w1) / jnp.min(w1)) > 10.0
  assert float(jnp.max(ddpo.rwr_weights(rewards)) / jnp.min(ddpo.rwr_weights(rewards))) < np.e


def test_dsm_loss_is_zero_at_the_target_and_matches_numpy():
  import numpy as np
  from didr_jax.losses import common
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(3, 2, 4, 4))
  alpha, sigma = np.array([0.9, 0.5, 0.2]), np.array([0.1, 0.5, 0.8])
  for ptype, target in (("epsilon", eps), ("sample", x0), ("flow", eps - x0),
                        ("v_prediction", alpha[:, None, None, None] * eps
                         - sigma[:, None, None, None] * x0)):
    assert float(common.dsm_loss(jnp.asarray(target), x0, eps, alpha, sigma, ptype)) < 1e-10
    out = rng.normal(size=x0.shape)
    per = ((out - target) ** 2).mean(axis=(1, 2, 3))
    w = np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(common.dsm_loss(jnp.asarray(out), x0, eps, alpha, sigma, ptype,
                                               weight=w), (per * w).mean(), rtol=1e-5)


def test_ppo_loss_mask_drops_deterministic_steps(rng):
  """Masked entries (std-0 steps) change neither the loss, its gradient nor the metrics, even
  with an arbitrary recomputed log-prob there; the rest is the unmasked formula on the kept."""
  n = 32
  logp_old = rng.normal(size=n).astype(np.float32)
  logp_new = (logp_old + rng.normal(scale=0.3, size=n)).astype(np.float32)
  adv = rng.normal(scale=2.0, size=n).astype(np.float32)
  mask = rng.random(n) < 0.6
  garbage = np.where(mask, logp_new, 1e4).astype(np.float32)  # exp(1e4) would be inf
  f = lambda lp: ddpo.ppo_loss(lp, jnp.asarray(logp_old), jnp.asarray(adv), clip_range=0.2,
                               mask=jnp.asarray(mask))
  (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(garbage))
  want, want_grad = _np_ppo(logp_new[mask].astype(np.float64), logp_old[mask].astype(np.float64),
                            adv[mask].astype(np.float64), 0.2, 5.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g)[mask], want_grad, rtol=1e-5, atol=1e-7)
  assert (np.asarray(g)[~mask] == 0).all()
  d = logp_new[mask] - logp_old[mask]
  np.testing.assert_allclose(m["approx_kl"], 0.5 * np.mean(d ** 2), rtol=1e-5)
  np.testing.assert_allclose(m["abs_dlogp"], np.mean(np.abs(d)), rtol=1e-5)
  np.testing.assert_allclose(m["clipfrac"], np.mean(np.abs(np.exp(d) - 1) > 0.2), rtol=1e-6)
  # all masked: loss 0, no NaN
  loss0, _ = ddpo.ppo_loss(jnp.asarray(garbage), jnp.asarray(logp_old), jnp.asarray(adv),
                           mask=jnp.zeros(n, bool))
  assert float(loss0) == 0.0


def test_kl_to_reference_is_zero_at_std_zero():
  """A deterministic step (std 0) with a mean difference of 1e-3 contributes 0 (the old floor
  of 1e-6 gave 5e5); the other samples get ||dmu||^2 / (2 s^2)."""
  mu = jnp.full((2, 4), 1e-3)
  got = ddpo.kl_to_reference(mu, jnp.zeros((2, 4)), jnp.asarray([0.0, 0.5]))
  np.testing.assert_allclose(got, [0.0, 1e-6 / (2 * 0.25)], rtol=1e-5)
  g = jax.grad(lambda m: ddpo.kl_to_reference(m, jnp.zeros((2, 4)), jnp.asarray([0.0, 0.5]))
               .sum())(mu)
  assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[0] == 0).all()


def test_ddim_kl_scale_is_the_step_std():
  """DDIM's KL scale (ddim.ddim_std) against the float64 formula; the last step with
  set_alpha_to_one has std 0 (masked)."""
  from didr_jax.diffusion import ddim
  from didr_jax.diffusion.schedules import VPSchedule, ddim_timesteps
  sched = VPSchedule.from_diffusers({"beta_schedule": "linear", "set_alpha_to_one": True,
                                     "timestep_spacing": "trailing"})
  ts, prevs = ddim_timesteps(sched, 10)
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  ab_t = abar[ts]
  ab_p = np.where(prevs >= 0, abar[np.maximum(prevs, 0)], 1.0)
  want = 0.8 * np.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
  got = ddim.ddim_std(jnp.asarray(ts), jnp.asarray(prevs), sched, 0.8)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert float(got[-1]) == 0.0 and float(got[0]) > 0


def _np_ppo_kl(lp_new, lp_old, adv, mask, steps, num_steps, eps, amax, beta, mu, mu_ref, s):
  """float64 loops over the slots j and samples i of docs/methods.md §1.2-1.3: (loss, metrics,
  d loss / d lp_new, d loss / d mu)."""
  b, kc = lp_new.shape
  dims = mu[0, 0].size
  a = np.clip(adv, -amax, amax)
  m = {k: 0.0 for k in ("approx_kl", "abs_dlogp", "clipfrac", "ratio_mean", "kl_ref")}
  m.update({k: np.zeros(num_steps) for k in ("steps_count", "clipfrac_steps",
                                             "abs_dlogp_steps")})
  loss, g_lp, g_mu = 0.0, np.zeros_like(lp_new), np.zeros_like(mu)
  for j in range(kc):
    live = [i for i in range(b) if mask[i, j]]
    n = max(len(live), 1)
    slot = {k: 0.0 for k in ("l", "kl", "d2", "ad", "clip", "r")}
    for i in live:
      r = np.exp(lp_new[i, j] - lp_old[i, j])
      unclipped, clipped = -a[i] * r, -a[i] * np.clip(r, 1 - eps, 1 + eps)
      slot["l"] += max(unclipped, clipped) / n
      g_lp[i, j] = (-a[i] * r if unclipped >= clipped else 0.0) / n
      d = lp_new[i, j] - lp_old[i, j]
      slot["d2"] += d * d / n
      slot["ad"] += abs(d) / n
      slot["clip"] += float(abs(r - 1) > eps) / n
      slot["r"] += r / n
      if s[i, j] > 1e-6:
        diff = mu[i, j] - mu_ref[i, j]
        slot["kl"] += np.sum(diff ** 2) / dims / (2 * s[i, j] ** 2) / n
        g_mu[i, j] = beta * diff / (dims * s[i, j] ** 2 * n)
    loss += slot["l"] + beta * slot["kl"]
    m["approx_kl"] += 0.5 * slot["d2"]
    m["abs_dlogp"] += slot["ad"]
    m["clipfrac"] += slot["clip"]
    m["ratio_mean"] += slot["r"]                          # a dead slot adds 0 everywhere
    m["kl_ref"] += slot["kl"]
    if live:
      m["steps_count"][steps[j]] += 1
      m["clipfrac_steps"][steps[j]] += slot["clip"]
      m["abs_dlogp_steps"][steps[j]] += slot["ad"]
  m["loss"] = loss
  return loss, m, g_lp, g_mu


def test_ppo_kl_loss_matches_float64_loops(rng):
  """``ppo_kl_loss`` (the trainer's loss of a micro-batch over its step slots) against float64
  loops: masked pairs (with a log-prob that would overflow exp) and a dead slot drop out, the KL
  term counts with weight kl_beta, std-0 scales give KL 0, no gradient reaches mu_ref."""
  b, kc, num_steps, eps, amax, beta = 6, 4, 5, 0.05, 1.5, 0.3
  steps = np.array([4, 0, 2, 1])
  lp_old = rng.normal(size=(b, kc))
  lp_new = lp_old + rng.normal(scale=0.08, size=(b, kc))
  adv = rng.normal(scale=1.5, size=b)
  mask = rng.random((b, kc)) < 0.7
  mask[:, 2] = False                                      # slot 2: no live pair
  mask[0, 0] = mask[1, 0] = True
  lp_new[~mask] = 1e4                                     # no density there: never used
  mu = rng.normal(size=(b, kc, 2, 3))
  mu_ref = mu + rng.normal(scale=0.2, size=mu.shape)
  s = rng.uniform(0.3, 1.0, size=(b, kc))
  s[1, 0] = 0.0                                           # live, but no KL scale
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  want, want_m, want_g_lp, want_g_mu = _np_ppo_kl(
      f32(lp_new).astype(np.float64), f32(lp_old).astype(np.float64), adv, mask, steps,
      num_steps, eps, amax, beta, f32(mu).astype(np.float64), f32(mu_ref).astype(np.float64),
      np.asarray(f32(s), np.float64))

  def f(lp, m, m_ref):
    return ddpo.ppo_kl_loss(lp, f32(lp_old), f32(adv), jnp.asarray(mask), jnp.asarray(steps),
                            num_steps=num_steps, clip_range=eps, adv_clip_max=amax,
                            kl_beta=beta, mean=m, mean_ref=m_ref, kl_scale=f32(s))
  (loss, m), (g_lp, g_mu, g_ref) = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
      f32(lp_new), f32(mu), f32(mu_ref))
  assert 0 < want_m["clipfrac"] < kc - 1 and want_m["kl_ref"] > 0
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert set(m) == set(want_m)
  for k, v in want_m.items():
    np.testing.assert_allclose(m[k], v, rtol=2e-5, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(g_lp, want_g_lp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_mu, want_g_mu, rtol=1e-5, atol=1e-7)
  assert (np.asarray(g_ref) == 0).all()
  # without the reference: the PPO part alone, no kl_ref
  loss0, m0 = ddpo.ppo_kl_loss(f32(lp_new), f32(lp_old), f32(adv), jnp.asarray(mask),
                               jnp.asarray(steps), num_steps=num_steps, clip_range=eps,
                               adv_clip_max=amax, kl_beta=beta)
  np.testing.assert_allclose(loss0, want - beta * want_m["kl_ref"], rtol=1e-5)
  assert "kl_ref" not in m0
