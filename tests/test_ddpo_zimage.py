"""configs/ddpo_zimage.py (Flow-GRPO-style DDPO on the flow SDE) on a tiny random Z-Image
folder: ratio == 1, no clipping and KL-to-reference 0 at the first update; two epochs through
the shared training loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing import configs, tiny_zimage
from didr_jax.train import loop

def load_config(**overrides):
  return configs.load_config("ddpo_zimage", **overrides)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("zimage"))
  tiny_zimage.save_tiny_zimage(path, seed=5)
  return path


def small(folder, **kw):
  base = {"backbone.path": folder, "backbone.dtype": "float32", "sample.num_steps": 3,
          "sample.batch_size": 8, "sample.group_size": 4, "sample.num_batches": 2,
          "train.batch_size": 8, "train.grad_accum": 2, "train.timestep_fraction": 1.0,
          "num_epochs": 2, "eval.num_samples": 8, "eval.batch_size": 8, "eval.num_steps": 3,
          "log_images": 4, "checkpoint_every": 1, "async_checkpoint": False,
          "train.learning_rate": 3e-4}  # a tiny random model: move it enough to see clipping
  base.update(kw)
  return load_config(**base)


def test_config_is_flow_grpo():
  c = load_config()
  assert c.backbone.kind == "zimage" and c.ddpo.advantage == "group"
  assert c.sample.eta == 0.7 and c.sample.num_steps == 10 and c.sample.guidance_scale == 4.5
  assert c.sample.group_size > 1 and c.ddpo.kl_beta == 0.04 and c.ddpo.clip_range == 1e-4
  from didr_jax.train import config as config_lib
  info = config_lib.validate(c, num_devices=8)
  assert info["optimizer_steps_per_epoch"] == 2 and info["timesteps_trained_per_sample"] == 9


def _first_minibatch(c, advantages):
  """A single-device trainer, its state, one sampled epoch (4 + 4 images of two prompts) with
  the given advantages, and that epoch's first training minibatch."""
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = trainer.init_state()
  prompts = ["a red circle"] * 4 + ["two blue squares"] * 4
  levels = trainer.levels(c.sample.eta, c.sample.num_steps, max(c.sample.sde_window[0], 0))
  traj, images, cond, uncond = trainer.sample(trainer.policy_params(state), prompts,
                                              jax.random.key(0), levels=levels)
  n = len(prompts)
  data = {"latents": jnp.swapaxes(traj.latents, 0, 1),
          "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond,
          "levels": jnp.broadcast_to(traj.levels, (n,) + traj.levels.shape),
          "stochastic": jnp.broadcast_to(traj.stochastic, (n,) + traj.stochastic.shape),
          "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
          "advantages": advantages, "rewards": jnp.linspace(0, 1, 8)}
  first = jax.tree.map(lambda x: x[0], trainer._prepare(jax.random.key(1), data))
  return trainer, state, traj, images, first, uncond


def test_ratio_is_one_before_the_first_update(folder):
  c = small(folder, **{"sample.num_batches": 1, "train.grad_accum": 1})
  trainer, state, traj, images, first, uncond = _first_minibatch(c, jnp.linspace(-1.0, 2.0, 8))
  assert trainer.bb.family == "flow" and trainer.ref_params is not None
  assert images.shape == (8, 32, 32, 3) and traj.latents.shape == (4, 8, 16, 16, 16)
  assert float(traj.timesteps[0]) == 1.0 and float(traj.next_timesteps[-1]) == 0.0
  _, m = trainer._update(state, first, uncond, trainer.ref_params,
                         jnp.float32(c.sample.guidance_scale), jax.random.key(2))
  print({k: np.asarray(v).tolist() for k, v in m.items()})
  # the sampling-time parameters recompute the stored log-probabilities (a different XLA
  # program: float32 rounding only), nothing is clipped, and the policy is the reference.
  assert abs(float(m["ratio_mean"]) - 1.0) < 1e-6
  assert float(m["approx_kl"]) < 1e-12
  assert float(m["clipfrac"]) == 0.0
  assert float(m["kl_ref"]) < 1e-12
  assert float(m["grad_norm"]) > 0
  # deterministic last step: an Euler step, no log-prob, never trained
  np.testing.assert_array_equal(traj.stochastic, [True, True, False])
  assert (np.asarray(traj.log_probs[-1]) == 0).all() and (np.asarray(traj.log_probs[:2]) != 0).all()
  assert not np.isin(np.asarray(first["step"]), [2]).any()
  # per-step diagnostics: both stochastic steps trained once per micro-batch slot
  np.testing.assert_allclose(np.asarray(m["steps_count"]) * 2, [1, 1, 0])
  assert (np.asarray(m["grad_norm_steps"])[:2] > 0).all() and m["grad_norm_steps"][2] == 0


