"""The DDPO trainer: sample an epoch, score it on host threads, normalise advantages, then
inner epochs of PPO-clipped (or RWR) updates over shuffled (sample, timestep) minibatches.

The math lives in ``didr_jax.losses.ddpo``; this file only moves data. Per epoch:
  1. ``sample.num_batches`` jitted rollouts (one ``lax.scan`` each) with the current policy;
     while batch b samples on the devices, batch b-1's images are scored on worker threads.
  2. Rewards of the global batch -> advantages (per-prompt buffer or per-epoch groups).
  3. For each inner epoch: shuffle samples into micro-batches of ``train.batch_size``, draw for
     each micro-batch k = ``ddpo_config.train_steps`` of its stochastic steps (one set shared by the
     micro-batch, as Flow-GRPO trains step j of a whole batch at once), and run one jitted
     update per grad_accum micro-batches (an optimizer step covers train.batch_size x
     grad_accum samples x their k steps).

The update is a "pair micro-batch" program: the (sample, step) pairs of a micro-batch are
independent transitions given the stored trajectory, so they go through the network as one
batch of train.batch_size x ``ddpo.steps_per_call`` pairs (per-pair timesteps; CFG folded into
the batch by ``denoise``), and the update makes grad_accum x k / steps_per_call such calls
(steps_per_call 0 = all k: one forward-backward per micro-batch, so the compiled program
holds one network call instead of one per step). The loss and gradient are those of the
per-step layout (steps_per_call 1, the default: one call per step, the sum over steps of
per-step masked means), only in fewer, bigger calls. The per-step layout uses the least
activation memory, measures ``grad_norm/step_s`` and applies ``ddpo.step_grad_clip``, and on
XLA:CPU it measured faster: the toy UNet's one-call update (160 pairs, CFG: batch 320)
compiled in about 2/3 of the time but ran over 10 times slower than five calls of 32 (measured
when the calls were unrolled, before ``common.accumulate`` rolled them).

The policy's steps (``sample.deterministic_last_step``, ``sample.sde_window``): a per-step noise
level vector, sample.eta on the stochastic (MDP) steps and 0 elsewhere (ODE steps, log-prob 0,
never trained). Deterministic steps are masked out of the PPO loss and the KL (a step whose std
is 0, e.g. DDIM's last step with set_alpha_to_one, is masked even at a nonzero level).

Per-timestep diagnostics (epoch metrics, so TensorBoard and history.json): for every trajectory
step s that was trained, ``clipfrac/step_s``, ``abs_dlogp/step_s`` (mean |log p_new - log p_old|)
and, with ``ddpo.steps_per_call`` 1, ``grad_norm/step_s`` (the norm of one micro-batch's
gradient at that step, before averaging).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax.diffusion import ddim
from didr_jax.errors import ConfigError
from didr_jax.losses import ddpo as ddpo_loss
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.train import advantages, common, ddpo_config, optim
from didr_jax.train.logging import log_compiles
from didr_jax.train.trainer import Trainer


_STEP_METRICS = {"clipfrac_steps": "clipfrac", "abs_dlogp_steps": "abs_dlogp",
                 "grad_norm_steps": "grad_norm"}


def epoch_metrics(updates: list[dict]) -> dict:
  """Means over an epoch's updates; the per-step vectors become ``{name}/step_{s:02d}`` =
  sum over updates / number of trained slots at step s (only steps that were trained)."""
  host = [jax.tree.map(np.asarray, m) for m in updates]
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0] if np.ndim(host[0][k]) == 0}
  if "steps_count" in host[0]:
    count = np.sum([m["steps_count"] for m in host], axis=0)
    for key, name in _STEP_METRICS.items():
      if key not in host[0]:  # grad_norm_steps: only measured with one step per network call
        continue
      total = np.sum([m[key] for m in host], axis=0)
      for step in np.flatnonzero(count > 0):
        out[f"{name}/step_{step:02d}"] = float(total[step] / count[step])
  return out


def clip_step_grad(grads, max_norm: float):
  """``ddpo.step_grad_clip``: g min(1, max_norm / ||g||) for one trajectory step's gradient
  (identity when max_norm <= 0), so no step's gradient outweighs the others by more than
  max_norm in the average over steps."""
  if max_norm <= 0:
    return grads
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(optax.global_norm(grads), 1e-30))
  return jax.tree.map(lambda x: x * scale.astype(x.dtype), grads)


def make_normalizer(d) -> advantages.AdvantageNormalizer:
  """The advantage normaliser a ``ddpo`` config section asks for (the trainer's host state)."""
  return advantages.AdvantageNormalizer(d.advantage, d.buffer_size, d.min_count, d.advantage_std)


class DDPOTrainer(Trainer):
  """Holds static things (graphs, optimizer, compiled functions); state is a pytree."""

  progress_keys = ("reward_mean", "loss", "approx_kl", "nonfinite")

  def __init__(self, config, backbone, mesh):
    self.c = config
    self.bb = backbone
    self.mesh = mesh
    self.rules = tuple(config.mesh.rules) + mesh_lib.DEFAULT_RULES
    self.net = common.Net.of(backbone.model, lora=config.lora, mesh=mesh,
                              rules=self.rules)
    t = config.train
    self.tx = optim.for_network(t)
    self.num_train_t = ddpo_config.train_steps(config.sample, t)
    d = config.ddpo
    if d.objective not in ("ppo", "rwr"):
      raise ConfigError(f"config.ddpo.objective: {d.objective!r} is not 'ppo' or 'rwr'")
    self.ref_params = (jax.tree.map(jnp.copy, self.net.params) if d.kl_beta > 0 else None)
    self._sample = log_compiles("the sampler", self.net.jit(
        self._sample_impl, static_argnames=("num_steps",)))
    self._update = log_compiles("the update step", self.net.jit(self._update_impl,
                                                                donate_argnums=(0,)))
    self._prepare = log_compiles("the epoch layout", jax.jit(self._prepare_impl))
    # host state (checkpointed through host_state()): advantage statistics, skipped-step count
    self.normalizer = make_normalizer(d)
    self.guard = common.NonFiniteGuard(t.max_consecutive_nonfinite)

  # ------------------------------------------------------------------------------ state

  def init_state(self) -> dict:
    """The initial state. It takes over the loaded parameters (updates donate the state, so
    the trainer keeps no second reference); call it once per trainer."""
    params = self.net.take_params()
    state = {"step": jnp.zeros((), jnp.int32), "params": {"policy": params},
             "opt": {"policy": self.tx.init(params)}, "ema": {}}
    return common.on_mesh(state, self.mesh)

  def host_state(self) -> dict:
    """JSON-able host state for the checkpoint (keys kept from the first release)."""
    return {"advantages": self.normalizer.state_dict(), "nonfinite": self.guard.state_dict()}

  def load_host_state(self, d: dict) -> None:
    self.normalizer.load_state_dict(d["advantages"])
    self.guard.load_state_dict(d.get("nonfinite", {}))

  def policy_params(self, state) -> Any:
    return state["params"]["policy"]

  # ------------------------------------------------------------------------------ sampling

  def _sample_impl(self, params, frozen, cond, uncond, x_init, rng, guidance, levels, *,
                   num_steps):
    model = self.net.bind(params)
    denoise = lambda x, t: self.bb.denoise(model, x, t, cond, uncond, guidance)
    traj = self.bb.rollout(denoise, x_init, num_steps=num_steps, eta=levels, rng=rng,
                           sde_type=self.c.sample.sde_type)
    images = self.bb.decode(frozen, traj.sample)
    return traj, images

  def levels(self, eta: float, num_steps: int, window_start: int | None = None) -> np.ndarray:
    """The (num_steps,) noise levels of a rollout: eta on the stochastic steps, 0 on the
    deterministic last step (``sample.deterministic_last_step``) and, for training rollouts
    (``window_start`` given), outside ``sample.sde_window`` = (window_start, size)."""
    s = self.c.sample
    levels = np.full((num_steps,), eta, np.float32)
    if s.deterministic_last_step:
      levels[-1] = 0.0
    size = int(s.sde_window[1])
    if window_start is not None and size > 0:
      inside = np.zeros(num_steps, bool)
      inside[window_start:window_start + size] = True
      levels[~inside] = 0.0
    return levels

  def window_start(self, rng: jax.Array) -> int:
    """The training rollout's window start: fixed, or uniform over the valid starts (-1),
    drawn with the batch's key ``rng``."""
    s = self.c.sample
    start, size = (int(v) for v in s.sde_window)
    if start >= 0:
      return start
    last = s.num_steps - int(bool(s.deterministic_last_step))
    return int(jax.random.randint(jax.random.fold_in(rng, 1), (), 0, last - size + 1))

  def sample(self, params, prompts, rng, *, num_steps=None, guidance=None, eta=None,
             levels=None):
    """Rollouts for a list of prompts: (SampleOutput, images in [0, 1], cond, uncond).
    ``levels`` (num_steps,) overrides the per-step noise levels; else ``self.levels(eta)``
    (eta default sample.eta): every step stochastic but a deterministic last one, no window."""
    s = self.c.sample
    num_steps = num_steps or s.num_steps
    guidance = s.guidance_scale if guidance is None else guidance
    if levels is None:
      levels = self.levels(s.eta if eta is None else eta, num_steps)
    cond = self.bb.encode(prompts)
    uncond = self.bb.negative(1) if guidance != 1.0 else None
    k_noise, k_steps = jax.random.split(rng)
    x_init = jax.random.normal(k_noise, self.bb.latent_shape(len(prompts)), jnp.float32)
    x_init = jax.device_put(x_init, mesh_lib.batch_sharding(self.mesh, x_init.ndim, self.rules,
                                                            x_init.shape[0]))
    traj, images = self._sample(params, self.bb.frozen(), cond, uncond, x_init, k_steps,
                                jnp.float32(guidance), jnp.asarray(levels, jnp.float32),
                                num_steps=num_steps)
    return traj, images, cond, uncond

  # ------------------------------------------------------------------------------ training

  def _default_levels(self, n: int) -> np.ndarray:
    """Training levels of a fixed window (for callers that pass no per-sample levels)."""
    start = int(self.c.sample.sde_window[0])
    return self.levels(self.c.sample.eta, n, max(start, 0))

  def _prepare_impl(self, rng, data):
    """Lays the epoch out as (num_updates, grad_accum, train.batch_size, num_train_t, ...).

    Samples are shuffled into micro-batches of train.batch_size (within each sampling batch when
    the SDE window is placed at random per batch, so a micro-batch shares its window); each
    micro-batch draws num_train_t distinct steps among its stochastic ones (all its samples train
    the same steps). ``data`` may carry per-sample ``levels`` and ``stochastic`` (N, steps);
    without them the fixed-window training levels apply."""
    c = self.c
    n, steps = data["log_probs"].shape
    k = self.num_train_t
    b, acc = c.train.batch_size, c.train.grad_accum
    levels = data.get("levels")
    if levels is None:
      levels = jnp.broadcast_to(jnp.asarray(self._default_levels(steps)), (n, steps))
    stoch = data.get("stochastic")
    stoch = (levels > 0) if stoch is None else (stoch & (levels > 0))
    group = c.sample.batch_size if int(c.sample.sde_window[0]) == -1 else n
    k_perm, k_mb, k_t = jax.random.split(rng, 3)
    within = jax.vmap(lambda key: jax.random.permutation(key, group))(
        jax.random.split(k_perm, n // group)) + (jnp.arange(n // group) * group)[:, None]
    mb = within.reshape(-1, b)                                            # (M, b) micro-batches
    mb = mb[jax.random.permutation(k_mb, mb.shape[0])]
    perm = mb.reshape(-1)
    # k distinct stochastic steps per micro-batch (deterministic ones sort last)
    u = jax.random.uniform(k_t, (mb.shape[0], steps))
    tsel = jnp.argsort(jnp.where(stoch[mb[:, 0]], u, 1.0 + u), axis=1)[:, :k]  # (M, k)
    tsel = jnp.repeat(tsel, b, axis=0)                                    # (n, k)
    lat = data["latents"][perm]                                           # (n, steps+1, ...)
    rows = jnp.arange(n)[:, None]
    out = {
        "x_t": lat[rows, tsel], "x_next": lat[rows, tsel + 1],
        "t": data["timesteps"][tsel], "t_next": data["next_timesteps"][tsel],
        "logp_old": data["log_probs"][perm][rows, tsel],
        "level": levels[perm][rows, tsel], "step": tsel.astype(jnp.int32),
        "adv": data["advantages"][perm], "rewards": data["rewards"][perm],
        "x0": data["latents"][perm, -1],
        "cond": jax.tree.map(lambda x: x[perm], data["cond"]),
    }
    shaped = jax.tree.map(lambda x: x.reshape((n // (b * acc), acc, b) + x.shape[1:]), out)
    spec = mesh_lib.logical_to_spec((None, None, "batch"), self.rules, self.mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, P(*spec, *([None] * (x.ndim - len(spec)))))), shaped)

  def _ppo_loss(self, params, micro, slots, uncond, ref_params, guidance):
    """PPO loss of the micro-batch's slots ``slots`` (an int or a tuple of static slot
    indices; slot j = one trajectory step shared by the micro-batch), summed over the slots:
    L = sum_j (L_j + kl_beta KL_j), assembled with its metrics by ``ddpo_loss.ppo_kl_loss``
    (docs/methods.md §1.2, §1.3); this method makes the network calls (the step's log-prob and
    mean under ``params``, the reference's mean) and masks the pairs whose step std is 0. The
    (sample, slot) pairs go through the network as ONE batch of B x len(slots) inputs
    (flattened sample-major, per-pair timesteps; CFG doubles it inside ``denoise``), so the
    gradient of L is sum_j grad L_j in one forward-backward. Metrics are sums over the slots,
    with per-step diagnostics (``*_steps``: (num_steps,) vectors, divided by the update)."""
    d, s = self.c.ddpo, self.c.sample
    slots = (slots,) if isinstance(slots, int) else tuple(slots)
    kc = len(slots)
    lo = slots[0]
    contiguous = slots == tuple(range(lo, lo + kc))
    pick = lambda x: x[:, lo:lo + kc] if contiguous else x[:, list(slots)]   # (B, kc, ...)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])                    # (B * kc, ...)
    x_t, x_next = flat(pick(micro["x_t"])), flat(pick(micro["x_next"]))
    t, t_next = flat(pick(micro["t"])), flat(pick(micro["t_next"]))
    level = flat(pick(micro["level"]))
    b = micro["adv"].shape[0]
    cond = jax.tree.map(lambda x: jnp.repeat(x, kc, axis=0), micro["cond"])
    unc = None if uncond is None else jax.tree.map(
        lambda u: jnp.broadcast_to(u, (x_t.shape[0],) + u.shape[1:]), uncond)
    model = self.net.bind(params)
    out = self.bb.denoise(model, x_t, t, cond, unc, guidance)
    logp, mean, std = self.bb.log_prob(out, x_t, x_next, t, t_next, eta=level,
                                       sde_type=s.sde_type)
    per_slot = lambda x: x.reshape((b, kc) + x.shape[1:])              # (B, kc, ...)
    live = jnp.broadcast_to(jnp.asarray(std, jnp.float32), logp.shape) > ddim.LOG_STD_FLOOR
    kl = {}
    if ref_params is not None:
      ref_out = self.bb.denoise(self.net.bind(ref_params), x_t, t, cond, unc, guidance)
      _, ref_mean, _ = self.bb.log_prob(ref_out, x_t, x_next, t, t_next, eta=level,
                                        sde_type=s.sde_type)
      scale = self.bb.kl_std(t, t_next, eta=level, sde_type=s.sde_type)
      kl = {"mean": per_slot(mean), "mean_ref": per_slot(ref_mean),
            "kl_scale": per_slot(jnp.broadcast_to(scale, logp.shape))}
    # slot j's trajectory step is shared by the micro-batch: the first sample's
    return ddpo_loss.ppo_kl_loss(per_slot(logp), pick(micro["logp_old"]), micro["adv"],
                                 per_slot(live), pick(micro["step"])[0],
                                 num_steps=s.num_steps, clip_range=d.clip_range,
                                 adv_clip_max=d.adv_clip_max, kl_beta=d.kl_beta, **kl)

  def _rwr_loss(self, params, micro, rng):
    """Reward-weighted denoising loss on the final samples (eps-space MSE per sample), weighted
    by the normalised advantages (``losses.ddpo.rwr_weights``). It trains the conditional
    output, not the CFG-guided one the sampler consumes: on the toy default the guided variant
    fell faster (held-out detector 0.015 +- 0.002 against 0.031 +- 0.005 over 3 seeds,
    ``docs/seeded/rwr_cfg.md``)."""
    d = self.c.ddpo
    model = self.net.bind(params)
    x0 = micro["x0"]
    x_t, t, target = self.bb.training_pair(rng, x0)
    out = self.bb.denoise(model, x_t, t, micro["cond"], None, 1.0)
    per = jnp.mean((out.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, x0.ndim)))
    loss = ddpo_loss.rwr_loss(per, micro["adv"], mode=d.rwr_mode,
                              temperature=d.rwr_temperature, percentile=d.rwr_percentile)
    return loss, {"loss": loss}

  def steps_per_call(self) -> int:
    """Trained steps per network call (``ddpo.steps_per_call``; 0 = all k of them)."""
    spc = int(self.c.ddpo.steps_per_call)
    return self.num_train_t if spc <= 0 else spc

  def _grads(self, params, batch, uncond, ref_params, guidance, rng):
    """(gradient, metrics) of one optimizer step from (grad_accum, B, k, ...) data: the
    gradient averaged over the grad_accum x k (micro-batch, step slot) PPO losses,
        g = 1 / (grad_accum k) sum_a sum_j grad L_{a, j},
    computed by grad_accum x (k / ddpo.steps_per_call) forward-backward calls, each over
    B x steps_per_call (sample, step) pairs (one call per step by default), summed by
    ``common.accumulate`` (a rolled loop: one call compiled, one call's activations live).
    With one step per call the per-step gradient norms (``grad_norm_steps``) are measured and
    ``ddpo.step_grad_clip`` clips each step's gradient before the sum."""
    acc = batch["adv"].shape[0]
    rwr = self.c.ddpo.objective == "rwr"
    k = 1 if rwr else self.num_train_t
    kc = 1 if rwr else self.steps_per_call()
    chunks = k // kc
    per_step = not rwr and kc == 1
    guidance = guidance if self.c.train.cfg else jnp.float32(1.0)
    unc = uncond if self.c.train.cfg else None

    def grad_fn(micro, c, key):
      if rwr:
        fn = lambda p: self._rwr_loss(p, micro, key)
        (_, m), g = jax.value_and_grad(fn, has_aux=True)(params)
        return g, m
      # slots of chunk c: the traced chunk index of the rolled loop picks them (dynamic
      # slices); one chunk (the default) takes them all statically
      if chunks == 1:
        sub = micro
      else:
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, c * kc, kc, axis=1)
        sub = {**micro, **{n: take(micro[n]) for n in
                           ("x_t", "x_next", "t", "t_next", "logp_old", "level", "step")}}
      fn = lambda p: self._ppo_loss(p, sub, tuple(range(kc)), unc, ref_params, guidance)
      (_, m), g = jax.value_and_grad(fn, has_aux=True)(params)
      if per_step:  # this call's gradient is one trajectory step's: its norm, and the clip
        m = {**m, "grad_norm_steps": m["steps_count"] * optax.global_norm(g)}
        g = clip_step_grad(g, self.c.ddpo.step_grad_clip)
      return g, m

    def grad_at(idx):
      a, c = idx // chunks, idx % chunks
      micro = jax.tree.map(lambda x: x[a], batch)
      return grad_fn(micro, c, jax.random.fold_in(rng, idx))

    grads, msum = common.accumulate(grad_at, acc * chunks)
    grads = jax.tree.map(lambda g: g / (acc * k), grads)
    metrics = {k_: v / (acc * k) for k_, v in msum.items()}
    return grads, metrics

  def _update_impl(self, state, batch, uncond, ref_params, guidance, rng):
    """One optimizer step (``_grads``) through ``common.guarded_apply``."""
    params = state["params"]["policy"]
    grads, metrics = self._grads(params, batch, uncond, ref_params, guidance, rng)
    new_params, opt, guard = common.guarded_apply(self.tx, grads, state["opt"]["policy"], params,
                                                  metrics["loss"])
    metrics.update(guard)
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
        self.guard.observe(m["nonfinite"])
        metrics.append(m)
    self.guard.flush()
    out = epoch_metrics(metrics)
    out["nonfinite"] = float(sum(float(m["nonfinite"]) for m in metrics))  # skipped steps
    return state, out

  def rollout(self, state, prompts, rng):
    """Samples ``prompts`` with the policy (its stochastic steps at the training levels, the
    SDE window placed by ``window_start``); the state is unchanged."""
    c = self.c
    levels = self.levels(c.sample.eta, c.sample.num_steps, self.window_start(rng))
    traj, images, cond, uncond = self.sample(self.policy_params(state), prompts, rng,
                                             levels=levels)
    nb = len(prompts)
    return state, images, {
        "latents": jnp.swapaxes(traj.latents, 0, 1),
        "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond, "uncond": uncond,
        "levels": jnp.broadcast_to(traj.levels, (nb,) + traj.levels.shape),
        "stochastic": jnp.broadcast_to(traj.stochastic, (nb,) + traj.stochastic.shape),
        "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps}

  def update(self, state, batches, prompts, rewards, rng):
    """Advantages of the epoch's rewards (``ddpo.advantage``), then ``train_on``."""
    adv = self.normalizer(prompts, rewards)
    cat = lambda key: jnp.concatenate([p[key] for p in batches])
    data = {
        "latents": cat("latents"), "log_probs": cat("log_probs"), "levels": cat("levels"),
        "stochastic": cat("stochastic"),
        "cond": jax.tree.map(lambda *x: jnp.concatenate(x), *[p["cond"] for p in batches]),
        "timesteps": batches[-1]["timesteps"], "next_timesteps": batches[-1]["next_timesteps"],
        "advantages": jnp.asarray(adv), "rewards": jnp.asarray(rewards, jnp.float32),
    }
    return self.train_on(state, data, batches[-1]["uncond"], rng)
