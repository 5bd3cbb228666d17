"""The DDPO trainer: sample an epoch, score it on host threads, normalise advantages, then
inner epochs of PPO-clipped (or RWR) updates over shuffled (sample, timestep) minibatches.

The math lives in ``didr_jax.losses.ddpo``; this file only moves data. Per epoch:
  1. ``sample.num_batches`` jitted rollouts (one ``lax.scan`` each) with the current policy;
     while batch b samples on the devices, batch b-1's images are scored on worker threads.
  2. Rewards of the global batch -> advantages (per-prompt buffer or per-epoch groups).
  3. For each inner epoch: shuffle samples, draw a random subset of ``timestep_fraction`` of each
     sample's steps, and run one jitted update per (train.batch_size x grad_accum) samples; the
     update accumulates gradients over micro-batches and timesteps with a ``lax.scan``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax.losses import ddpo as ddpo_loss
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.train import common


def ddpo_section():
  import ml_collections
  d = ml_collections.ConfigDict()
  d.objective = "ppo"            # "ppo" (DDPO_IS / DDPO_SF) or "rwr" (baseline)
  d.clip_range = 1e-4
  d.adv_clip_max = 5.0
  d.kl_beta = 0.0                # Flow-GRPO KL to the frozen reference (0 = off)
  d.advantage = "per_prompt"     # "per_prompt" (DDPO buffer) or "group" (Flow-GRPO)
  d.buffer_size = 32
  d.min_count = 16
  d.rwr_mode = "exp"             # "exp" or "sparse"
  d.rwr_temperature = 1.0
  d.rwr_percentile = 0.9
  return d


class DDPOTrainer:
  """Holds static things (graphs, optimizer, compiled functions); state is a pytree."""

  def __init__(self, config, backbone, mesh):
    self.c = config
    self.bb = backbone
    self.mesh = mesh
    self.rules = tuple(config.mesh.rules) + mesh_lib.DEFAULT_RULES
    self.net = common.Net.of(backbone.model, lora=config.lora)
    t = config.train
    self.tx = common.make_optimizer(t.learning_rate, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                                    weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)
    self.num_train_t = max(1, int(round(config.sample.num_steps * t.timestep_fraction)))
    d = config.ddpo
    if d.objective not in ("ppo", "rwr"):
      raise ValueError(f"config.ddpo.objective: {d.objective!r} is not 'ppo' or 'rwr'")
    self.ref_params = (jax.tree.map(jnp.copy, self.net.params) if d.kl_beta > 0 else None)
    self._sample = self.net.jit(self._sample_impl, jit=nnx.jit, static_argnames=("num_steps",))
    self._update = self.net.jit(self._update_impl, donate_argnums=(0,))
    self._prepare = jax.jit(self._prepare_impl)

  # ------------------------------------------------------------------------------ state

  def init_state(self) -> dict:
    """The initial state. It takes over the loaded parameters (updates donate the state, so
    the trainer keeps no second reference); call it once per trainer."""
    params = self.net.take_params()
    state = {"step": jnp.zeros((), jnp.int32), "params": {"policy": params},
             "opt": {"policy": self.tx.init(params)}, "ema": {}}
    return common.on_mesh(state, self.mesh)

  def policy_params(self, state) -> Any:
    return state["params"]["policy"]

  # ------------------------------------------------------------------------------ sampling

  def _sample_impl(self, params, frozen, cond, uncond, x_init, rng, guidance, eta, *, num_steps):
    model = self.net.bind(params)
    denoise = lambda x, t: self.bb.denoise(model, x, t, cond, uncond, guidance)
    traj = self.bb.rollout(denoise, x_init, num_steps=num_steps, eta=eta, rng=rng)
    images = self.bb.decode(frozen, traj.sample)
    return traj, images

  def sample(self, params, prompts, rng, *, num_steps=None, guidance=None, eta=None):
    """Rollouts for a list of prompts: (SampleOutput, images in [0, 1], cond, uncond)."""
    s = self.c.sample
    num_steps = num_steps or s.num_steps
    guidance = s.guidance_scale if guidance is None else guidance
    eta = s.eta if eta is None else eta
    cond = self.bb.encode(prompts)
    uncond = self.bb.negative(1) if guidance != 1.0 else None
    k_noise, k_steps = jax.random.split(rng)
    x_init = jax.random.normal(k_noise, self.bb.latent_shape(len(prompts)), jnp.float32)
    x_init = jax.device_put(x_init, mesh_lib.batch_sharding(self.mesh, x_init.ndim, self.rules,
                                                            x_init.shape[0]))
    traj, images = self._sample(params, self.bb.frozen(), cond, uncond, x_init, k_steps,
                                jnp.float32(guidance), jnp.float32(eta), num_steps=num_steps)
    return traj, images, cond, uncond

  # ------------------------------------------------------------------------------ training

  def _prepare_impl(self, rng, data):
    """Shuffles samples and per-sample timesteps and lays the epoch out as
    (num_updates, grad_accum, train.batch_size, num_train_t, ...)."""
    n, steps = data["log_probs"].shape
    k = self.num_train_t
    k_perm, k_t = jax.random.split(rng)
    perm = jax.random.permutation(k_perm, n)
    tperm = jax.vmap(lambda key: jax.random.permutation(key, steps))(
        jax.random.split(k_t, n))[:, :k]                                  # (n, k)
    lat = data["latents"][perm]                                           # (n, steps+1, ...)
    rows = jnp.arange(n)[:, None]
    out = {
        "x_t": lat[rows, tperm], "x_next": lat[rows, tperm + 1],
        "t": data["timesteps"][tperm], "t_next": data["next_timesteps"][tperm],
        "logp_old": data["log_probs"][perm][rows, tperm],
        "adv": data["advantages"][perm], "rewards": data["rewards"][perm],
        "x0": data["latents"][perm, -1],
        "cond": jax.tree.map(lambda x: x[perm], data["cond"]),
    }
    b, acc = self.c.train.batch_size, self.c.train.grad_accum
    shaped = jax.tree.map(lambda x: x.reshape((n // (b * acc), acc, b) + x.shape[1:]), out)
    spec = mesh_lib.logical_to_spec((None, None, "batch"), self.rules, self.mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, P(*spec, *([None] * (x.ndim - len(spec)))))), shaped)

  def _ppo_loss(self, params, micro, j, uncond, ref_params, guidance):
    d = self.c.ddpo
    model = self.net.bind(params)
    x_t, t = micro["x_t"][:, j], micro["t"][:, j]
    t_next = micro["t_next"][:, j]
    unc = None if uncond is None else jax.tree.map(
        lambda u: jnp.broadcast_to(u, (x_t.shape[0],) + u.shape[1:]), uncond)
    out = self.bb.denoise(model, x_t, t, micro["cond"], unc, guidance)
    logp, mean, std = self.bb.log_prob(out, x_t, micro["x_next"][:, j], t, t_next,
                                       eta=self.c.sample.eta)
    loss, metrics = ddpo_loss.ppo_loss(logp, micro["logp_old"][:, j], micro["adv"],
                                       clip_range=d.clip_range, adv_clip_max=d.adv_clip_max)
    if ref_params is not None:
      ref_out = self.bb.denoise(self.net.bind(ref_params), x_t, t, micro["cond"], unc, guidance)
      _, ref_mean, _ = self.bb.log_prob(ref_out, x_t, micro["x_next"][:, j], t, t_next,
                                        eta=self.c.sample.eta)
      kl = jnp.mean(ddpo_loss.kl_to_reference(mean, jax.lax.stop_gradient(ref_mean), std))
      loss = loss + d.kl_beta * kl
      metrics = {**metrics, "kl_ref": kl}
    return loss, {**metrics, "loss": loss}

  def _rwr_loss(self, params, micro, rng):
    """Reward-weighted denoising loss on the final samples (eps-space MSE per sample)."""
    d = self.c.ddpo
    model = self.net.bind(params)
    x0 = micro["x0"]
    x_t, t, target = self.bb.training_pair(rng, x0)
    out = self.bb.denoise(model, x_t, t, micro["cond"], None, 1.0)
    per = jnp.mean((out.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, x0.ndim)))
    loss = ddpo_loss.rwr_loss(per, micro["rewards"], mode=d.rwr_mode,
                              temperature=d.rwr_temperature, percentile=d.rwr_percentile)
    return loss, {"loss": loss}

  def _update_impl(self, state, batch, uncond, ref_params, guidance, rng):
    """One optimizer step from (grad_accum, B, k, ...) data: gradients averaged over
    micro-batches and timesteps (a scan, so memory does not grow with either)."""
    params = state["params"]["policy"]
    acc = batch["adv"].shape[0]
    rwr = self.c.ddpo.objective == "rwr"
    k = 1 if rwr else self.num_train_t
    guidance = guidance if self.c.train.cfg else jnp.float32(1.0)
    unc = uncond if self.c.train.cfg else None

    def body(carry, idx):
      grads, msum = carry
      a, j = idx // k, idx % k
      micro = jax.tree.map(lambda x: x[a], batch)
      if rwr:
        fn = lambda p: self._rwr_loss(p, micro, jax.random.fold_in(rng, idx))
      else:
        fn = lambda p: self._ppo_loss(p, micro, j, unc, ref_params, guidance)
      (_, m), g = jax.value_and_grad(fn, has_aux=True)(params)
      grads = jax.tree.map(jnp.add, grads, g)
      msum = jax.tree.map(jnp.add, msum, m)
      return (grads, msum), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    m0 = jax.eval_shape(lambda: (self._rwr_loss(params, jax.tree.map(lambda x: x[0], batch), rng)
                                 if rwr else self._ppo_loss(params, jax.tree.map(
                                     lambda x: x[0], batch), 0, unc, ref_params, guidance))[1])
    m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
    # XLA:CPU runs convolutions inside while-loop bodies far slower than unrolled (measured
    # 30x on the toy UNet); accelerators keep the rolled loop (compile time flat in acc * k).
    (grads, msum), _ = jax.lax.scan(body, (zeros, m0), jnp.arange(acc * k),
                                    unroll=jax.default_backend() == "cpu")
    grads = jax.tree.map(lambda g: g / (acc * k), grads)
    updates, opt = self.tx.update(grads, state["opt"]["policy"], params)
    import optax
    new_params = optax.apply_updates(params, updates)
    metrics = {k_: v / (acc * k) for k_, v in msum.items()}
    metrics["grad_norm"] = optax.global_norm(grads)
    new_state = {"step": state["step"] + 1, "params": {"policy": new_params},
                 "opt": {"policy": opt}, "ema": state["ema"]}
    return new_state, metrics

  def train_on(self, state, data, uncond, rng):
    """Inner epochs over one epoch of samples; returns (state, mean metrics)."""
    metrics = []
    guidance = jnp.float32(self.c.sample.guidance_scale)
    for inner in range(self.c.train.num_inner_epochs):
      k_prep, k_upd = jax.random.split(jax.random.fold_in(rng, inner))
      batches = self._prepare(k_prep, data)
      for u in range(batches["adv"].shape[0]):
        mb = jax.tree.map(lambda x: x[u], batches)
        state, m = self._update(state, mb, uncond, self.ref_params, guidance,
                                jax.random.fold_in(k_upd, u))
        metrics.append(m)
    return state, {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}

  def epoch(self, state, epoch: int, stream, normalizer, rewarder) -> tuple[dict, dict, np.ndarray]:
    """One DDPO epoch. Returns (state, metrics, a few sample images)."""
    c = self.c
    rng = jax.random.fold_in(jax.random.key(c.seed), epoch)
    k_sample, k_train = jax.random.split(rng)
    t0 = time.time()
    parts, futures, pending = [], [], None
    for b in range(c.sample.num_batches):
      prompts = stream.next(c.sample.batch_size // c.sample.group_size, c.sample.group_size)
      traj, images, cond, uncond = self.sample(self.policy_params(state), prompts,
                                               jax.random.fold_in(k_sample, b))
      if pending is not None:  # score the previous batch while this one samples
        futures.append(rewarder.submit(common.host_rows(pending[0]), pending[1]))
      pending = (images, prompts)
      parts.append({"latents": jnp.swapaxes(traj.latents, 0, 1),
                    "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond,
                    "prompts": prompts})
    futures.append(rewarder.submit(common.host_rows(pending[0]), pending[1]))
    first_images = np.asarray(common.host_rows(pending[0]))[: c.log_images]
    local_rewards = np.concatenate([f.result() for f in futures])
    t_sample = time.time() - t0
    from didr_jax.train.advantages import gather_host
    rewards = gather_host(local_rewards)
    prompts = [p for part in parts for p in part["prompts"]]
    adv = normalizer(prompts, rewards)
    data = {
        "latents": jnp.concatenate([p["latents"] for p in parts]),
        "log_probs": jnp.concatenate([p["log_probs"] for p in parts]),
        "cond": jax.tree.map(lambda *x: jnp.concatenate(x), *[p["cond"] for p in parts]),
        "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
        "advantages": jnp.asarray(adv), "rewards": jnp.asarray(rewards, jnp.float32),
    }
    t1 = time.time()
    state, metrics = self.train_on(state, data, uncond, k_train)
    metrics.update({"reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
                    "time_sample_s": t_sample, "time_train_s": time.time() - t1,
                    "samples_per_s": len(rewards) / (time.time() - t0)})
    return state, metrics, first_images
