"""The TDM and TDM-R1 trainers on tiny random pipelines: the student's rollout is the K-step
deterministic student step and its grid (the teacher's rollout is DDIM eta 0 with the
scheduler's x0 clip); with a perfect fake score (fake = teacher, teacher without CFG) the
generator's distribution-matching gradient is zero up to float32 rounding (below 1e-3 of the
gradient once the fake score moved); a TDM-R1 epoch with the non-differentiable toy detector moves all three
networks and the old surrogate; resume through a checkpoint equals an uninterrupted run. The
real-backbone configs: tests/test_tdmr1_real.py (a file of their own, so that pytest-xdist runs
them beside these).

Kept small (one tiny model per family, 4 samples, one iteration per epoch): every trainer
compiles its rollout and its 2 (TDM) or 3 (TDM-R1) update programs once."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax import rewards as rewards_lib
from didr_jax.losses import tdm as tdm_losses
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing import tiny
from didr_jax.testing.configs import load_config
from didr_jax.train import checkpoint, config as config_lib, loop, prompts as prompts_lib

PROMPTS = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
TINY = {"sample.batch_size": 4, "sample.num_batches": 1, "train.batch_size": 4,
        "log_images": 2, "eval.num_samples": 0, "eval.batch_size": 4}


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
  return tiny.save_tiny_toy(str(tmp_path_factory.mktemp("toy")), sample_size=8)


def _config(name, folder, **kw):
  c = load_config(name, **{"backbone.path": folder, **TINY, **kw})
  config_lib.validate(c, num_devices=1)
  return c


def _trainer(c):
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  return loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
      a, b)))


def _stream(c):
  return prompts_lib.PromptStream(prompts_lib.load_prompts(c.prompts.train), seed=c.seed)


def _epochs(trainer, state, stream, epochs):
  rewarder = rewards_lib.AsyncRewards(rewards_lib.from_config(dict(trainer.c.rewards)))
  try:
    ms = []
    for e in epochs:
      state, m, images = loop.run_epoch(trainer, state, e, stream, rewarder)
      ms.append(m)
  finally:
    rewarder.close()
  return state, ms, images


def test_tdm_rollout_perfect_fake_and_epoch(toy_folder):
  # teacher without CFG, so that fake = teacher is a perfect fake score for a perfect student
  c = _config("toy_tdm", toy_folder, **{"tdm.ref_cfg": 1.0, "tdm.ema_decay": 0.5})
  tr = _trainer(c)
  assert list(tr.grid.times) == [999, 749, 499, 249, -1]      # the toy's trailing DDIM grid
  state = tr.init_state()
  s0 = _host(state)

  cond = tr._shard(tr.bb.encode(PROMPTS), 4)    # laid out as the epoch does: no recompile
  traj, images = tr.student_rollout(state["params"]["generator"], cond, jax.random.key(1))
  assert traj.latents.shape == (5, 4, 8, 8, 3) and images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(traj.timesteps, [999, 749, 499, 249])
  np.testing.assert_array_equal(traj.sample, traj.latents[4])
  assert float(jnp.std(traj.latents[0])) > 0.5              # x_0 ~ N(0, I)

  # fake = teacher: the DM direction x0_fake - x0_ref is 0 up to float32 rounding (the two
  # network calls are compiled apart; with the clip they are fused differently), so is the
  # gradient: below 1e-3 of the gradient once the fake has moved (checked below)
  uncond = tr.negative(4)
  j = jnp.int32(1)
  state, gm = tr._gen_update(state, tr.ref_params, traj.latents, cond, uncond, j,
                             jax.random.key(2), tr.scales())
  g_perfect = float(gm["generator_grad_norm"])
  assert float(gm["nonfinite"]) == 0.0
  state = {**state, "params": {**state["params"], "generator": jax.tree.map(
      jnp.array, s0["params"]["generator"])}}                # undo Adam's step of the rounding
  # after fake-score steps the fake differs from the teacher and the gradient is not 0
  for i in range(2):
    state, fm = tr._fake_update(state, tr.ref_params, traj.latents, cond, uncond, j,
                                jax.random.key(3 + i))
    assert np.isfinite(float(fm["fake_loss"])) and float(fm["fake_nonfinite"]) == 0.0
  state, gm = tr._gen_update(state, tr.ref_params, traj.latents, cond, uncond, j,
                             jax.random.key(2), tr.scales())
  assert g_perfect <= 1e-3 * float(gm["generator_grad_norm"])
  assert _max_diff(state["params"]["generator"], s0["params"]["generator"]) > 0.0
  assert int(state["step"]) == 2

  # an epoch through the loop's interface
  state, (m,), imgs = _epochs(tr, state, _stream(c), [0])
  assert all(np.isfinite(v) for v in m.values()), m
  for k in ("fake_loss", "fake_dsm", "generator_loss", "dm_normaliser", "reward_mean"):
    assert k in m, k
  assert imgs.shape == (2, 8, 8, 3) and int(state["step"]) == 2 + c.tdm.boundaries_per_iter
  assert _max_diff(state["ema"]["generator"], s0["ema"]["generator"]) > 0.0
  _, ev, _, _ = tr.sample(tr.policy_params(state), PROMPTS[:2], jax.random.key(0))
  assert ev.shape == (2, 8, 8, 3) and 0.0 <= float(ev.min()) <= float(ev.max()) <= 1.0
  # the teacher as student is the DDIM eta-0 sampler on the same grid, x0 clipped as the toy
  # scheduler's clip_sample says (an independent implementation: diffusion/ddim.py)
  assert tr.clip_range == 1.0
  ref = tr.ref_params
  got, _ = tr.student_rollout(ref, cond, jax.random.key(1))
  want = jax.jit(lambda x: tr.bb.rollout(lambda xt, t: tr._out(ref, xt, t, cond), x,
                                         num_steps=4, eta=0.0, rng=None).latents)(got.latents[0])
  np.testing.assert_allclose(np.asarray(got.latents), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_tdmr1_toy_detector_epochs_and_resume_equals_uninterrupted(toy_folder, tmp_path):
  c = _config("toy_tdmr1", toy_folder, **{"tdm.generator_path": "", "sample.group_size": 2})
  assert dict(c.rewards) == {"toy_detector": 1.0}
  assert not rewards_lib.make("toy_detector").differentiable
  tr = _trainer(c)
  s0 = _host(tr.init_state())
  straight, ms, images = _epochs(tr, tr.init_state(), _stream(c), [0, 1])
  for m in ms:
    assert all(np.isfinite(v) for v in m.values()), m
    for k in ("surrogate_loss", "surrogate_trust_clipfrac", "loss_kl", "loss_cfg", "loss_rew",
              "adv_abs_mean", "decay_old", "reward_mean"):
      assert k in m, k
  assert images.shape == (2, 8, 8, 3)
  assert int(straight["step"]) == 2 * c.tdm.boundaries_per_iter
  for name in ("generator", "fake", "surrogate"):
    assert _max_diff(straight["params"][name], s0["params"][name]) > 0.0, name
  assert _max_diff(straight["ema"]["old"], s0["ema"]["old"]) > 0.0

  stream = _stream(c)
  half, _, _ = _epochs(tr, tr.init_state(), stream, [0])
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(1, half, {"stream": stream.state_dict(), **tr.host_state()}, force=True)
  ck.wait()
  del half
  restored, host, step = ck.restore(checkpoint.abstract_like(tr.init_state()))
  ck.close()
  stream = _stream(c)
  stream.load_state_dict(host["stream"])
  tr.load_host_state({k: v for k, v in host.items() if k != "stream"})
  resumed, _, _ = _epochs(tr, restored, stream, [step])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               resumed, straight)


def test_tdm_configs_validate_and_name_the_key(toy_folder):
  c = load_config("toy_tdmr1")
  student = os.path.join(config_lib.TOY_ASSETS, "toy_tdm")
  # The shipped 4-step student when the repo has it, else the teacher ("").
  assert c.method == "tdmr1"
  assert c.tdm.generator_path == (student if os.path.isdir(student) else "")
  for name, overrides, key in [
      ("toy_tdmr1", {"tdm.generator_path": "/nonexistent", "sample.group_size": 2},
       "tdm.generator_path"),
      ("toy_tdmr1", {"tdm.generator_path": "", "sample.group_size": 1}, "sample.group_size"),
      ("toy_tdm", {"tdm.boundaries_per_iter": 5}, "tdm.boundaries_per_iter"),
      ("toy_tdm", {"tdm.ref_cfg": 0.5}, "tdm.ref_cfg"),
      # LoRA adapters share the reference's base: no distilled generator under them
      ("toy_tdm", {"lora.enabled": True, "tdm.generator_path": toy_folder}, "lora.enabled"),
      ("toy_didr", {"lora.enabled": True, "didr.generator_path": toy_folder}, "lora.enabled")]:
    c = load_config(name, **{"backbone.path": toy_folder, **TINY, **overrides})
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.{key}: "):
      config_lib.validate(c, num_devices=1)
  with pytest.raises(KeyError, match="no_such_key"):      # locked: unknown keys are refused
    load_config("toy_tdm", **{"tdm.no_such_key": 1})
  for name in ("tdmr1_sdxl", "tdmr1_zimage"):
    c = load_config(name)
    assert (c.tdm.num_steps, c.sample.group_size, c.tdm.beta_dpo) == (4, 24, 10.0)
    assert (c.tdm.generator_learning_rate, c.tdm.fake_learning_rate,
          c.tdm.surrogate_learning_rate) == (7.5e-5, 3e-4, 3e-4)


def _real_epoch(name, folder):
  # a cheap non-differentiable host reward in place of the configs' PickScore
  c = _config(name, folder, **{"backbone.dtype": "float32", "backbone.remat": False,
                               "rewards": {"jpeg_compressibility": 1.0},
                               "sample.group_size": 2, "tdm.boundaries_per_iter": 1})
  tr = _trainer(c)
  s0 = _host(tr.init_state())
  state, (m,), _ = _epochs(tr, tr.init_state(), _stream(c), [0])
  assert all(np.isfinite(v) for v in m.values()), m
  for n in ("generator", "fake", "surrogate"):
    assert _max_diff(state["params"][n], s0["params"][n]) > 0.0, n
  return tr, m


def test_tdmr1_reads_the_surrogate_where_it_was_trained(toy_folder):
  """The generator's reward target queries phi (and the reference it is compared with) at the
  surrogate's own noise level: tau' >= max(t_{j+1}, t_min_reward), one tau' per group, as the
  DGPO step trains phi; the DM / CFG terms keep TDM's tau in [t_{j+1}, T]. Before, the reward
  term reused TDM's tau, which fell below t_min_reward where phi is never trained. The times of
  every network call are recorded while tracing and returned (one compile, j traced)."""
  c = _config("toy_tdmr1", toy_folder, **{"tdm.generator_path": "", "sample.group_size": 2})
  trainer = _trainer(c)
  state = trainer.init_state()
  out = trainer._out
  b = 4
  cond = trainer.bb.encode(PROMPTS)
  uncond = trainer.negative(b)
  x = jax.random.normal(jax.random.key(0), trainer.bb.latent_shape(b))

  @jax.jit
  def times_used(j, rng):
    calls = []

    def spy(params, x, t, *a, **kw):
      name = next((k for k, v in state["params"].items() if v is params), "ref")
      calls.append((name, jnp.broadcast_to(t, (b,))))
      return out(params, x, t, *a, **kw)

    trainer._out = spy
    try:
      x_next, x0_hat = trainer._student_step(state["params"]["generator"], x, j, cond, uncond)
      x_tau, _, tau = trainer._renoise(rng, x_next, x0_hat, j)
      trainer._generator_targets(state, trainer.ref_params, x_tau, tau, cond, uncond, x0_hat,
                                 trainer.scales(), renoise=(jax.random.fold_in(rng, 1), x_next,
                                                            x0_hat, j))
    finally:
      trainer._out = out
    phi = jnp.stack([t for n, t in calls if n == "surrogate"])
    fake = jnp.stack([t for n, t in calls if n == "fake"])
    return phi, fake, tau

  t_min = int(float(c.tdm.t_min_reward) * trainer.grid.horizon)
  for j in range(trainer.grid.num_steps):
    phi, fake, tau = (np.asarray(v) for v in times_used(jnp.int32(j), jax.random.key(10 + j)))
    t_next = int(trainer.grid.times[j + 1])
    assert phi.shape[0] == 2                                   # conditional and unconditional
    assert np.all(phi >= max(t_next, t_min)), (j, phi, t_next, t_min)
    assert np.all(phi[:, 0::2] == phi[:, 1::2])                 # one tau' per group of 2
    assert np.all(fake >= t_next) and np.all(fake[0] == tau)
