"""The DIDR trainer: a one-step generator trained by Diff-Instruct toward the reward-tilted
reference (docs/methods.md §3), with the DI and DI++ baselines (``didr.mode``).

The maths lives in ``didr_jax.losses.didr`` and the generator in ``train.one_step``; this file
moves data. State (a pytree; all of it checkpointed):

    {"step", "params": {"generator", "fake"}, "opt": {"generator", "fake"},
     "ema": {"generator"}}      (EMA in float32; evaluation samples with it)

The frozen reference (the pipeline's loaded model) stays in the trainer: it is reloaded with the
pipeline, never updated. The fake score is initialised from it; the generator from
``didr.generator_path`` or, by default, from it too (``one_step``).

Per epoch (RNG from (seed, epoch)), ``sample.num_batches`` times:
  1. draw ``sample.batch_size`` prompts (``sample.group_size`` images each) from the stream;
  2. ``didr.fake_updates`` fake-score updates: DSM (``losses.didr.fake_score_loss``) on
     sg(g_theta(z)) at t ~ U[t_min, t_max] of the process, fresh z and eps each;
  3. one generator update: x0 = g_theta(z); x_t = alpha sg(x0) + sigma eps; the direction
     g = (x0_fake - x0_ref^CFG - (sigma^2/alpha) s_r) / mean|x0 - x0_ref^CFG| (DI: s_r = 0;
     DI++: -alpha_r grad r(x0) instead), s_r by the Diffused Reward Proxy through the frozen
     reference with CFG ``didr.ref_cfg`` and the differentiable reward on decoded images;
     then the generator EMA;
  4. the generator's images of step 3 go to the host rewarder (``reward_mean``).
Each jitted update ends in one optimizer step, ``common.guarded_apply``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from didr_jax import rewards as rewards_lib
from didr_jax.errors import ConfigError
from didr_jax.losses import common as loss_common, didr as didr_losses
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.train import common, one_step, optim
from didr_jax.train.didr_config import drs_data_range, validate_didr_section
from didr_jax.train.logging import log_compiles
from didr_jax.train.trainer import Trainer

def build_reward(c):
  """The differentiable reward of ``didr.reward`` (or of ``config.rewards``' differentiable
  entries when that is empty), or None for mode "di"."""
  if c.didr.mode == "di":
    return None
  spec = dict(c.didr.reward)
  key = "didr.reward"
  try:
    if not spec:
      key = "rewards"
      spec = {n: float(w) for n, w in dict(c.rewards).items()
              if rewards_lib.make(n).differentiable}
      if not spec:
        raise ConfigError(f"config.didr.reward: mode {c.didr.mode!r} needs a differentiable "
                          f"reward; none of config.rewards {sorted(c.rewards)} is (name one "
                          "in didr.reward)")
    reward = rewards_lib.from_config(spec)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"config.{key}: {e}") from None
  if not reward.differentiable:
    bad = [n for n in spec if not rewards_lib.make(n).differentiable]
    raise ConfigError(f"config.{key}: {bad} not differentiable (DIDR needs a jax_fn)")
  return reward


class DIDRTrainer(Trainer):
  """Holds static things (graph, optimizers, reference, reward, compiled functions); the state
  is a pytree (module docstring)."""

  def __init__(self, config, backbone, mesh):
    c = self.c = config
    d = c.didr
    self.bb, self.mesh = backbone, mesh
    self.rules = tuple(c.mesh.rules) + mesh_lib.DEFAULT_RULES
    self.net = common.Net.of(backbone.model, lora=c.lora, mesh=mesh,
                              rules=self.rules)
    self.ref_params = self.net.take_params()      # the frozen reference, never donated
    if backbone.family == "vp":
      self.process = didr_losses.vp_process(backbone.schedule)
      horizon = backbone.schedule.num_train_timesteps
    else:
      s = backbone.scheduler
      self.process = didr_losses.flow_process(1.0 if s.use_dynamic_shifting else s.shift)
      horizon = 1.0
    self.spec = one_step.OneStep.of(backbone, d.generator_time)
    cfg = validate_didr_section(d)
    self.data_range = drs_data_range(d, one_step.clip_range(backbone))
    try:  # DIDRConfig checks the options (drp_clip needs a data range)
      self.loss_cfg = dataclasses.replace(
          cfg, t_max=None if d.drp_t_max >= 1.0 else float(d.drp_t_max) * horizon,
          data_range=self.data_range, drp_clip=bool(d.drp_clip))
    except ValueError as e:
      raise ConfigError(f"config.didr: {e} (didr.drs_bound 'lo,hi', or a backbone whose "
                        "sampler clips x0)") from None
    t = c.train
    self.tx = {n: optim.for_network(t, d, n) for n in ("generator", "fake")}
    self.reward = build_reward(c)
    self.guard = common.NonFiniteGuard(t.max_consecutive_nonfinite)
    self.uncond = backbone.negative(1) if d.ref_cfg != 1.0 else None
    # Net.jit: the frozen rest (a LoRA run's base weights) is an argument, not a constant
    jit = lambda name, fn, **kw: log_compiles(name, self.net.jit(fn, **kw))
    self._fake_update = jit("the fake-score update", self._fake_update_impl, donate_argnums=(0,))
    self._gen_update = jit("the generator update", self._gen_update_impl, donate_argnums=(0,))
    self._generate = jit("the one-step generator", self._generate_impl)

  # ------------------------------------------------------------------------------ state

  def init_state(self) -> dict:
    """Generator (from ``didr.generator_path`` or a copy of the reference), fake score (a copy
    of the reference), their optimizer states, the generator EMA (float32) and the step."""
    d = self.c.didr
    copy = lambda tree, dtype=None: jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True),
                                                 tree)
    if d.generator_path:
      dtype = jnp.bfloat16 if self.c.backbone.dtype == "bfloat16" else jnp.float32
      gen = one_step.load_generator(d.generator_path, self.bb, self.ref_params, dtype=dtype,
                                    mesh=self.mesh, rules=self.rules,
                                    remat=self.c.backbone.remat)
    else:
      gen = copy(self.ref_params)
    fake = copy(self.ref_params)
    state = {"step": jnp.zeros((), jnp.int32),
             "params": {"generator": gen, "fake": fake},
             "opt": {"generator": self.tx["generator"].init(gen),
                     "fake": self.tx["fake"].init(fake)},
             "ema": {"generator": copy(gen, jnp.float32)}}
    return common.on_mesh(state, self.mesh)

  def policy_params(self, state) -> Any:
    """The generator EMA in the generator's dtypes (the raw generator when ema_decay = 0)."""
    if self.c.didr.ema_decay == 0.0:
      return state["params"]["generator"]
    return common.ema_as(state["ema"]["generator"], state["params"]["generator"])

  def fixed_sampler(self) -> dict:
    """How the generator samples (what an export states): one step from noise at its
    conditioning time."""
    return {"kind": "one_step", "time": self.spec.time}

  # ------------------------------------------------------------------------------ pieces

  def _shard(self, tree, batch: int):
    """Lays leaves with a leading batch axis out along the mesh's batch axes."""
    return mesh_lib.shard_batch(tree, batch, self.mesh, self.rules)

  def _noise(self, rng, batch: int) -> jax.Array:
    z = jax.random.normal(rng, self.bb.latent_shape(batch), jnp.float32)
    return self._shard(z, batch)

  def _generate_impl(self, params, frozen, cond, z):
    x0 = one_step.generate(self.bb, self.net.bind(params), z, cond, self.spec)
    return self.bb.decode(frozen, x0)

  def sample(self, params, prompts, rng):
    """One network call per image: (None, images (B, H, W, 3) in [0, 1], cond, None)."""
    cond = self.bb.encode(list(prompts))
    images = self._generate(params, self.bb.frozen(), cond, self._noise(rng, len(prompts)))
    return None, images, cond, None

  def _times_and_noise(self, rng, x_shape):
    d = self.c.didr
    k_t, k_e = jax.random.split(rng)
    t = self.process.sample_time(k_t, (x_shape[0],), d.t_min, d.t_max)
    return t, jax.random.normal(k_e, x_shape, jnp.float32)

  def _score_fn(self, params, cond, uncond, scale):
    model = self.net.bind(params)
    return lambda x, t: self.bb.denoise(model, x, t, cond, uncond, scale)

  # ------------------------------------------------------------------------------ updates

  def _fake_update_impl(self, state, cond, z, rng):
    """One DSM step of the fake score on sg(g_theta(z))."""
    x0 = jax.lax.stop_gradient(one_step.generate(
        self.bb, self.net.bind(state["params"]["generator"]), z, cond, self.spec))
    t, eps = self._times_and_noise(rng, x0.shape)
    fake = state["params"]["fake"]

    def loss_fn(p):
      return didr_losses.fake_score_loss(self._score_fn(p, cond, None, 1.0), x0, eps, t,
                                         self.process)

    loss, grads = jax.value_and_grad(loss_fn)(fake)
    new_fake, new_opt, m = common.guarded_apply(self.tx["fake"], grads, state["opt"]["fake"], fake, loss)
    new_state = {**state, "params": {**state["params"], "fake": new_fake},
                 "opt": {**state["opt"], "fake": new_opt}}
    return new_state, {"fake_loss": loss, "fake_grad_norm": m["grad_norm"],
                       "fake_nonfinite": m["nonfinite"]}

  def _gen_update_impl(self, state, ref_params, frozen, cond, uncond, z, reward_module,
                       features, rng, reward_scale):
    """One generator step (``losses.didr.generator_loss``), then the EMA; also returns the
    decoded images of the step's samples. ``reward_scale`` (1/beta or alpha_r) is an argument,
    so strength sweeps share one compiled program."""
    config = dataclasses.replace(self.loss_cfg, reward_scale=reward_scale)
    k_te, k_drp = jax.random.split(rng)
    gen = state["params"]["generator"]
    t, eps = self._times_and_noise(k_te, z.shape)
    fake_fn = self._score_fn(state["params"]["fake"], cond, None, 1.0)
    ref_fn = self._score_fn(ref_params, cond, uncond, self.c.didr.ref_cfg)
    reward_fn = None
    if self.reward is not None:
      reward_fn = lambda x0: self.reward.jax_fn(reward_module, self.bb.decode(frozen, x0),
                                                features)

    def loss_fn(p):
      x0 = one_step.generate(self.bb, self.net.bind(p), z, cond, self.spec)
      loss, m = didr_losses.generator_loss(x0, eps, t, self.process, fake_fn=fake_fn,
                                           ref_fn=ref_fn, reward_fn=reward_fn,
                                           config=config, rng=k_drp)
      return loss, (m, x0)

    (loss, (m, x0)), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen)
    new_gen, new_opt, am = common.guarded_apply(self.tx["generator"], grads,
                                                state["opt"]["generator"], gen, loss)
    ema = loss_common.ema_update(state["ema"]["generator"], new_gen, self.c.didr.ema_decay)
    new_state = {"step": state["step"] + 1,
                 "params": {**state["params"], "generator": new_gen},
                 "opt": {**state["opt"], "generator": new_opt}, "ema": {"generator": ema}}
    metrics = {**m, "generator_loss": loss, "generator_grad_norm": am["grad_norm"],
               "nonfinite": am["nonfinite"]}
    return new_state, metrics, self.bb.decode(frozen, jax.lax.stop_gradient(x0))

  def inputs(self, prompts):
    """(cond, reward module, reward features) of a prompt batch, batch-sharded."""
    b = len(prompts)
    cond = self._shard(self.bb.encode(list(prompts)), b)
    features = None
    if self.reward is not None and self.reward.prompt_features is not None:
      features = self._shard(self.reward.prompt_features(list(prompts)), b)
    return cond, None if self.reward is None else self.reward.module, features

  def train_step(self, state, prompts, rng):
    """``didr.fake_updates`` fake updates and one generator update on ``prompts``;
    returns (state, metrics (device scalars), images)."""
    b = len(prompts)
    cond, module, features = self.inputs(prompts)
    ms = []
    for f in range(self.c.didr.fake_updates):
      k_z, k_u = jax.random.split(jax.random.fold_in(rng, f))
      state, m = self._fake_update(state, cond, self._noise(k_z, b), k_u)
      ms.append(m)
    k_z, k_u = jax.random.split(jax.random.fold_in(rng, 1_000_003))
    state, gm, images = self._gen_update(state, self.ref_params, self.bb.frozen(), cond,
                                         self.uncond, self._noise(k_z, b), module, features,
                                         k_u, jnp.float32(self.c.didr.reward_scale))
    fm = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}
    # one skip flag per step: the generator update or any of its fake updates was skipped
    gm["nonfinite"] = jnp.maximum(gm["nonfinite"], jnp.max(jnp.stack(
        [m["fake_nonfinite"] for m in ms])))
    self.guard.observe(gm["nonfinite"])
    return state, {**fm, **gm}, images

  # ------------------------------------------------------------------------------ phases

  updates_each_batch = True  # the one-step samples come out of the generator update
  progress_keys = ("reward_mean", "generator_loss", "fake_loss", "nonfinite")

  def epoch_keys(self, rng):
    """Each batch's key is folded from the epoch's key itself (no update key)."""
    return rng, rng

  def rollout(self, state, prompts, rng):
    """One ``train_step``: its generator update's one-step samples are the batch to score."""
    state, metrics, images = self.train_step(state, prompts, rng)
    return state, images, metrics

