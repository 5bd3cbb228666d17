"""The DDPO policy's steps without a model: how many steps are trained (int, at least 1, never
more than the stochastic ones), which ones (never a deterministic step, only inside the SDE
window, one set per micro-batch, a random window shared by a micro-batch), the noise-level
vectors (deterministic last step, windows), per-step diagnostics, and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing.configs import load_config
from didr_jax.train import advantages, config as config_lib, ddpo_config
from didr_jax.train.ddpo import DDPOTrainer, clip_step_grad, epoch_metrics


def dit(**kw):
  return load_config("toy_ddpo_dit", **kw)


def bare_trainer(c):
  """A DDPOTrainer with only what the step-layout code needs (no model)."""
  t = object.__new__(DDPOTrainer)
  t.c = c
  t.mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  t.rules = tuple(c.mesh.rules) + mesh_lib.DEFAULT_RULES
  t.num_train_t = ddpo_config.train_steps(c.sample, c.train)
  return t


@pytest.mark.parametrize("steps,frac,det,window,want", [
    (10, 0.99, False, (0, 0), 9),   # Flow-GRPO: int(9.9) = 9, round() gave 10
    (10, 0.5, True, (0, 0), 5),
    (10, 1.0, True, (0, 0), 9),     # capped at the 9 stochastic steps
    (10, 0.01, True, (0, 0), 1),    # at least one
    (10, 0.5, True, (3, 2), 2),     # capped at the window
    (10, 1.0, False, (0, 0), 10)])
def test_train_steps(steps, frac, det, window, want):
  c = dit(**{"sample.num_steps": steps, "train.timestep_fraction": frac,
             "sample.deterministic_last_step": det, "sample.sde_window": window})
  assert ddpo_config.train_steps(c.sample, c.train) == want
  assert config_lib.validate(c, 1)["timesteps_trained_per_sample"] == want


def test_levels_deterministic_last_step_and_window():
  t = bare_trainer(dit(**{"sample.sde_window": (2, 3)}))
  np.testing.assert_allclose(t.levels(0.7, 10), [0.7] * 9 + [0.0], rtol=1e-7)
  np.testing.assert_allclose(t.levels(0.7, 10, 2), [0, 0, 0.7, 0.7, 0.7, 0, 0, 0, 0, 0], rtol=1e-7)
  t = bare_trainer(dit(**{"sample.deterministic_last_step": False}))
  np.testing.assert_allclose(t.levels(0.7, 10), [0.7] * 10, rtol=1e-7)
  assert not t.levels(0.0, 10).any()  # evaluation with eta 0: the ODE
  t = bare_trainer(dit(**{"sample.sde_window": (-1, 3)}))
  starts = {t.window_start(jax.random.key(i)) for i in range(200)}
  assert starts == set(range(0, 7))  # 9 stochastic steps, windows of 3: starts 0..6


def _data(n, steps, levels, stochastic=None):
  lat = jnp.arange(n * (steps + 1), dtype=jnp.float32).reshape(n, steps + 1, 1, 1, 1)
  d = {"latents": jnp.broadcast_to(lat, (n, steps + 1, 2, 2, 1)),
       "log_probs": jnp.where(levels > 0, -1.0, 0.0), "levels": jnp.asarray(levels),
       "timesteps": jnp.linspace(1.0, 0.1, steps), "next_timesteps": jnp.linspace(0.9, 0.0, steps),
       "advantages": jnp.arange(n, dtype=jnp.float32), "rewards": jnp.zeros(n),
       "cond": {"e": jnp.arange(n, dtype=jnp.float32)[:, None]}}
  if stochastic is not None:
    d["stochastic"] = jnp.asarray(stochastic)
  return d


def test_prepare_selects_stochastic_steps_shared_per_micro_batch():
  c = dit(**{"sample.num_steps": 6, "sample.batch_size": 8, "sample.num_batches": 2,
             "sample.group_size": 4, "train.batch_size": 4, "train.grad_accum": 2,
             "train.timestep_fraction": 1.0})
  t = bare_trainer(c)
  assert t.num_train_t == 5
  levels = np.tile(t.levels(0.7, 6), (16, 1))
  # a schedule-deterministic step at a nonzero level (as DDIM's last step): never selected
  stoch = levels > 0
  stoch[:, 2] = False
  c2 = dit(**{"sample.num_steps": 6, "sample.batch_size": 8, "sample.num_batches": 2,
              "sample.group_size": 4, "train.batch_size": 4, "train.grad_accum": 2,
              "train.timestep_fraction": 0.5})
  t2 = bare_trainer(c2)
  for seed in range(5):
    out = t2._prepare_impl(jax.random.key(seed), _data(16, 6, levels, stoch))
    assert out["step"].shape == (2, 2, 4, 3)
    steps = np.asarray(out["step"])
    assert not np.isin(steps, [2, 5]).any()  # std-0 step and the deterministic last step
    assert (steps == steps[:, :, :1]).all()   # one set of steps per micro-batch
    assert all(len(set(r)) == 3 for r in steps.reshape(-1, 3))
    # the gathered data belong to the selected steps and the shuffled samples
    x_t = np.asarray(out["x_t"])[..., 0, 0, 0]
    sample = np.asarray(out["adv"]).astype(int)
    np.testing.assert_array_equal(x_t, sample[..., None] * 7 + steps)
    np.testing.assert_array_equal(np.asarray(out["cond"]["e"])[..., 0], sample)
    assert sorted(sample.reshape(-1)) == list(range(16))
    np.testing.assert_allclose(out["level"], 0.7)
  # all 5 stochastic steps with fraction 1: every one of them once per micro-batch
  out = t._prepare_impl(jax.random.key(0), _data(16, 6, levels))
  assert (np.sort(np.asarray(out["step"]), -1) == np.arange(5)).all()


def test_prepare_random_window_micro_batches_share_a_window():
  c = dit(**{"sample.num_steps": 8, "sample.batch_size": 8, "sample.num_batches": 3,
             "sample.group_size": 4, "train.batch_size": 4, "train.grad_accum": 2,
             "train.timestep_fraction": 1.0, "sample.sde_window": (-1, 2)})
  config_lib.validate(c, 1)
  t = bare_trainer(c)
  assert t.num_train_t == 2
  levels = np.concatenate([np.tile(t.levels(0.7, 8, t.window_start(jax.random.key(b))), (8, 1))
                           for b in range(3)])
  for seed in range(4):
    out = t._prepare_impl(jax.random.key(seed), _data(24, 8, levels))
    sample = np.asarray(out["adv"]).astype(int).reshape(-1, 4)   # (micro-batches, b)
    steps = np.asarray(out["step"]).reshape(-1, 4, 2)
    for mb, st in zip(sample, steps):
      assert len(set(mb // 8)) == 1                  # one sampling batch per micro-batch
      window = np.flatnonzero(levels[mb[0]] > 0)
      assert sorted(st[0]) == sorted(window)          # trains exactly its window


def test_epoch_metrics_per_step():
  n = 4
  u1 = {"loss": np.float32(1.0), "steps_count": np.array([2, 0, 1, 0], np.float32),
        "clipfrac_steps": np.array([1.0, 0, 0.5, 0]), "abs_dlogp_steps": np.array([2e-4, 0, 1e-4, 0]),
        "grad_norm_steps": np.array([6.0, 0, 1.0, 0])}
  u2 = {"loss": np.float32(3.0), "steps_count": np.array([0, 0, 1, 0], np.float32),
        "clipfrac_steps": np.array([0, 0, 0.25, 0]), "abs_dlogp_steps": np.array([0, 0, 3e-4, 0]),
        "grad_norm_steps": np.array([0, 0, 3.0, 0])}
  m = epoch_metrics([u1, u2])
  assert m["loss"] == 2.0
  assert m["clipfrac/step_00"] == 0.5 and m["clipfrac/step_02"] == 0.375
  assert m["grad_norm/step_00"] == 3.0 and m["grad_norm/step_02"] == 2.0
  assert m["abs_dlogp/step_02"] == pytest.approx(2e-4)
  assert not any(k.endswith(("step_01", "step_03")) for k in m)
  del n


@pytest.mark.parametrize("overrides,match", [
    ({"sample.sde_type": "ode"}, "sample.sde_type"),
    ({"sample.sde_window": (5, 5)}, "sample.sde_window"),   # 5 + 5 > 9 stochastic steps
    ({"sample.sde_window": (-1, 0)}, "sample.sde_window"),
    ({"sample.sde_window": (-1, 2), "sample.batch_size": 24, "sample.group_size": 8},
     "train.batch_size"),                                    # 24 % 16
    ({"sample.num_steps": 1}, "deterministic_last_step"),
    ({"ddpo.advantage_std": "prompt"}, "ddpo.advantage_std"),
    ({"ddpo.advantage": "batch"}, "ddpo.advantage"),
    ({"ddpo.step_grad_clip": -1.0}, "ddpo.step_grad_clip"),
])
def test_config_errors(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(dit(**overrides), 1)


def test_cps_is_flow_only():
  config_lib.validate(dit(**{"sample.sde_type": "cps"}), 1)
  with pytest.raises(config_lib.ConfigError, match="sample.sde_type"):
    config_lib.validate(load_config("toy_ddpo", **{"sample.sde_type": "cps"}), 1)


def test_flow_eval_is_the_ode_and_advantage_std_is_passed():
  assert dit().eval.eta == 0.0 and load_config("toy_ddpo").eval.eta == 1.0
  assert dit().ddpo.advantage_std == "global"
  prompts = ["a"] * 4 + ["b"] * 4
  r = np.array([0, 1, 2, 3, 0, 10, 20, 30], np.float64)
  group = advantages.AdvantageNormalizer("group", group_std="group")(prompts, r)
  np.testing.assert_allclose([group[:4].std(), group[4:].std()], [1, 1], rtol=1e-3)
  glob = advantages.AdvantageNormalizer("group", group_std="global")(prompts, r)
  np.testing.assert_allclose(glob * (r.std() + 1e-4), r - np.repeat([1.5, 15], 4), rtol=1e-5)
  from didr_jax.train.ddpo import make_normalizer
  d = dit().ddpo
  for std in ("group", "global"):
    d.advantage_std = std
    np.testing.assert_allclose(make_normalizer(d)(prompts, r), group if std == "group" else glob)


def test_clip_step_grad():
  g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}   # norm 5
  out = clip_step_grad(g, 1.0)
  np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [[0.8]], rtol=1e-6)
  assert clip_step_grad(g, 10.0)["a"][0] == 3.0 and clip_step_grad(g, 0.0) is g
