"""The CRD trainer (docs/methods.md §2): rollouts from the sampling snapshot, rewards, then
centered reward matching on the forward process, for both backbone families.

The maths lives in ``didr_jax.losses.crd``; this file only moves data. Per epoch:
  1. ``sample.num_batches`` jitted rollouts from the **sampling snapshot** ``ema.sampler`` (the
     configured sampler; the CRD configs use the deterministic one, sample.eta = 0: DDIM for VP,
     Euler ODE for flow), ``sample.group_size`` = K images per prompt. Only the clean samples x0,
     their conditioning and their group index are kept. While batch b samples on the devices,
     batch b-1 is scored on the reward threads (any reward: nothing is differentiated).
  2. Advantages over the whole epoch: A = ``crd.reward_to_advantage(R, group, P)`` (per-prompt
     mean, global std, clip +-5), P = prompts per epoch; the group index is the prompt id (a
     prompt drawn twice in one epoch forms two groups).
  3. ``train.num_inner_epochs`` passes over the epoch in minibatches of whole groups
     (train.batch_size a multiple of K; ids relabelled 0..B/K-1 per minibatch, so the exact
     per-prompt centering sees every sample of each of its prompts). One optimizer step per
     ``train.grad_accum`` minibatches; each minibatch is trained at ``crd.num_train_times`` forward
     times: per sample t ~ the family's training times (flow: sigmas shifted by crd.time_shift;
     both up to crd.t_max), fresh eps, x_t = alpha_t x0 + sigma_t eps, and in one jitted function
     the outputs of theta, of the "old" snapshot ``ema.old`` and of the CFG-guided (crd.kl_cfg)
     frozen pretrained reference feed ``crd.crd_loss``. Gradients are averaged over
     grad_accum x num_train_times (``common.accumulate``) and applied once
     (``common.guarded_apply``).
  4. Both snapshots move: snap <- d(step) snap + (1 - d(step)) theta, step = optimizer steps
     taken so far (``SnapshotSchedule``; the config's crd.old / crd.sampler).

State (a pytree, all checkpointed): {"step", "params": {"policy"}, "opt": {"policy"},
"ema": {"old", "sampler"}} (snapshots in float32); the frozen reference stays in the trainer
(it is the loaded model).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax.diffusion import ddim, kernels
from didr_jax.errors import ConfigError
from didr_jax.losses import crd as crd_losses
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.train import common, optim
from didr_jax.train.crd_config import validate_crd_section
from didr_jax.train.logging import log_compiles
from didr_jax.train.trainer import Trainer

def _all_equal(a, b) -> jax.Array:
  """True iff the two pytrees (same structure) are bitwise equal, a scalar bool."""
  eq = [jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return jnp.all(jnp.stack(eq)) if eq else jnp.bool_(True)


def check_kl_weight_range(d, rewards: np.ndarray) -> None:
  """``crd.kl_weight = "reward"`` weights the KL anchor by the raw reward, which it assumes in
  [0, 1]; a reward outside that range (PickScore is about 21) would saturate every weight at 1
  (or 0) silently, so the run stops with one line before the update instead."""
  if d.kl_beta > 0 and d.kl_weight == "reward" and rewards.size and (
      float(np.min(rewards)) < 0.0 or float(np.max(rewards)) > 1.0):
    raise ConfigError(
        f"config.crd.kl_weight: 'reward' weights the KL anchor by the raw reward, which must lie "
        f"in [0, 1]; this epoch's rewards span [{float(np.min(rewards)):.4g}, "
        f"{float(np.max(rewards)):.4g}] (use kl_weight='advantage', or a reward in [0, 1])")


def rollout_time_grid(backbone, config) -> np.ndarray:
  """The input times of the rollout sampler's ``sample.num_steps`` steps (VP: the DDIM integer
  timesteps, ``ddim.ddim_timesteps``; flow: the sigma grid without its terminal 0), up to
  ``crd.t_max`` of the process: what ``crd.train_times = "rollout"`` draws training times from,
  as the authors' trainer does."""
  n = int(config.sample.num_steps)
  if backbone.family == "vp":
    grid = np.asarray(ddim.ddim_timesteps(backbone.schedule, n)[0])
    keep = grid <= float(config.crd.t_max) * backbone.schedule.num_train_timesteps
  else:
    grid = np.asarray(backbone.sigmas(n, backbone.latent_shape(1)))[:-1]
    keep = grid <= float(config.crd.t_max)
  if not keep.any():
    raise ConfigError(f"config.crd.t_max: {config.crd.t_max} keeps none of the rollout's times "
                      f"{grid.tolist()}")
  return grid[keep]


