"""The CRD trainer (train/crd.py) on tiny random pipelines of both families (configs/crd_zimage.py
on a tiny Z-Image, configs/crd_sdxl.py on a tiny SDXL, two epochs each): the implicit reward is
exactly 0 at the first update (theta == old) while the parameters move; both EMA snapshots follow
their schedules across epochs (against the formula in float64 NumPy); rollouts come from the
sampling snapshot; a run resumed from a checkpoint equals the uninterrupted run; an epoch asked to
stop before it changed anything is abandoned; the config checks name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax import rewards as rewards_lib
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing import tiny, tiny_zimage
from didr_jax.testing.configs import load_config
from didr_jax.train import checkpoint, common, config as config_lib, loop, prompts as prompts_lib
from didr_jax.train import crd as crd_lib
from didr_jax.train.crd import CRDTrainer

# one optimizer step per epoch (8 samples = 2 prompts x 4, one minibatch of both groups), one
# forward time per sample: every epoch's metrics are those of its single update.
SMALL = {"sample.batch_size": 8, "sample.num_batches": 1, "sample.group_size": 4,
         "sample.num_steps": 2, "train.batch_size": 8, "train.grad_accum": 1,
         "crd.num_train_times": 1, "eval.num_samples": 0, "eval.batch_size": 8, "log_images": 4,
         "num_epochs": 2, "async_checkpoint": False, "train.learning_rate": 1e-3}


def _trainer(c):
  config_lib.validate(c, num_devices=1)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  return CRDTrainer(c, loop.build_backbone(c, mesh), mesh)


def _stream(c):
  return prompts_lib.PromptStream(prompts_lib.load_prompts(c.prompts.train), seed=c.seed)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _check_epochs(trainer, c, epochs=2, ckpt_dir=None):
  """Runs ``epochs`` epochs; checks finite metrics, moving parameters, the exact zero of the
  implicit reward at the first update and the EMA rule of both snapshots after each epoch.
  With ``ckpt_dir`` the initial state is also saved there as step 0. Returns the states (host
  copies) before and after each epoch and the metrics."""
  rewarder = rewards_lib.AsyncRewards(rewards_lib.from_config(dict(c.rewards)))
  stream = _stream(c)
  state = trainer.init_state()
  if ckpt_dir is not None:
    ck = checkpoint.Checkpointer(ckpt_dir, async_save=False)
    ck.save(0, state, {"stream": stream.state_dict(), "trainer": trainer.host_state()})
    ck.close()
  hist, metrics, shown = [_host(state)], [], []
  try:
    # asked to stop before anything changed: abandoned, the stream untouched
    with pytest.raises(common.EpochAbandoned):
      loop.run_epoch(trainer, state, 0, stream, rewarder, stop=lambda: True)
    assert stream.position == 0
    for e in range(epochs):
      state, m, images = loop.run_epoch(trainer, state, e, stream, rewarder,
                                        stop=lambda: False)
      hist.append(_host(state))
      metrics.append(m)
      shown.append(images)
  finally:
    rewarder.close()
  assert images.shape[0] == c.log_images and 0.0 <= images.min() and images.max() <= 1.0
  for m in metrics:
    assert all(np.isfinite(v) for v in m.values()), m
    for k in ("reward_mean", "reward_std", "loss", "policy_loss", "kl", "corr", "decay_old",
              "decay_sampler", "time_rollout_s", "time_update_s"):
      assert k in m, k
  # theta == old at the first update: the implicit reward is exactly 0 (and so its correlation)
  assert metrics[0]["implicit_reward_abs"] == 0.0 and metrics[0]["corr"] == 0.0
  assert metrics[0]["grad_norm"] > 0
  # afterwards old lags theta: a nonzero implicit reward
  assert metrics[1]["implicit_reward_abs"] > 0
  old_s, sampler_s = c.crd.old, c.crd.sampler
  for e in range(epochs):
    before, after = hist[e], hist[e + 1]
    assert int(after["step"]) == e + 1
    assert _max_diff(after["params"], before["params"]) > 1e-6  # the update moved theta
    for name, sc, key in (("old", old_s, "decay_old"), ("sampler", sampler_s, "decay_sampler")):
      step = e + 1
      d = sc.start if step < sc.start_step else min(sc.start + sc.slope * (step - sc.start_step),
                                                    sc.end)
      assert metrics[e][key] == pytest.approx(d, abs=1e-7), (name, step)
      want = jax.tree.map(lambda snap, th: d * snap + (1 - d) * th, before["ema"][name],
                          after["params"]["policy"])
      assert _max_diff(after["ema"][name], want) < 1e-6, (name, step)
  return state, hist, metrics, shown


def _config(name, folder, **kw):
  return load_config(name, **{**SMALL, "backbone.path": folder, "backbone.dtype": "float32",
                              "backbone.remat": False, **kw})


def test_crd_zimage_config_runs_two_epochs(tmp_path):
  """The flow family (velocity outputs, Euler ODE rollouts) on a tiny random Z-Image."""
  folder = str(tmp_path / "zimage")
  tiny_zimage.save_tiny_zimage(folder, seed=5)
  c = _config("crd_zimage", folder)
  trainer = _trainer(c)
  assert trainer.bb.prediction_type == "flow" and trainer.bb.family == "flow"
  _check_rollout_times(trainer, c)
  _check_epochs(trainer, c)


def _check_rollout_times(trainer, c):
  """``crd.train_times = "rollout"`` draws every training time from the rollout sampler's own
  grid (the times its ``sample.num_steps`` steps start from), "uniform" does not."""
  x0 = jnp.zeros(trainer.bb.latent_shape(64), jnp.float32)
  rc = load_config("crd_zimage" if trainer.bb.family == "flow" else "crd_sdxl",
                   **{"backbone.path": c.backbone.path, "crd.train_times": "rollout",
                      "sample.num_steps": 4})
  grid = crd_lib.rollout_time_grid(trainer.bb, rc)
  traj = trainer.bb.rollout(lambda x, t: jnp.zeros_like(x), x0[:1], num_steps=4, eta=0.0,
                            rng=jax.random.key(0))
  ts = np.asarray(traj.timesteps)
  horizon = 1.0 if trainer.bb.family == "flow" else trainer.bb.schedule.num_train_timesteps
  np.testing.assert_allclose(grid, ts[ts <= rc.crd.t_max * horizon], rtol=1e-6)
  assert trainer.time_grid is None
  uniform = np.asarray(trainer.forward_noise(jax.random.key(1), x0)[1])
  assert not np.isin(uniform, grid).all()
  trainer.time_grid = grid
  try:
    drawn = np.asarray(trainer.forward_noise(jax.random.key(1), x0)[1])
  finally:
    trainer.time_grid = None
  assert np.isin(drawn, grid).all() and len(np.unique(drawn)) == len(grid)


def test_crd_sdxl_config_runs_two_epochs_and_resumes(tmp_path):
  """The VP family (eps outputs, DDIM eta 0 rollouts) on a tiny random SDXL: two epochs
  straight, the rollouts of epoch 1 come from the sampling snapshot, and the same two epochs
  with a checkpoint round trip (state and prompt stream) before each give equal states. The
  trainer keeps no state of its own between epochs (``host_state`` is {}, saved anyway), so
  one instance serves both runs (one compilation)."""
  folder = str(tmp_path / "sdxl")
  tiny.save_tiny_sd(folder, kind="sdxl", seed=5)
  c = _config("crd_sdxl", folder, **{"crd.sampler.start": 0.5, "crd.sampler.slope": 0.1,
                                     "crd.sampler.start_step": 2, "crd.sampler.end": 0.9})
  trainer = _trainer(c)
  assert trainer.bb.prediction_type == "epsilon" and trainer.bb.kind == "sdxl"
  assert trainer.ref_params is not None
  _check_rollout_times(trainer, c)
  ckpt_dir = str(tmp_path / "ck")
  state, hist, _, shown = _check_epochs(trainer, c, ckpt_dir=ckpt_dir)
  # epoch 1 rolled out from the sampling snapshot after epoch 0 (decay 0.5: not theta)
  on = lambda h: jax.tree.map(lambda x, ref: jax.device_put(x.astype(ref.dtype), ref.sharding), h,
                              state["params"]["policy"])
  stream = _stream(c)
  stream.next(2, 4)
  prompts = stream.next(2, 4)
  key = jax.random.fold_in(jax.random.split(jax.random.fold_in(jax.random.key(c.seed), 1))[0], 0)
  from_sampler = trainer.sample(on(hist[1]["ema"]["sampler"]), prompts, key)[1]
  from_theta = trainer.sample(on(hist[1]["params"]["policy"]), prompts, key)[1]
  np.testing.assert_array_equal(np.asarray(from_sampler)[: c.log_images], shown[1])
  assert np.max(np.abs(np.asarray(from_theta)[: c.log_images] - shown[1])) > 1e-6
  # resume == uninterrupted
  abstract = checkpoint.abstract_like(state)
  rewarder = rewards_lib.AsyncRewards(rewards_lib.from_config(dict(c.rewards)))
  try:
    for e in range(2):
      ck = checkpoint.Checkpointer(ckpt_dir, async_save=False)
      restored, host, step = ck.restore(abstract)
      assert step == e
      stream = _stream(c)
      stream.load_state_dict(host["stream"])
      trainer.load_host_state(host["trainer"])
      resumed, _, _ = loop.run_epoch(trainer, restored, e, stream, rewarder)
      ck.save(e + 1, resumed, {"stream": stream.state_dict(), "trainer": trainer.host_state()})
      ck.close()
  finally:
    rewarder.close()
  jax.tree.map(np.testing.assert_array_equal, _host(resumed), hist[2])


def test_configs_follow_the_authors_and_validate():
  for name in ("crd_zimage", "crd_sdxl"):
    c = load_config(name)
    info = config_lib.validate(c, num_devices=8)
    assert c.method == "crd" and c.sample.eta == 0.0 and c.sample.guidance_scale == 1.0
    assert c.sample.num_steps == 10 and c.sample.group_size == 24
    assert info["samples_per_epoch"] == 48 * 24 and info["optimizer_steps_per_epoch"] == 2
    assert info["timesteps_trained_per_sample"] == 20
    assert c.crd.kl_beta == 0.1 and c.crd.kl_cfg == 4.5 and c.crd.adv_clip == 5.0
  for name in ("toy_crd", "toy_crd_dit"):
    c = load_config(name)
    assert config_lib.validate(c, num_devices=1)["optimizer_steps_per_epoch"] == 2
  assert load_config("toy_crd_dit").backbone.kind == "toy_dit"


@pytest.mark.parametrize("overrides,key", [
    ({"train.batch_size": 12}, "config.train.batch_size"),       # not whole groups
    ({"sample.group_size": 1}, "config.sample.group_size"),      # nothing to center
    ({"crd.loss": "l1"}, "config.crd.loss"),
    ({"crd.sampler.end": 1.5}, "config.crd.sampler"),
])
def test_config_errors_name_the_key(overrides, key):
  c = load_config("toy_crd", **{"sample.batch_size": 48, "sample.num_batches": 1,
                                "train.batch_size": 48, "train.grad_accum": 1, **overrides})
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c, num_devices=1)
