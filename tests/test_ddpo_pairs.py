"""The pair micro-batch DDPO update (``ddpo.steps_per_call`` 0) on a tiny random toy pipeline:
one network call over a micro-batch's (sample, step) pairs gives the loss, gradient and
per-step diagnostics of the per-step layout (a Python loop of one gradient per (micro-batch,
step), as the update was before, and the in-program per-step loop, steps_per_call 1)."""

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
  # 8 samples, 4 steps (3 stochastic), k = 2 trained per sample; 2 micro-batches of 4 per
  # optimizer step; a KL to the reference so the second network call is covered too
  base = {"backbone.path": folder, "sample.batch_size": 8, "sample.num_batches": 1,
          "sample.num_steps": 4, "train.batch_size": 4, "train.grad_accum": 2,
          "train.timestep_fraction": 0.5, "ddpo.kl_beta": 0.1, "eval.num_samples": 0,
          "eval.batch_size": 8, "num_epochs": 2, "log_images": 4, "async_checkpoint": False}
  base.update(kw)
  return load_config("toy_ddpo", **base)


def _trainer(c):
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  return loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)


def _epoch_data(trainer, state, seed=0):
  prompts = ["a red circle"] * 4 + ["two blue squares"] * 4
  traj, _, cond, uncond = trainer.sample(trainer.policy_params(state), prompts,
                                         jax.random.key(seed))
  data = {"latents": jnp.swapaxes(traj.latents, 0, 1),
          "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond,
          "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
          "advantages": jnp.linspace(-1.0, 2.0, 8), "rewards": jnp.linspace(0, 1, 8)}
  return data, uncond


def test_one_call_per_micro_batch_equals_the_per_step_gradients(toy_folder):
  c = small(toy_folder, **{"ddpo.steps_per_call": 0})  # all trained steps in one call
  trainer = _trainer(c)
  assert trainer.num_train_t == 2 and trainer.steps_per_call() == 2
  state = trainer.init_state()
  # every leaf of the state, scalars too (step, optimizer counts), is placed on the mesh up
  # front: the state an update returns has the same shardings, so the second update hits the
  # jit cache (test_ddpo_trainer's resume test checks one compile of the update in a run)
  kinds = {type(x.sharding).__name__ for x in jax.tree.leaves(state)}
  assert kinds == {"NamedSharding"}, kinds
  params = trainer.policy_params(state)
  data, uncond = _epoch_data(trainer, state)
  batch = jax.tree.map(lambda x: x[0], trainer._prepare(jax.random.key(1), data))
  assert batch["x_t"].shape[:3] == (2, 4, 2)  # (grad_accum, batch, k)
  # off-policy old log-probs (+-3e-4 around the recomputed ones) so that some ratios are
  # clipped at clip_range 1e-4 and the clipped / unclipped branches both carry gradient
  shift = jax.random.uniform(jax.random.key(3), batch["logp_old"].shape, minval=-3e-4,
                             maxval=3e-4)
  batch = {**batch, "logp_old": batch["logp_old"] + shift}
  guidance = jnp.float32(c.sample.guidance_scale)
  assert trainer.ref_params is not None
  # a reference 1% off the policy: the KL term and its gradient are not zero
  ref = jax.tree.map(lambda x: x * 1.01, trainer.ref_params)
  grads, m = jax.jit(trainer._grads)(params, batch, uncond, ref, guidance, jax.random.key(2))

  # the per-step reference: one value_and_grad per (micro-batch a, step slot j), averaged
  slot = jax.jit(lambda p, micro, j: jax.value_and_grad(trainer._ppo_loss, has_aux=True)(
      p, micro, j, uncond, ref, guidance), static_argnums=2)
  acc, k = 2, 2
  g_ref = jax.tree.map(jnp.zeros_like, params)
  m_ref = None
  for a in range(acc):
    micro = jax.tree.map(lambda x: x[a], batch)
    for j in range(k):
      (_, mj), gj = slot(params, micro, j)
      g_ref = jax.tree.map(jnp.add, g_ref, gj)
      m_ref = mj if m_ref is None else jax.tree.map(jnp.add, m_ref, mj)
  g_ref = jax.tree.map(lambda g: g / (acc * k), g_ref)
  m_ref = {n: v / (acc * k) for n, v in m_ref.items()}

  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
  assert scale > 1e-6  # a real gradient
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert 0.0 < float(m["clipfrac"]) < 1.0  # both branches of the clip are exercised
  assert float(m["kl_ref"]) > 1e-6
  # log p is a mean over dims: float32 rounding of 1e-7 .. 2e-7 in |dlogp| terms (the larger
  # with XLA:CPU's LLVM at -O0, as the tests run)
  for n in m_ref:
    np.testing.assert_allclose(np.asarray(m[n]), np.asarray(m_ref[n]), rtol=1e-5, atol=5e-7,
                               err_msg=n)
  assert float(np.sum(m["steps_count"])) == 1.0  # each of the acc x k slots counted once
  assert "grad_norm_steps" not in m  # only measured with one step per call

  # the in-program per-step layout (steps_per_call 1, a loop of acc x k calls) agrees too
  c1 = small(toy_folder, **{"ddpo.steps_per_call": 1})
  t1 = _trainer(c1)
  g1, m1 = jax.jit(t1._grads)(params, batch, uncond, ref, guidance, jax.random.key(2))
  for g, r in zip(jax.tree.leaves(g1), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * scale)
  for n in m:
    np.testing.assert_allclose(np.asarray(m1[n]), np.asarray(m[n]), rtol=1e-5, atol=5e-7,
                               err_msg=n)
  # per-step gradient norms: one per trained step, each the norm of a slot's gradient
  gn = np.asarray(m1["grad_norm_steps"])
  assert (gn[np.asarray(m1["steps_count"]) > 0] > 0).all()