class CRDTrainer(Trainer):
  """Holds static things (graphs, optimizer, schedules, the frozen reference, compiled
  functions); the training state is a pytree."""

  def __init__(self, config, backbone, mesh):
    self.c = config
    self.bb = backbone
    self.mesh = mesh
    self.rules = tuple(config.mesh.rules) + mesh_lib.DEFAULT_RULES
    self.net = common.Net.of(backbone.model, lora=config.lora, mesh=mesh,
                              rules=self.rules)
    d = config.crd
    sched = validate_crd_section(d)
    self.old_schedule, self.sampler_schedule = sched["old"], sched["sampler"]
    t = config.train
    self.guard = common.NonFiniteGuard(t.max_consecutive_nonfinite)
    self.tx = optim.for_network(t)
    self.group = int(config.sample.group_size)
    self.prompts_per_minibatch = int(t.batch_size) // self.group
    self.num_train_times = int(d.num_train_times)
    self.time_grid = rollout_time_grid(backbone, config) if d.train_times == "rollout" else None
    # the frozen pretrained reference of the KL anchor (a copy: the state's params are donated)
    self.ref_params = (jax.tree.map(jnp.copy, self.net.params) if d.kl_beta > 0 else None)
    self._uncond = None
    # Net.jit: the frozen rest (a LoRA run's base weights) is an argument, not a constant
    self._sample = log_compiles("the sampler", self.net.jit(
        self._sample_impl, static_argnames=("num_steps",)))
    self._prepare = log_compiles("the epoch layout", jax.jit(self._prepare_impl))
    self._update = log_compiles("the update step", self.net.jit(self._update_impl,
                                                                donate_argnums=(0,)))
    self._snapshots = jax.jit(self._snapshots_impl, donate_argnums=(0,))

  # ------------------------------------------------------------------------------ state

  def init_state(self) -> dict:
    """The initial state; both snapshots start equal to theta, kept in float32 whatever the
    parameter dtype (an EMA step of weight 1 - d = 1e-3 is below bfloat16's resolution 2^-8,
    so a bfloat16 snapshot would freeze). It takes over the loaded parameters (updates donate
    the state); call it once per trainer."""
    params = self.net.take_params()
    copy = lambda: jax.tree.map(lambda x: jnp.array(x, dtype=jnp.promote_types(x.dtype,
                                                                               jnp.float32)),
                                params)
    state = {"step": jnp.zeros((), jnp.int32), "params": {"policy": params},
             "opt": {"policy": self.tx.init(params)},
             "ema": {"old": copy(), "sampler": copy()}}
    return common.on_mesh(state, self.mesh)

  def policy_params(self, state) -> Any:
    return state["params"]["policy"]

  def uncond(self):
    """The negative-prompt conditioning (batch 1) of the CFG-guided reference, encoded once."""
    if self._uncond is None:
      self._uncond = self.bb.negative(1)
    return self._uncond

  # ------------------------------------------------------------------------------ sampling

  def _sample_impl(self, params, frozen, cond, uncond, x_init, rng, guidance, eta, *, num_steps):
    model = self.net.bind(params)
    denoise = lambda x, t: self.bb.denoise(model, x, t, cond, uncond, guidance)
    traj = self.bb.rollout(denoise, x_init, num_steps=num_steps, eta=eta, rng=rng)
    return traj, self.bb.decode(frozen, traj.sample)

  def sample(self, params, prompts, rng, *, num_steps=None, eta=None, guidance=None):
    """Rollouts for a list of prompts: (SampleOutput, images in [0, 1], cond, uncond); the
    sampler's defaults are sample.num_steps / sample.eta / sample.guidance_scale."""
    s = self.c.sample
    num_steps = num_steps or s.num_steps
    guidance = s.guidance_scale if guidance is None else guidance
    eta = s.eta if eta is None else eta
    cond = self.bb.encode(prompts)
    uncond = self.uncond() if guidance != 1.0 else None
    k_noise, k_steps = jax.random.split(rng)
    x_init = jax.random.normal(k_noise, self.bb.latent_shape(len(prompts)), jnp.float32)
    x_init = jax.device_put(x_init, mesh_lib.batch_sharding(self.mesh, x_init.ndim, self.rules,
                                                            x_init.shape[0]))
    traj, images = self._sample(params, self.bb.frozen(), cond, uncond, x_init, k_steps,
                                jnp.float32(guidance), jnp.float32(eta), num_steps=num_steps)
    return traj, images, cond, uncond

  # ------------------------------------------------------------------------------ training

  def _prepare_impl(self, rng, data):
    """Shuffles whole groups (samples i K .. i K + K - 1 are group i) and lays the epoch out as
    (num_updates, grad_accum, train.batch_size, ...), each minibatch holding B / K whole groups;
    ids = the group's position in its minibatch."""
    n = data["rewards"].shape[0]
    k = self.group
    gperm = jax.random.permutation(rng, n // k)
    perm = (gperm[:, None] * k + jnp.arange(k)[None, :]).reshape(-1)
    out = jax.tree.map(lambda x: x[perm], data)
    b, acc = self.c.train.batch_size, self.c.train.grad_accum
    out["ids"] = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32) // k, (n // b, b)).reshape(n)
    shaped = jax.tree.map(lambda x: x.reshape((n // (b * acc), acc, b) + x.shape[1:]), out)
    spec = mesh_lib.logical_to_spec((None, None, "batch"), self.rules, self.mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, P(*spec, *([None] * (x.ndim - len(spec)))))), shaped)

  def forward_noise(self, rng, x0):
    """(x_t, t, eps, alpha, sigma): per sample t ~ the family's training times up to crd.t_max
    (flow sigmas shifted by crd.time_shift), x_t = alpha_t x0 + sigma_t eps, eps ~ N(0, I)."""
    d = self.c.crd
    k_t, k_e = jax.random.split(rng)
    if self.time_grid is None:
      t = self.bb.train_times(k_t, (x0.shape[0],), t_max=d.t_max, shift=d.time_shift)
    else:
      t = jnp.asarray(self.time_grid)[jax.random.randint(k_t, (x0.shape[0],), 0,
                                                          len(self.time_grid))]
    eps = jax.random.normal(k_e, x0.shape, x0.dtype)
    alpha, sigma = self.bb.alpha_sigma(t)
    return kernels.q_sample(x0, eps, alpha, sigma), t, eps, alpha, sigma

  def _loss(self, params, old, ref, micro, uncond, rng, same=None):
    """``crd_loss`` at one forward-noised time of a minibatch of whole groups: theta and the
    old snapshot see the conditional input (no CFG), the frozen reference CFG crd.kl_cfg.

    ``same`` (a bool scalar): theta and old are bitwise equal (at init, or with decay 0). The
    two forwards are then the same function, but XLA compiles the differentiated one and the
    plain one into differently fused programs whose float32 results differ by rounding (about
    1e-7 relative on the toy UNet); with ``same`` the old output is taken from theta's forward,
    so the implicit reward is exactly 0 there, as the maths says."""
    d = self.c.crd
    x0, cond = micro["x0"], micro["cond"]
    x_t, t, eps, alpha, sigma = self.forward_noise(rng, x0)
    out = lambda p, unc=None, w=1.0: self.bb.denoise(self.net.bind(p), x_t, t, cond, unc, w)
    out_theta = out(params)
    out_old = jax.lax.stop_gradient(out(old))
    if same is not None:
      out_old = jnp.where(same, jax.lax.stop_gradient(out_theta), out_old)
    out_ref = None
    if ref is not None:
      unc = uncond if d.kl_cfg != 1.0 else None
      out_ref = jax.lax.stop_gradient(out(ref, unc, d.kl_cfg))
    return crd_losses.crd_loss(
        out_theta, out_old, out_ref, x0, eps, alpha, sigma, micro["rewards"], micro["adv"],
        micro["ids"], self.prompts_per_minibatch, prediction_type=self.bb.prediction_type,
        c_beta=d.c_beta, loss_type=d.loss, adv_clip=d.adv_clip, kl_beta=d.kl_beta,
        kl_min=d.kl_min, kl_weight=d.kl_weight, normalise=d.normalise, floor=d.weight_floor)

  def _update_impl(self, state, batch, uncond, ref_params, rng):
    """One optimizer step from (grad_accum, B, ...) data: gradients averaged over the
    micro-batches and crd.num_train_times forward times each (``common.accumulate``)."""
    params, old = state["params"]["policy"], state["ema"]["old"]
    acc = batch["adv"].shape[0]
    k = self.num_train_times
    same = _all_equal(params, old)

    def grad_at(idx):
      micro = jax.tree.map(lambda x: x[idx // k], batch)
      fn = lambda p: self._loss(p, old, ref_params, micro, uncond, jax.random.fold_in(rng, idx),
                                same)
      (_, m), g = jax.value_and_grad(fn, has_aux=True)(params)
      return g, m

    grads, msum = common.accumulate(grad_at, acc * k)
    grads = jax.tree.map(lambda g: g / (acc * k), grads)
    metrics = {name: v / (acc * k) for name, v in msum.items()}
    new_params, opt, applied = common.guarded_apply(self.tx, grads, state["opt"]["policy"],
                                                     params, metrics["loss"])
    metrics.update(applied)
    new_state = {"step": state["step"] + 1, "params": {"policy": new_params},
                 "opt": {"policy": opt}, "ema": state["ema"]}
    return new_state, metrics

  def _snapshots_impl(self, state):
    """Both EMA snapshots move towards theta with their decays at the current step."""
    theta, step = state["params"]["policy"], state["step"]
    old, d_old = self.old_schedule.update(state["ema"]["old"], theta, step)
    sampler, d_sampler = self.sampler_schedule.update(state["ema"]["sampler"], theta, step)
    new_state = {**state, "ema": {"old": old, "sampler": sampler}}
    return new_state, {"decay_old": d_old, "decay_sampler": d_sampler}

  def train_on(self, state, data, rng):
    """Inner epochs over one epoch of samples; returns (state, mean metrics)."""
    metrics = []
    for inner in range(self.c.train.num_inner_epochs):
      k_prep, k_upd = jax.random.split(jax.random.fold_in(rng, inner))
      batches = self._prepare(k_prep, data)
      for u in range(batches["adv"].shape[0]):
        mb = jax.tree.map(lambda x: x[u], batches)
        state, m = self._update(state, mb, self.uncond(), self.ref_params,
                                jax.random.fold_in(k_upd, u))
        self.guard.observe(m["nonfinite"])
        metrics.append(m)
    self.guard.flush()
    out = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
    out["nonfinite"] = float(sum(float(m["nonfinite"]) for m in metrics))  # skipped steps
    return state, out

  def rollout(self, state, prompts, rng):
    """Samples ``prompts`` with the sampler snapshot (``crd.sampler``); the state is unchanged."""
    traj, images, cond, _ = self.sample(state["ema"]["sampler"], prompts, rng)
    return state, images, {"x0": traj.sample, "cond": cond}

  def update(self, state, batches, prompts, rewards, rng):
    """Group-centred advantages of the epoch's rewards, ``train.num_inner_epochs`` passes of
    CRD updates, then the snapshots move (``_snapshots``)."""
    del prompts  # the groups are consecutive samples
    rewards = np.asarray(rewards, np.float32)
    check_kl_weight_range(self.c.crd, rewards)
    n = len(rewards)
    groups = jnp.arange(n, dtype=jnp.int32) // self.group
    adv, _ = crd_losses.reward_to_advantage(jnp.asarray(rewards), groups, n // self.group,
                                            clip=self.c.crd.adv_clip, std=self.c.crd.adv_std)
    data = {"x0": jnp.concatenate([p["x0"] for p in batches]),
            "cond": jax.tree.map(lambda *x: jnp.concatenate(x), *[p["cond"] for p in batches]),
            "adv": adv, "rewards": jnp.asarray(rewards)}
    state, metrics = self.train_on(state, data, rng)
    state, decays = self._snapshots(state)
    metrics.update({k: float(v) for k, v in decays.items()})
    return state, metrics
