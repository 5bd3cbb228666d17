"""CRD losses (losses/crd.py) and the EMA snapshot schedules against independent references:
a float64 NumPy re-statement of the loss, central finite differences, a Python loop over prompts,
the unsharded run, and the decay formula evaluated step by step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from didr_jax.diffusion import kernels
from didr_jax.losses import common, crd

# ----------------------------------------------------------------------------- references


def _np_target(x0, eps, a, s, ptype):
  a, s = a[:, None], s[:, None]
  return {"epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0}[ptype]


def _np_center(x, ids):
  out = np.empty_like(x)
  for g in np.unique(ids):
    m = ids == g
    out[m] = x[m] - x[m].mean()
  return out


def _np_crd(out, out_old, out_ref, x0, eps, a, s, rewards, adv, ids, *, ptype, c_beta, loss_type,
            kl_beta, kl_weight, normalise, w_frozen=None):
  """The CRD loss restated in float64 NumPy; ``w_frozen`` fixes the (stop-gradient) normalisers."""
  y = _np_target(x0, eps, a, s, ptype)
  e_t, e_o = ((out - y) ** 2).mean(1), ((out_old - y) ** 2).mean(1)
  if not normalise:
    w_t = w_o = np.ones(len(out))
  elif w_frozen is not None:
    w_t, w_o = w_frozen
  else:
    w_t = np.maximum(np.abs(out - y).mean(1), 1e-5)
    w_o = np.maximum(np.abs(out_old - y).mean(1), 1e-5)
  r = -(e_t / w_t - e_o / w_o)
  unit = np.clip(adv, -5, 5) / 10 + 0.5
  rbar, tbar = _np_center(r, ids), _np_center(unit, ids)
  z = c_beta * rbar
  if loss_type == "mse":
    per = (z - tbar) ** 2
  else:
    lab = 1 / (1 + np.exp(-tbar))
    per = np.logaddexp(0, z) - lab * z
  loss = 5.0 / c_beta * per.mean()
  u = np.clip(rewards, 0, 1) if kl_weight == "reward" else unit
  kl = ((out - out_ref) ** 2).mean(1)
  loss += kl_beta * np.mean((1e-3 + u * (1 - 1e-3)) * kl)
  corr = np.sum(rbar * tbar) / np.sqrt(np.sum(rbar ** 2) * np.sum(tbar ** 2))
  return loss, (w_t, w_o), r, corr


def _problem(rng, *, b=16, d=4, num_prompts=5, ptype="flow", dtype=np.float32):
  """A tiny linear 'network' out = x_t W + b and a batch with non-contiguous, unequal groups."""
  ids = rng.integers(0, num_prompts, size=b)
  ids[:3] = [0, 0, 2]           # at least two non-adjacent samples of prompt 0
  x0 = rng.normal(size=(b, d))
  eps = rng.normal(size=(b, d))
  if ptype == "flow":
    a, s = kernels.flow_alpha_sigma(rng.uniform(0.05, 0.95, size=b))
  else:
    ang = rng.uniform(0.1, 1.4, size=b)
    a, s = np.cos(ang), np.sin(ang)
  a, s = np.asarray(a), np.asarray(s)
  x_t = np.asarray(kernels.q_sample(x0, eps, a, s))
  theta = {"w": rng.normal(scale=0.3, size=(d, d)), "b": rng.normal(scale=0.1, size=d)}
  old = {"w": theta["w"] + rng.normal(scale=0.05, size=(d, d)), "b": theta["b"]}
  ref = {"w": rng.normal(scale=0.3, size=(d, d)), "b": np.zeros(d)}
  rewards = rng.uniform(0, 1, size=b)
  adv, _ = crd.reward_to_advantage(jnp.asarray(rewards, jnp.float32), jnp.asarray(ids), num_prompts)
  cast = lambda t: jax.tree.map(lambda v: np.asarray(v, dtype), t)
  return dict(ids=ids, x0=cast(x0), eps=cast(eps), a=cast(a), s=cast(s), x_t=cast(x_t),
              theta=cast(theta), old=cast(old), ref=cast(ref), rewards=cast(rewards),
              adv=cast(np.asarray(adv)), num_prompts=num_prompts, ptype=ptype)


def _apply(p, x):
  return x @ p["w"] + p["b"]


def _loss_fn(pb, **kw):
  def f(theta, rewards=pb["rewards"], adv=pb["adv"]):
    out = _apply(theta, pb["x_t"])
    return crd.crd_loss(out, _apply(pb["old"], pb["x_t"]), _apply(pb["ref"], pb["x_t"]), pb["x0"],
                        pb["eps"], pb["a"], pb["s"], rewards, adv, jnp.asarray(pb["ids"]),
                        pb["num_prompts"], prediction_type=pb["ptype"], **kw)
  return f


# ----------------------------------------------------------------------------- implicit reward


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "flow"])
def test_implicit_reward_matches_numpy_and_is_zero_at_old(rng, ptype):
  pb = _problem(rng, ptype=ptype)
  out, out_old = _apply(pb["theta"], pb["x_t"]), _apply(pb["old"], pb["x_t"])
  args = (pb["x0"], pb["eps"], pb["a"], pb["s"], ptype)
  f64 = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float64), t)
  _, _, want, _ = _np_crd(*f64((out, out_old, out, pb["x0"], pb["eps"], pb["a"], pb["s"],
                                pb["rewards"], pb["adv"])), pb["ids"], ptype=ptype, c_beta=1.0,
                          loss_type="mse", kl_beta=0.0, kl_weight="reward", normalise=True)
  np.testing.assert_allclose(crd.implicit_reward(out, out_old, *args), want, rtol=2e-5, atol=1e-6)
  # theta == old: exactly zero, eagerly and under jit, and so is the centered correlation.
  same = _apply(pb["theta"], pb["x_t"])
  for fn in (crd.implicit_reward, jax.jit(crd.implicit_reward, static_argnums=(6,))):
    r = np.asarray(fn(out, same, *args))
    assert np.all(r == 0.0), r
  # Through the jitted loss, both snapshots being traced parameters of the same network (a
  # constant "old" would be folded at compile time with another matmul and differ in the last bit).
  def loss_at(theta, old):
    x = jnp.asarray(pb["x_t"])
    return crd.crd_loss(_apply(theta, x), _apply(old, x), _apply(pb["ref"], x), pb["x0"],
                        pb["eps"], pb["a"], pb["s"], pb["rewards"], pb["adv"],
                        jnp.asarray(pb["ids"]), pb["num_prompts"], prediction_type=ptype)
  _, m = jax.jit(loss_at)(pb["theta"], pb["theta"])
  assert float(m["implicit_reward_abs"]) == 0.0 and float(m["corr"]) == 0.0


def test_normaliser_floor_and_no_gradient_through_it(rng):
  y = jnp.zeros((2, 3))
  out = jnp.asarray([[1e-7, -1e-7, 0.0], [0.5, -0.5, 1.0]])
  _, w_t, _ = crd._implicit_reward(out, out, y, y, 1.0, 0.0, "epsilon")  # target = eps = 0
  np.testing.assert_allclose(w_t, [1e-5, 2 / 3], rtol=1e-6)
  # d r / d out = -2 (out - y) / (D w): w is a constant (stop-gradient).
  g = jax.grad(lambda o: jnp.sum(crd.implicit_reward(o, out, y, y, 1.0, 0.0, "epsilon")))(out)
  np.testing.assert_allclose(g, -2 * np.asarray(out) / (3 * np.asarray(w_t)[:, None]), rtol=1e-5)


# ----------------------------------------------------------------------------- centering


def test_segment_centering_matches_loop_shuffle_and_sharding(rng):
  b, num_prompts = 32, 7
  ids = rng.integers(0, num_prompts - 1, size=b)   # prompt 6 absent, sizes unequal, shuffled
  ids[5] = 5
  ids[ids == 5] = 1
  ids[9] = 5                                         # a prompt with a single sample
  x = rng.normal(size=b).astype(np.float32)
  want = _np_center(x.astype(np.float64), ids)
  got = common.center_in_groups(jnp.asarray(x), jnp.asarray(ids), num_prompts)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got[9] == 0.0
  perm = rng.permutation(b)
  got_p = common.center_in_groups(jnp.asarray(x[perm]), jnp.asarray(ids[perm]), num_prompts)
  np.testing.assert_allclose(np.asarray(got_p)[np.argsort(perm)], got, atol=1e-6)

  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  mesh = Mesh(np.array(jax.devices()), ("data",))
  shard = NamedSharding(mesh, P("data"))
  xs, ids_s = jax.device_put(jnp.asarray(x), shard), jax.device_put(jnp.asarray(ids), shard)
  assert len(xs.sharding.device_set) == 8
  f = jax.jit(common.center_in_groups, static_argnums=2, out_shardings=shard)
  got_s = f(xs, ids_s, num_prompts)
  np.testing.assert_allclose(got_s, got, atol=1e-6)

  # The whole loss and its gradient, batch sharded over 8 devices, equal the unsharded run.
  pb = _problem(rng, b=32, num_prompts=num_prompts)
  pb["ids"] = ids
  fn = jax.value_and_grad(_loss_fn(pb), has_aux=True)
  (l0, m0), g0 = jax.jit(fn)(pb["theta"])
  for k in ("x0", "eps", "a", "s", "x_t", "rewards", "adv"):
    pb[k] = jax.device_put(jnp.asarray(pb[k]), shard)
  pb["ids"] = np.asarray(ids)
  def sharded(theta, x0, eps, a, s, x_t, rewards, adv, ids_):
    q = dict(pb, x0=x0, eps=eps, a=a, s=s, x_t=x_t, rewards=rewards, adv=adv)
    out = _apply(theta, x_t)
    return crd.crd_loss(out, _apply(q["old"], x_t), _apply(q["ref"], x_t), x0, eps, a, s, rewards,
                        adv, ids_, num_prompts, prediction_type="flow")
  (l1, m1), g1 = jax.jit(jax.value_and_grad(sharded, has_aux=True))(
      pb["theta"], pb["x0"], pb["eps"], pb["a"], pb["s"], pb["x_t"], pb["rewards"], pb["adv"],
      jax.device_put(jnp.asarray(ids), shard))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  np.testing.assert_allclose(m1["corr"], m0["corr"], rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), g1, g0)


# ----------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("loss_type", ["mse", "bce"])
def test_per_prompt_constant_leaves_loss_and_gradient_unchanged(rng, loss_type):
  pb = _problem(rng)
  ids = jnp.asarray(pb["ids"])
  const = rng.normal(scale=3.0, size=pb["num_prompts"]).astype(np.float32)
  # (1) Through the whole pipeline: rewards -> per-prompt advantages (each prompt's own std)
  # -> crd_loss, KL weighted by the mapped advantage. R + c(prompt) gives the same loss/grad.
  def pipeline(theta, rewards):
    adv, _ = crd.reward_to_advantage(rewards, ids, pb["num_prompts"], std="group")
    return _loss_fn(pb, loss_type=loss_type, kl_weight="advantage")(theta, rewards, adv)
  vg = jax.jit(jax.value_and_grad(pipeline, has_aux=True))
  (l0, _), g0 = vg(pb["theta"], jnp.asarray(pb["rewards"]))
  (l1, _), g1 = vg(pb["theta"], jnp.asarray(pb["rewards"] + const[pb["ids"]]))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7), g1, g0)
  # (2) The centered matching itself: constants added to the matched target and to the implicit
  # reward (the log Z(c) of the derivation) cancel exactly in the loss and its gradient in r.
  r = jnp.asarray(rng.normal(scale=0.1, size=len(ids)).astype(np.float32))
  t = jnp.asarray(pb["adv"] / 10 + 0.5)
  f = lambda r_, t_: crd.policy_loss(r_, t_, ids, pb["num_prompts"], c_beta=0.5,
                                     loss_type=loss_type)[0]
  lv, gv = jax.value_and_grad(f)(r, t)
  c2 = rng.normal(size=pb["num_prompts"]).astype(np.float32)
  lv2, gv2 = jax.value_and_grad(f)(r + c2[pb["ids"]], t + const[pb["ids"]])
  np.testing.assert_allclose(lv2, lv, rtol=1e-5)
  np.testing.assert_allclose(gv2, gv, rtol=1e-4, atol=1e-7)
  assert float(jnp.max(jnp.abs(gv))) > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("loss_type", ["mse", "bce"])
def test_mse_and_bce_share_the_minimiser(rng, loss_type):
  ids = jnp.asarray(rng.integers(0, 4, size=24))
  t = jnp.asarray(rng.uniform(0, 1, size=24).astype(np.float32))
  tbar = common.center_in_groups(t, ids, 4)
  r = tbar / 2.0 + jnp.asarray(rng.normal(size=4).astype(np.float32))[ids]  # c_beta rbar = tbar
  g = jax.grad(lambda r_: crd.policy_loss(r_, t, ids, 4, c_beta=2.0, loss_type=loss_type)[0])(r)
  np.testing.assert_allclose(g, 0.0, atol=1e-6)
  g_off = jax.grad(lambda r_: crd.policy_loss(r_, t, ids, 4, c_beta=2.0,
                                              loss_type=loss_type)[0])(r + 0.1 * tbar)
  assert float(jnp.max(jnp.abs(g_off))) > 1e-3


# ----------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("ptype,loss_type,normalise,kl_weight", [
    ("flow", "mse", True, "reward"), ("epsilon", "bce", True, "advantage"),
    ("v_prediction", "mse", False, "reward")])
def test_loss_and_gradient_match_numpy_and_finite_differences(rng, ptype, loss_type, normalise,
                                                              kl_weight):
  with jax.enable_x64(True):
    pb = _problem(rng, ptype=ptype, dtype=np.float64)
    kw = dict(c_beta=0.7, loss_type=loss_type, kl_beta=0.1, kl_weight=kl_weight,
              normalise=normalise)
    (loss, m), grad = jax.jit(jax.value_and_grad(_loss_fn(pb, **kw), has_aux=True))(pb["theta"])
    assert loss.dtype == jnp.float64
    np_kw = dict(ptype=ptype, c_beta=0.7, loss_type=loss_type, kl_beta=0.1, kl_weight=kl_weight,
                 normalise=normalise)

    def np_loss(theta, w_frozen=None):
      return _np_crd(_apply(theta, pb["x_t"]), _apply(pb["old"], pb["x_t"]),
                     _apply(pb["ref"], pb["x_t"]), pb["x0"], pb["eps"], pb["a"], pb["s"],
                     pb["rewards"], pb["adv"], pb["ids"], w_frozen=w_frozen, **np_kw)

    want, w0, _, corr = np_loss(pb["theta"])
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    np.testing.assert_allclose(m["corr"], corr, rtol=1e-10)
    # Central differences of the NumPy loss with the stop-gradient normalisers held at theta.
    h = 1e-6
    for k in ("w", "b"):
      fd = np.zeros_like(pb["theta"][k])
      for idx in np.ndindex(fd.shape):
        tp = {q: v.copy() for q, v in pb["theta"].items()}
        tm = {q: v.copy() for q, v in pb["theta"].items()}
        tp[k][idx] += h
        tm[k][idx] -= h
        fd[idx] = (np_loss(tp, w0)[0] - np_loss(tm, w0)[0]) / (2 * h)
      np.testing.assert_allclose(grad[k], fd, rtol=1e-6, atol=1e-9)
      assert np.max(np.abs(fd)) > 1e-3


# ----------------------------------------------------------------------------- mapping, KL


def test_reward_to_advantage_and_kl_weights(rng):
  ids = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
  r = rng.uniform(0, 1, size=10).astype(np.float32)
  r[3] = 40.0                                   # forces the +5 clip for prompt 2
  adv, unit = crd.reward_to_advantage(jnp.asarray(r), jnp.asarray(ids), 3)
  r64 = r.astype(np.float64)
  want = np.clip(_np_center(r64, ids) / (r64.std() + 1e-4), -5, 5)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(unit, want / 10 + 0.5, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(unit)) <= 1.0 and float(jnp.min(unit)) >= 0.0
  w = crd.kl_weights(jnp.asarray([-0.5, 0.0, 0.3, 1.0, 2.0]), jnp.full(5, 0.5))
  np.testing.assert_allclose(w, 1e-3 + np.array([0, 0, 0.3, 1, 1]) * (1 - 1e-3), rtol=1e-6)
  w = crd.kl_weights(jnp.zeros(3), jnp.asarray([0.0, 0.25, 1.0]), mode="advantage", kl_min=0.1)
  np.testing.assert_allclose(w, [0.1, 0.325, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="kl weight mode"):
    crd.kl_weights(jnp.zeros(3), jnp.zeros(3), mode="adv")
  with pytest.raises(ValueError, match="loss_type"):
    crd.policy_loss(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3, jnp.int32), 1, loss_type="l1")


# ----------------------------------------------------------------------------- EMA schedules


def _formula(step, start, slope, end, start_step):
  return start if step < start_step else min(start + slope * (step - start_step), end)


@pytest.mark.parametrize("sched", [crd.OLD_SNAPSHOT, crd.SAMPLER_SNAPSHOT,
                                   common.SnapshotSchedule(0.5, 0.1, 0.9, 3)],
                         ids=["old", "sampler", "custom"])
def test_snapshot_schedules_match_the_formula_step_by_step(rng, sched):
  theta = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  snap = jax.tree.map(jnp.asarray, theta)
  ref = theta["w"].astype(np.float64)
  update = jax.jit(sched.update)
  decays = []
  for step in range(260):
    theta = {"w": theta["w"] + rng.normal(scale=0.1, size=(3, 2)).astype(np.float32)}
    snap, d = update(snap, theta, step)
    want_d = _formula(step, sched.start, sched.slope, sched.end, sched.start_step)
    np.testing.assert_allclose(float(d), want_d, rtol=1e-6, atol=1e-7)
    ref = want_d * ref + (1 - want_d) * theta["w"].astype(np.float64)
    np.testing.assert_allclose(snap["w"], ref, rtol=1e-5, atol=1e-5)
    decays.append(float(d))
  decays = np.array(decays)
  s0 = sched.start_step
  assert np.all(decays[:s0 + 1] == np.float32(sched.start))        # flat until start_step
  assert decays[s0 + 1] > decays[s0]                                 # then ramps
  assert decays[-1] == np.float32(sched.end) and np.all(np.diff(decays) >= 0)


def test_snapshot_schedule_defaults_and_checks():
  assert crd.OLD_SNAPSHOT.as_dict() == dict(start=0.25, slope=0.005, end=0.999, start_step=0)
  assert crd.SAMPLER_SNAPSHOT.as_dict() == dict(start=0.0, slope=0.0075, end=0.999, start_step=75)
  assert common.SnapshotSchedule.of(crd.SAMPLER_SNAPSHOT.as_dict()) == crd.SAMPLER_SNAPSHOT
  # The old snapshot hits its end at step (0.999 - 0.25) / 0.005 = 149.8; the sampler at 208.2.
  assert float(crd.OLD_SNAPSHOT.decay(149)) == pytest.approx(0.995, abs=1e-6)
  assert float(crd.OLD_SNAPSHOT.decay(150)) == pytest.approx(0.999, abs=1e-7)
  assert float(crd.SAMPLER_SNAPSHOT.decay(208)) == pytest.approx(0.9975, abs=1e-6)
  assert float(crd.SAMPLER_SNAPSHOT.decay(209)) == pytest.approx(0.999, abs=1e-7)
  for bad in (dict(start=1.5, slope=0, end=1), dict(start=0, slope=-1, end=1),
              dict(start=0, slope=0, end=1, start_step=-2)):
    with pytest.raises(ValueError):
      common.SnapshotSchedule(**bad)


def test_crd_section_defaults_and_one_line_errors():
  from didr_jax.errors import ConfigError
  from didr_jax.train.crd_config import crd_section, validate_crd_section
  d = crd_section()
  snaps = validate_crd_section(d)
  assert snaps == {"old": crd.OLD_SNAPSHOT, "sampler": crd.SAMPLER_SNAPSHOT}
  assert (d.loss, d.c_beta, d.adv_clip, d.kl_beta, d.kl_cfg, d.kl_min, d.kl_weight) == (
      "mse", 1.0, 5.0, 0.1, 4.5, 1e-3, "reward")
  for key, value, msg in (("loss", "l2", "config.crd.loss: 'l2'"),
                          ("kl_weight", "adv", "config.crd.kl_weight"),
                          ("c_beta", 0.0, "config.crd.c_beta: must be > 0")):
    bad = crd_section()
    bad[key] = value
    with pytest.raises(ConfigError, match=msg):
      validate_crd_section(bad)
  bad = crd_section()
  bad.sampler.end = 1.2
  with pytest.raises(ConfigError, match=r"config.crd.sampler: end: a decay must lie in \[0, 1\]"):
    validate_crd_section(bad)