def test_steps_per_call_config_checks(toy_folder):
  with pytest.raises(config_lib.ConfigError, match="config.ddpo.steps_per_call"):
    config_lib.validate(small(toy_folder, **{"ddpo.steps_per_call": 3}), num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="config.ddpo.step_grad_clip"):
    config_lib.validate(small(toy_folder, **{"ddpo.step_grad_clip": 1.0,
                                             "ddpo.steps_per_call": 2}), num_devices=1)
  config_lib.validate(small(toy_folder, **{"ddpo.step_grad_clip": 1.0,
                                           "ddpo.steps_per_call": 1}), num_devices=1)


def test_update_program_does_not_grow_with_the_trained_steps(toy_folder):
  """The update accumulates its per-step calls in a rolled loop: training 3 steps per sample
  instead of 1 compiles the same network call once (as many convolutions in the program) and
  needs no more temporary memory (an unrolled loop held every call's activations at once)."""
  programs = {}
  for frac in (1 / 3, 1.0):  # 4 steps, 3 stochastic: k = 1 and k = 3 trained per sample
    c = small(toy_folder, **{"train.timestep_fraction": frac, "ddpo.kl_beta": 0.0})
    trainer = _trainer(c)
    state = trainer.init_state()
    data, uncond = _epoch_data(trainer, state)
    batch = jax.tree.map(lambda x: x[0], trainer._prepare(jax.random.key(1), data))
    compiled = jax.jit(trainer._grads).lower(
        trainer.policy_params(state), batch, uncond, None, jnp.float32(3.0),
        jax.random.key(2)).compile()
    programs[trainer.num_train_t] = (compiled.as_text().count(" convolution("),
                                     compiled.memory_analysis().temp_size_in_bytes)
  (conv1, temp1), (conv3, temp3) = programs[1], programs[3]
  assert conv1 > 0 and conv3 == conv1, programs
  assert temp3 <= 1.1 * temp1, programs
