"""The DIDR trainer on tiny random pipelines: with zero reward strength the generator update is
DI's, sharded (data x fsdp) fake and generator updates equal the single-device ones, resume
through a checkpoint equals an uninterrupted run, and configs/didr_sdxl.py and
configs/didr_zimage.py train (generator and fake score move, metrics finite) on tiny SDXL and
Z-Image folders with a tiny PickScore reward."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax import rewards as rewards_lib
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing import tiny
from didr_jax.testing.configs import load_config
from didr_jax.train import checkpoint, config as config_lib, loop, prompts as prompts_lib
from didr_jax.train.common import EpochAbandoned
from didr_jax.train.didr import DIDRTrainer

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three red circles"] * 2


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
  return tiny.save_tiny_toy(str(tmp_path_factory.mktemp("toy")), sample_size=8)


def toy_config(folder, **kw):
  # adam_eps = 1: Adam's first step is lr g / (|g| + 1), smooth in g, so comparisons are about
  # the gradients rather than the sign of rounding noise (the first step is lr sign(g) at eps 0)
  base = {"backbone.path": folder, "didr.generator_path": "", "sample.batch_size": 8,
          "sample.num_batches": 1,
          "train.batch_size": 8, "train.adam_eps": 1.0, "didr.fake_updates": 1,
          # K = 1 (Tweedie, exact on Gaussians like the default ancestral K = 2, which
          # tests/test_losses_didr.py checks) halves the compile of every generator update
          "didr.drp_steps": 1,
          "log_images": 2, "eval.num_samples": 0, "eval.batch_size": 8}
  base.update(kw)
  c = load_config("toy_didr", **base)
  config_lib.validate(c)
  return c


def make(c, devices, axes=None):
  mesh = mesh_lib.make_mesh(axes or [("data", len(devices))], devices=devices)
  return DIDRTrainer(c, loop.build_backbone(c, mesh), mesh)


@pytest.fixture(scope="module")
def toy(toy_folder):
  return make(toy_config(toy_folder), jax.devices()[:1])


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
      a, b)))


def _gen_args(trainer, seed=3, scale=None):
  cond, module, features = trainer.inputs(PROMPTS)
  z = trainer._noise(jax.random.key(seed), len(PROMPTS))
  scale = trainer.c.didr.reward_scale if scale is None else scale
  return (trainer.ref_params, trainer.bb.frozen(), cond, trainer.uncond, z, module, features,
          jax.random.key(seed + 1), jnp.float32(scale))


def test_one_step_x0_is_clipped_on_a_clip_sample_scheduler(toy):
  """The toy's DDIM scheduler clips x0 (``clip_sample``): the one-step generator's x0 is the
  unclipped one clipped to [-1, 1] (the tiny random generator's unclipped x0 leaves it), and
  latent backbones (no clip_sample) are left alone."""
  import dataclasses
  from didr_jax.train import one_step
  spec = toy.spec
  assert spec.clip_range == 1.0
  cond, _, _ = toy.inputs(PROMPTS)
  z = toy._noise(jax.random.key(0), len(PROMPTS))
  model = toy.net.bind(toy.ref_params)
  x0 = np.asarray(one_step.generate(toy.bb, model, z, cond, spec))
  raw = np.asarray(one_step.generate(toy.bb, model, z, cond,
                                     dataclasses.replace(spec, clip_range=None)))
  assert np.abs(raw).max() > 1.0
  np.testing.assert_array_equal(x0, np.clip(raw, -1.0, 1.0))


def test_zero_reward_strength_equals_di(toy, toy_folder):
  s0 = toy.init_state()
  didr_state, m_didr, _ = toy._gen_update(_copy(s0), *_gen_args(toy, scale=0.0))
  di = make(toy_config(toy_folder, **{"didr.mode": "di"}), jax.devices()[:1])
  di_state, m_di, _ = di._gen_update(s0, *_gen_args(di, scale=0.0))
  assert float(m_didr["reward_share"]) < 1e-6   # the DRS term is 0 (up to fusion rounding)
  np.testing.assert_allclose(m_didr["generator_loss"], m_di["generator_loss"], rtol=1e-6)
  np.testing.assert_allclose(m_didr["generator_grad_norm"], m_di["generator_grad_norm"],
                             rtol=1e-5)
  moved = _max_diff(didr_state["params"]["generator"], toy.init_state()["params"]["generator"])
  assert moved > 1e-6
  assert _max_diff(didr_state["params"], di_state["params"]) < 1e-3 * moved


def test_sharded_updates_equal_single_device(toy, toy_folder):
  c = toy_config(toy_folder)
  sharded = make(c, jax.devices()[:8], [("data", 4), ("fsdp", 2)])
  s1, s8 = toy.init_state(), sharded.init_state()
  initial = jax.tree.map(np.asarray, s1["params"])
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(s8["params"]["fake"]))       # fsdp-sharded weights
  a1, a8 = _gen_args(toy), _gen_args(sharded)
  s1, f1 = toy._fake_update(s1, a1[2], a1[4], jax.random.key(7))
  s8, f8 = sharded._fake_update(s8, a8[2], a8[4], jax.random.key(7))
  s1, g1, im1 = toy._gen_update(s1, *a1)
  s8, g8, im8 = sharded._gen_update(s8, *a8)
  # rtol 2e-3: times reach 0.98 T, where the toy schedule's alpha ~ 0.006 divides eps_hat
  # (x0_hat = (x_t - sigma eps_hat) / alpha) and the DRS's sigma^2 / alpha multiplies s_r, so
  # float32 reduction-order differences reach ~5e-4 relative in the generator loss (measured);
  # a sharding bug (a missing reduction, a wrong shard) moves them by O(1).
  for m1, m8 in ((f1, f8), (g1, g8)):
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=2e-3, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(np.asarray(im8), np.asarray(im1), atol=1e-5)
  for name in ("generator", "fake"):
    moved = _max_diff(s1["params"][name], initial[name])
    assert moved > 1e-6, name
    assert _max_diff(s8["params"][name], s1["params"][name]) < 1e-2 * moved, name
  assert _max_diff(s8["ema"], s1["ema"]) < 1e-8


def _run(trainer, state, stream, epochs, rewarder):
  out = []
  for e in epochs:
    state, m, images = loop.run_epoch(trainer, state, e, stream, rewarder)
    out.append(m)
  return state, out, images


def test_epochs_train_and_resume_equals_uninterrupted(toy, tmp_path):
  c = toy.c
  rewarder = rewards_lib.AsyncRewards(rewards_lib.from_config(dict(c.rewards)))
  new_stream = lambda: prompts_lib.PromptStream(prompts_lib.load_prompts(c.prompts.train),
                                                seed=c.seed)
  try:
    s0 = jax.tree.map(np.asarray, toy.init_state())
    with pytest.raises(EpochAbandoned):
      loop.run_epoch(toy, toy.init_state(), 0, new_stream(), rewarder, stop=lambda: True)
    straight, ms, images = _run(toy, toy.init_state(), new_stream(), [0, 1], rewarder)
    for m in ms:
      assert all(np.isfinite(v) for v in m.values()), m
      assert 0.0 < m["reward_share"] < 1.0 and m["samples_per_s"] > 0
    assert images.shape == (2, 8, 8, 3)
    for name in ("generator", "fake"):
      assert _max_diff(straight["params"][name], s0["params"][name]) > 1e-6, name
    assert int(straight["step"]) == 2
    assert _max_diff(straight["ema"]["generator"], s0["ema"]["generator"]) > 0
    # a stop between two batches of an epoch: honoured at the boundary, the batch already
    # trained reported (the loop then keeps the last checkpoint rather than this state)
    asked = iter([False, True])
    c.sample.num_batches = 2
    try:
      with pytest.raises(EpochAbandoned) as stopped:
        loop.run_epoch(toy, toy.init_state(), 0, new_stream(), rewarder, stop=lambda: next(asked))
    finally:
      c.sample.num_batches = 1
    assert (stopped.value.epoch, stopped.value.trained) == (0, 1)

    stream = new_stream()
    half, _, _ = _run(toy, toy.init_state(), stream, [0], rewarder)
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(1, half, {"stream": stream.state_dict(), **toy.host_state()}, force=True)
    ck.wait()
    abstract = checkpoint.abstract_like(toy.init_state())
    del half
    restored, host, step = ck.restore(abstract)
    ck.close()
    stream = new_stream()
    stream.load_state_dict(host["stream"])
    toy.load_host_state({k: v for k, v in host.items() if k != "stream"})
    resumed, _, _ = _run(toy, restored, stream, [step], rewarder)
  finally:
    rewarder.close()
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               resumed, straight)


def test_config_errors_name_the_key(toy_folder):
  c = toy_config(toy_folder)
  c.didr.mode = "dmd"
  with pytest.raises(config_lib.ConfigError, match=r"config\.didr\.mode"):
    config_lib.validate(c)
  c = toy_config(toy_folder)
  c.didr.drp_eta = 0.0
  c.didr.drp_draws = 2
  with pytest.raises(config_lib.ConfigError, match=r"config\.didr: num_draws"):
    config_lib.validate(c)
  c = toy_config(toy_folder, **{"didr.reward": {"toy_detector": 1.0}})
  one = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  with pytest.raises(config_lib.ConfigError, match=r"config\.didr\.reward.*not differentiable"):
    DIDRTrainer(c, loop.build_backbone(c, one), one)
  c = toy_config(toy_folder, **{"didr.generator_path": str(toy_folder) + "/nope"})
  t = DIDRTrainer(c, loop.build_backbone(c, one), one)
  with pytest.raises(config_lib.ConfigError, match=r"config\.didr\.generator_path"):
    t.init_state()
  # a one-step checkpoint as a pipeline folder or as its unet component folder
  for path in (toy_folder, os.path.join(toy_folder, "unet")):
    c = toy_config(toy_folder, **{"didr.generator_path": path})
    t = DIDRTrainer(c, loop.build_backbone(c, one), one)
    assert _max_diff(t.init_state()["params"]["generator"], t.ref_params) == 0.0
  c = toy_config(toy_folder, **{"didr.generator_path": os.path.join(
      loop.TOY_ASSETS, "toy_unet", "unet")})                 # another architecture
  t = DIDRTrainer(c, loop.build_backbone(c, one), one)
  with pytest.raises(config_lib.ConfigError, match=r"another architecture"):
    t.init_state()


@pytest.fixture(scope="module")
def pickscore_env(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("pickscore"))
  tiny.save_tiny_pickscore(folder, words=("red", "blue", "circle", "square"))
  old = os.environ.get("DIDR_PICKSCORE")
  os.environ["DIDR_PICKSCORE"] = folder
  yield folder
  if old is None:
    os.environ.pop("DIDR_PICKSCORE")
  else:
    os.environ["DIDR_PICKSCORE"] = old


def _config_epoch(name, folder, **kw):
  c = load_config(name, **{"backbone.path": folder, "backbone.dtype": "float32",
                           "backbone.remat": False, "sample.batch_size": 8,
                           "sample.num_batches": 1, "train.batch_size": 8,
                           "didr.fake_updates": 2, "didr.drp_steps": 1, "log_images": 2,
                           **kw})
  config_lib.validate(c)
  trainer = make(c, jax.devices()[:1])
  state = trainer.init_state()
  before = jax.tree.map(np.asarray, state["params"])
  rewarder = rewards_lib.AsyncRewards(rewards_lib.from_config(dict(c.rewards)))
  stream = prompts_lib.PromptStream(prompts_lib.load_prompts(c.prompts.train), seed=0)
  try:
    state, m, images = loop.run_epoch(trainer, state, 0, stream, rewarder)
  finally:
    rewarder.close()
  assert all(np.isfinite(v) for v in m.values()), m
  for k in ("reward_mean", "generator_loss", "fake_loss", "reward_share", "drp_reward"):
    assert k in m, k
  for n in ("generator", "fake"):
    assert _max_diff(state["params"][n], before[n]) > 0, n
  _, evals, _, _ = trainer.sample(trainer.policy_params(state), PROMPTS[:2], jax.random.key(0))
  assert evals.shape[0] == 2 and float(evals.min()) >= 0.0 and float(evals.max()) <= 1.0
  return trainer, m


def test_didr_sdxl_config_trains_on_tiny_folders(tmp_path, pickscore_env):
  folder = str(tmp_path / "sdxl")
  tiny.save_tiny_sd(folder, kind="sdxl", seed=5)
  trainer, _ = _config_epoch("didr_sdxl", folder)
  assert trainer.c.didr.ref_cfg == 8.0 and trainer.spec.time == 399
  assert trainer.c.didr.generator_adam_b1 == 0.0 and trainer.c.train.learning_rate == 5e-7


def test_didr_zimage_config_trains_on_tiny_folders(tmp_path, pickscore_env):
  from didr_jax.testing import tiny_zimage
  folder = str(tmp_path / "zimage")
  tiny_zimage.save_tiny_zimage(folder, seed=2)
  trainer, _ = _config_epoch("didr_zimage", folder)
  assert trainer.spec.time == 1.0 and trainer.spec.alpha == 0.0


def test_shipped_toy_reward_term_stays_within_the_data_range():
  """On the shipped toy (configs/toy_didr.py: the one-step generator's samples, CFG-3 toy UNet,
  toy-CLIP reward, 1/beta 1), at t in {250, 500, 750, 900, 980}, the x0-unit DRS term the
  generator uses, E_tilted[x0 | x_t] - E[x0 | x_t] exactly, lies within the data range's width
  and keeps the tilted mean an image (clip(x0_ref) + term in [-1, 1]). The raw DRP exceeds it
  (by up to ~1000 at t = 980): without ``didr.drs_bound`` this test fails. One batch holds every
  t (2 samples each), so the toy UNet's DRP compiles once."""
  from didr_jax.diffusion import param
  from didr_jax.losses import didr as didr_losses
  from didr_jax.train import one_step
  times = (250, 500, 750, 900, 980)
  b = 2 * len(times)
  c = load_config("toy_didr", **{"sample.batch_size": b, "train.batch_size": b,
                                 "eval.num_samples": 0, "eval.batch_size": b})
  config_lib.validate(c, num_devices=1)
  tr = make(c, jax.devices()[:1])
  assert tr.loss_cfg.data_range == (-1.0, 1.0)
  prompts = prompts_lib.PromptStream(prompts_lib.load_prompts("toy:train"), seed=0).next(b)
  cond, module, features = tr.inputs(prompts)
  x0 = one_step.generate(tr.bb, tr.net.bind(tr.init_state()["params"]["generator"]),
                         tr._noise(jax.random.key(0), b), cond, tr.spec)
  frozen = tr.bb.frozen()
  t = jnp.repeat(jnp.asarray(times, jnp.int32), 2)
  eps = jax.random.normal(jax.random.key(1), x0.shape)

  @jax.jit
  def terms():
    ref_fn = tr._score_fn(tr.ref_params, cond, tr.uncond, c.didr.ref_cfg)
    reward_fn = lambda x: tr.reward.jax_fn(module, tr.bb.decode(frozen, x), features)
    alpha, sigma = tr.process.coeffs(t, x0)
    x_t = param.bcast(alpha, x0) * x0 + param.bcast(sigma, x0) * eps
    x0_ref = param.to_x0(ref_fn(x_t, t), x_t, alpha, sigma, tr.process.prediction_type)
    s_r, _ = didr_losses.diffused_reward_score(ref_fn, reward_fn, x_t, t, tr.process,
                                               num_steps=tr.loss_cfg.num_steps, remat=False)
    raw = param.x0_delta_from_score_delta(s_r, alpha, sigma)
    # what the generator uses: g(didr) - g(di) with w = 1, n = 1 is minus the bounded term
    kw = dict(normalise=False, data_range=tr.loss_cfg.data_range)
    used = -(didr_losses.generator_direction(x0, x0_ref, x0_ref, alpha, sigma, drs=s_r, **kw)
             - didr_losses.generator_direction(x0, x0_ref, x0_ref, alpha, sigma, **kw))
    return raw, used, x0_ref

  raw, used, x0_ref = (np.asarray(v) for v in terms())
  assert np.max(np.abs(used)) <= 2.0 + 1e-5
  tilted = np.clip(x0_ref, -1, 1) + used
  assert tilted.min() >= -1 - 1e-5 and tilted.max() <= 1 + 1e-5
  assert np.max(np.abs(raw[t >= 750])) > 10.0      # the raw proxy is far outside at high noise
