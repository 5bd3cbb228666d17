"""The DDPO trainer and the shared training loop on a tiny random pixel-space toy pipeline:
ratio == 1 before the first update, sharded step == single-device step, resume ==
uninterrupted, config validation, the SDXL config on a tiny random SDXL folder."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing import tiny
from didr_jax.testing.configs import load_config
from didr_jax.train import config as config_lib, loop

@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
  return tiny.save_tiny_toy(str(tmp_path_factory.mktemp("toy")))


def small(folder, **kw):
  base = {"backbone.path": folder, "sample.batch_size": 8, "sample.num_batches": 2,
          "sample.num_steps": 4, "train.batch_size": 8, "train.timestep_fraction": 0.5,
          "eval.num_samples": 0, "eval.batch_size": 8, "num_epochs": 2, "log_images": 4,
          "async_checkpoint": False}
  base.update(kw)
  return load_config("toy_ddpo", **base)


def _epoch_data(trainer, state, seed=0):
  prompts = ["a red circle"] * 4 + ["two blue squares"] * 4
  traj, _, cond, uncond = trainer.sample(trainer.policy_params(state), prompts,
                                         jax.random.key(seed))
  data = {"latents": jnp.swapaxes(traj.latents, 0, 1),
          "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond,
          "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
          "advantages": jnp.linspace(-1.0, 2.0, 8), "rewards": jnp.linspace(0, 1, 8)}
  return data, uncond


def _trainer(c, devices):
  mesh = mesh_lib.make_mesh([("data", len(devices))], devices=devices)
  return loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)


def test_ratio_is_one_before_the_first_update(toy_folder):
  c = small(toy_folder, **{"sample.num_batches": 1})
  trainer = _trainer(c, jax.devices()[:1])
  state = trainer.init_state()
  data, uncond = _epoch_data(trainer, state)
  batches = trainer._prepare(jax.random.key(1), data)
  first = jax.tree.map(lambda x: x[0], batches)
  _, metrics = trainer._update(state, first, uncond, None, jnp.float32(c.sample.guidance_scale),
                               jax.random.key(2))
  # the first minibatch sees the sampling-time parameters: ratio 1 up to float32 rounding of
  # the recomputed log-probability (a different XLA program), and nothing is clipped.
  assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-6
  assert float(metrics["approx_kl"]) < 1e-12
  assert float(metrics["clipfrac"]) == 0.0


def test_sharded_update_equals_single_device(toy_folder):
  # Adam's first step is lr * sign(g) for |g| >> eps: a gradient of 1e-12 with a different
  # rounding sign would move a weight by 2 lr. A larger eps keeps the comparison about the
  # gradients (which are what sharding can change), not about the sign of rounding noise.
  c = small(toy_folder, **{"sample.num_batches": 1, "train.adam_eps": 1e-3})
  single = _trainer(c, jax.devices()[:1])
  sharded = _trainer(c, jax.devices()[:8])
  s1, s8 = single.init_state(), sharded.init_state()
  initial = jax.tree.map(np.asarray, s1["params"])
  data, uncond = _epoch_data(single, s1)
  guidance = jnp.float32(c.sample.guidance_scale)
  b1 = jax.tree.map(lambda x: x[0], single._prepare(jax.random.key(1), data))
  rep8 = jax.sharding.NamedSharding(sharded.mesh, jax.sharding.PartitionSpec())
  b8 = jax.tree.map(lambda x: x[0], sharded._prepare(jax.random.key(1),
                                                     jax.device_put(data, rep8)))
  assert len(b8["adv"].sharding.device_set) == 8
  s1, m1 = single._update(s1, b1, uncond, None, guidance, jax.random.key(2))
  rep = jax.sharding.NamedSharding(sharded.mesh, jax.sharding.PartitionSpec())
  s8, m8 = sharded._update(s8, b8, jax.device_put(uncond, rep), None, guidance,
                           jax.random.key(2))
  for k in m1:
    # |log p_new - log p_old| at ratio 1 is float32 rounding of log p (~1e-7 per sample)
    atol = 1e-6 if k.startswith("abs_dlogp") else 1e-7
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=atol, err_msg=k)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       s8["params"], s1["params"])
  assert max(jax.tree.leaves(diffs)) < 1e-6
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       s1["params"], initial)
  assert max(jax.tree.leaves(moved)) > 1e-5  # the step did change the parameters


def _final_params(workdir, c):
  from didr_jax.train import checkpoint
  mesh = mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  state, host, step = ck.restore(checkpoint.abstract_like(trainer.init_state()))
  ck.close()
  return state, host, step


def test_resume_equals_uninterrupted(toy_folder, tmp_path, capsys):
  full = str(tmp_path / "full")
  loop.train(small(toy_folder), full)
  # two epochs of two updates each: the update and the sampler compile once (the run log
  # names every compilation of a jitted step)
  out = capsys.readouterr().out
  assert out.count("compiled the update step in") == 1, out
  assert out.count("compiled the sampler in") == 1, out
  split = str(tmp_path / "split")
  loop.train(small(toy_folder, num_epochs=1), split)
  loop.train(small(toy_folder), split)  # resumes at epoch 1
  a, host_a, step_a = _final_params(full, small(toy_folder))
  b, host_b, step_b = _final_params(split, small(toy_folder))
  assert step_a == step_b == 2
  assert host_a["stream"] == host_b["stream"]
  assert host_a["advantages"] == host_b["advantages"]
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  hist = json.load(open(os.path.join(split, "history.json")))
  assert [h["step"] for h in hist if "reward_mean" in h] == [1, 2]
  assert os.path.exists(os.path.join(split, "reward_curve.png"))
  assert any(f.startswith("events") for _, _, fs in os.walk(os.path.join(split, "tensorboard"))
             for f in fs)


def test_config_validation_names_the_key(toy_folder):
  c = small(toy_folder)
  c.train.batch_size = 5
  with pytest.raises(config_lib.ConfigError, match="config.sample.batch_size|config.train"):
    config_lib.validate(c, num_devices=1)
  c = small(toy_folder)
  c.sample.group_size = 3
  with pytest.raises(config_lib.ConfigError, match="config.sample.batch_size"):
    config_lib.validate(c, num_devices=1)
  with pytest.raises(AttributeError):  # locked: an unknown key cannot be set
    c.train.learnin_rate = 1.0
  c = small(toy_folder, **{"backbone.resolution": -32})
  with pytest.raises(config_lib.ConfigError, match="config.backbone.resolution"):
    config_lib.validate(c, num_devices=1)
  c = small(toy_folder, **{"backbone.scan_layers": True})  # a UNet has no layer stack
  with pytest.raises(config_lib.ConfigError, match="config.backbone.scan_layers: only the Z-Image"):
    config_lib.validate(c, num_devices=1)
  one = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  c = small(toy_folder, **{"backbone.path": "/nonexistent"})
  with pytest.raises(config_lib.ConfigError, match="config.backbone.path"):
    loop.build_backbone(c, one)
  c = small(toy_folder, **{"backbone.kind": "toy_dit"})  # a UNet folder named as a DiT
  with pytest.raises(config_lib.ConfigError, match="config.backbone.kind"):
    loop.build_backbone(c, one)
  c = small(toy_folder, **{"backbone.resolution": 16})
  assert loop.build_backbone(c, one).latent_shape(2) == (2, 16, 16, 3)


def test_ddpo_sdxl_config_runs_two_epochs(tmp_path):
  folder = str(tmp_path / "sdxl")
  tiny.save_tiny_sd(folder, kind="sdxl", seed=5)
  c = load_config("ddpo_sdxl", **{
      "backbone.path": folder, "backbone.dtype": "float32", "sample.num_steps": 3,
      "sample.batch_size": 8, "sample.num_batches": 1, "train.batch_size": 8,
      "train.grad_accum": 1, "num_epochs": 2, "eval.num_samples": 8, "eval.batch_size": 8,
      "eval.num_steps": 3, "checkpoint_every": 1, "async_checkpoint": False})
  metrics = loop.train(c, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"]) and metrics["reward_mean"] < 0  # -kB of JPEG
  assert "eval/jpeg_compressibility" in metrics
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "2"


def test_rwr_loss_is_the_weighted_denoising_error_of_the_conditional_output(toy_folder):
  """RWR's loss is the advantage-weighted (softmax of the normalised advantages, times the batch
  size) denoising error of the conditional output at one random time per sample, computed
  here from the backbone's own pieces in float64."""
  c = small(toy_folder, **{"sample.num_batches": 1, "ddpo.objective": "rwr"})
  trainer = _trainer(c, jax.devices()[:1])
  state = trainer.init_state()
  params = trainer.policy_params(state)
  data, _ = _epoch_data(trainer, state)
  micro = jax.tree.map(lambda x: x[0, 0], trainer._prepare(jax.random.key(1), data))
  key = jax.random.key(5)
  x_t, t, target = trainer.bb.training_pair(key, micro["x0"])
  out = trainer.bb.denoise(trainer.net.bind(params), x_t, t, micro["cond"], None, 1.0)
  n = x_t.shape[0]
  adv = np.asarray(micro["adv"], np.float64)
  weights = np.exp(adv - adv.max()) / np.sum(np.exp(adv - adv.max())) * n
  per = np.mean((np.asarray(out, np.float64) - np.asarray(target, np.float64)) ** 2,
                axis=tuple(range(1, x_t.ndim)))
  loss, _ = trainer._rwr_loss(params, micro, key)
  np.testing.assert_allclose(float(loss), float(np.mean(weights * per)), rtol=2e-5)