def test_cps_window_ratio_one_and_ode_evaluation(folder):
  """CPS in an SDE window of one step: log-probs only there, ratio 1 and KL 0 at the first
  update; the evaluation sampler (eta 0) is the ODE: no stochastic step, no log-prob."""
  c = small(folder, **{"sample.num_batches": 1, "train.grad_accum": 1, "sample.sde_type": "cps",
                       "sample.sde_window": (1, 1)})
  trainer, state, traj, _, first, uncond = _first_minibatch(c, jnp.linspace(-1.0, 2.0, 8))
  assert trainer.num_train_t == 1
  np.testing.assert_array_equal(traj.stochastic, [False, True, False])
  lp = np.asarray(traj.log_probs)
  assert (lp[[0, 2]] == 0).all() and (lp[1] != 0).all()
  assert (np.asarray(first["step"]) == 1).all()
  state, m = trainer._update(state, first, uncond, trainer.ref_params,
                             jnp.float32(c.sample.guidance_scale), jax.random.key(2))
  assert abs(float(m["ratio_mean"]) - 1.0) < 1e-6 and float(m["clipfrac"]) == 0.0
  assert float(m["kl_ref"]) < 1e-12
  params = trainer.policy_params(state)  # (the update donated the old state)
  prompts = ["a red circle"] * 8
  t1, _, _, _ = trainer.sample(params, prompts, jax.random.key(3), eta=c.eval.eta)
  assert c.eval.eta == 0.0 and not np.asarray(t1.stochastic).any()
  assert (np.asarray(t1.log_probs) == 0).all()


def test_update_raises_the_advantage_weighted_log_prob(folder):
  """The direction check of the flow policy gradient: one optimizer step on a minibatch lowers
  the surrogate -mean_i A_i exp(logp_new_i - logp_old_i) on that minibatch, i.e. it makes the
  positive-advantage transitions more likely and the negative ones less (clip off)."""
  c = small(folder, **{"sample.num_batches": 1, "train.grad_accum": 1, "ddpo.kl_beta": 0.0,
                       "ddpo.clip_range": 1e6, "train.learning_rate": 1e-5,
                       "train.timestep_fraction": 1 / 3})
  trainer, state, _, _, first, uncond = _first_minibatch(c, jnp.array([1.0, -1.0] * 4))
  micro = jax.tree.map(lambda x: x[0], first)
  guidance = jnp.float32(c.sample.guidance_scale)
  surrogate = lambda params: float(trainer._ppo_loss(params, micro, 0, uncond, None, guidance)[0])
  before = surrogate(trainer.policy_params(state))
  state, _ = trainer._update(state, first, uncond, None, guidance, jax.random.key(2))
  after = surrogate(trainer.policy_params(state))
  print(before, after)
  assert abs(before) < 1e-5  # ratio 1 and advantages summing to 0
  assert after < before - 1e-4


def test_config_runs_two_epochs(folder, tmp_path):
  # 4 x 8 samples per epoch, 2 optimizer steps of 2 x 8: the second step is off-policy
  metrics = loop.train(small(folder, **{"sample.num_batches": 4}), str(tmp_path / "run"))
  print(metrics)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["kl_ref"])
  assert metrics["reward_mean"] < 0 and "eval/jpeg_compressibility" in metrics  # -kB of JPEG
  assert metrics["clipfrac"] > 0  # step 2 of an epoch: some ratios left [1 - 1e-4, 1 + 1e-4]
  assert metrics["kl_ref"] > 1e-9  # after epoch 1's updates the policy has left the reference
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "2"
  # per-step diagnostics of the two stochastic steps (of 3) reach the epoch metrics and history
  for name in ("clipfrac", "abs_dlogp", "grad_norm"):
    assert f"{name}/step_00" in metrics and f"{name}/step_01" in metrics
    assert f"{name}/step_02" not in metrics
  import json
  with open(tmp_path / "run" / "history.json") as f:
    assert any("grad_norm/step_01" in h for h in json.load(f))


def test_scanned_layers_train_as_the_unrolled(folder):
  """``backbone.scan_layers`` (the configs' default for Z-Image) against the unrolled DiT:
  the same trajectories, the same first update (metrics and new parameters, layer by layer) to
  float32 rounding."""
  out = {}
  for scan in (False, True):
    c = small(folder, **{"sample.num_batches": 1, "train.grad_accum": 1,
                         "backbone.scan_layers": scan, "ddpo.clip_range": 1e6})
    trainer, state, traj, _, first, uncond = _first_minibatch(c, jnp.linspace(-1.0, 2.0, 8))
    assert trainer.bb.transformer.scan_layers == scan
    state, m = trainer._update(state, first, uncond, trainer.ref_params,
                               jnp.float32(c.sample.guidance_scale), jax.random.key(2))
    flat = {}
    for path, x in jax.tree_util.tree_flatten_with_path(trainer.policy_params(state))[0]:
      keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
      x = np.asarray(x)
      if scan and keys[0] == "layers":  # stacked (n_layers, ...) -> per layer
        flat.update({("layers", i) + keys[1:]: x[i] for i in range(x.shape[0])})
      else:
        flat[keys] = x
    out[scan] = (np.asarray(traj.latents), m, flat)
  (lat0, m0, p0), (lat1, m1, p1) = out[False], out[True]
  np.testing.assert_allclose(lat1, lat0, rtol=0, atol=1e-5)
  for k in ("loss", "grad_norm", "kl_ref"):
    np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-4, atol=1e-9, err_msg=k)
  assert sorted(p1, key=str) == sorted(p0, key=str) and any(k[0] == "layers" for k in p0)
  for k in p0:
    np.testing.assert_allclose(p1[k], p0[k], rtol=0, atol=1e-6, err_msg=str(k))
