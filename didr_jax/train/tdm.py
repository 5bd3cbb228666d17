"""The TDM trainer: a K-step deterministic student distilled from the frozen teacher by
Trajectory Distribution Matching (docs/methods.md §4, step 1 and the t_KL term of step 3),
for both backbone families. TDM-R1 (``train/tdm_r1.py``) extends it.

The maths lives in ``didr_jax.losses.tdm``; this file moves data.

**Student grid** (``StudentGrid``), K + 1 boundary times t_0 > ... > t_K:
- VP: DDIM's K-step grid of the scheduler (``schedules.ddim_timesteps``: t_j and t_{j+1} =
  prev_j; the last prev is negative, i.e. the final alpha_cumprod, 1 with set_alpha_to_one);
- flow: sig_j = shift u_j / (1 + (shift - 1) u_j), u = linspace(1, 1/K, K), then sig_K = 0
  (``tdm.shift``, 3 as the authors' 4-step solver).
**Student step** ``losses.tdm.student_step``: (x0_hat, eps_hat) from the output at (x_j, t_j),
x_{j+1} = alpha_{j+1} x0_hat + sigma_{j+1} eps_hat (DDIM eta 0 / flow Euler, no x0 clipping);
sampling (training rollouts and evaluation) is that step K times from x_0 ~ N(0, I), one scan
(``ddim.run_sampler``), optionally with CFG ``tdm.student_cfg`` (default 1: none).

**Per iteration** (``sample.num_batches`` per epoch, RNG from (seed, epoch, iteration)):
  1. draw ``sample.batch_size`` prompts (``sample.group_size`` rollouts each) and roll the
     student out, storing every boundary state x_0 .. x_K (``latents``); the decoded x_K go to
     the host rewarder (logged as ``reward_mean``; TDM-R1 waits for them: its advantages);
  2. for each of ``tdm.boundaries_per_iter`` = M boundary indices j (drawn uniformly without
     replacement from {0, ..., K-1}), in this fixed order:
     a. fake step: the current student's step at the stored x_j gives (x0_hat, x_{j+1});
        tau ~ (t_{j+1}, tau_max T) (``losses.tdm.sample_tau``; VP integer, flow sigma >= 1e-3),
        x_tau = ``kernels.renoise``(x_{j+1}) with fresh eps, target whose clean estimate is
        x0_hat (``losses.tdm.renoised_target``); ``losses.tdm.fake_score_loss`` against the
        frozen teacher's conditional output; one AdamW step (``common.guarded_apply``);
     b. (TDM-R1 only: the surrogate's DGPO step, ``train/tdm_r1.py``);
     c. generator step: the live student step at x_j gives x0_hat (with gradient) and
        sg(x_{j+1}); x_tau as in (a) with fresh tau, eps; the teacher (CFG ``tdm.ref_cfg``) and
        the fake score at x_tau give x0_ref^CFG and x0_fake; ``losses.tdm.dm_loss``
        (gradient (x0_fake - x0_ref^CFG) / (mean|x0_hat - x0_ref^CFG| B)); one AdamW step;
        then the generator EMA (``tdm.ema_decay``; 0 = none).
The student's stored states are the iteration's rollout (boundaries later in the order see
states of the student before this iteration's earlier updates).

State (a pytree, all of it checkpointed):
    {"step", "params": {"generator", "fake"[, "surrogate"]}, "opt": {same keys},
     ["ema": {["generator"] (float32, when ema_decay > 0)[, "old"] (float32, TDM-R1)}]}
("ema" only when it holds something)
The frozen teacher (the loaded pipeline's model) stays in the trainer; the fake score (and
TDM-R1's surrogate) start from it, the student from ``tdm.generator_path`` or from it too.
Host state: the non-finite step counter only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import ddim, guidance, param
from didr_jax.diffusion.schedules import ddim_timesteps
from didr_jax.losses import common as loss_common, tdm as tdm_losses
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.train import common, one_step, optim
from didr_jax.train.logging import log_compiles
from didr_jax.train.tdm_config import networks, validate_tdm_section
from didr_jax.train.trainer import Trainer

FLOW_TAU_FLOOR = 1e-3   # smallest flow re-noising sigma (the target divides by it)


@dataclasses.dataclass(frozen=True)
class StudentGrid:
  """The K + 1 boundary times of the student (``times[j]``: VP int timestep, negative for the
  final clean state; flow sigma) and the family's re-noising time range."""
  times: np.ndarray
  integer: bool
  horizon: int            # VP: num_train_timesteps T; flow: 0 (unused)

  @classmethod
  def of(cls, backbone, num_steps: int, shift: float) -> "StudentGrid":
    if backbone.family == "vp":
      ts, prevs = ddim_timesteps(backbone.schedule, num_steps)
      return cls(np.concatenate([ts, prevs[-1:]]).astype(np.int32), True,
                 int(backbone.schedule.num_train_timesteps))
    u = np.linspace(1.0, 1.0 / num_steps, num_steps)
    sig = shift * u / (1.0 + (shift - 1.0) * u)
    return cls(np.concatenate([sig, [0.0]]).astype(np.float32), False, 0)

  @property
  def num_steps(self) -> int:
    return len(self.times) - 1

  def tau_range(self, lo, fraction_lo: float = 0.0, tau_max: float = 1.0):
    """(lo, hi) of a re-noising time above the boundary time ``lo`` (traced) and above the
    fraction ``fraction_lo`` of the process: VP integers in [max(lo, 0, int(f T)),
    min(int(tau_max T), T - 1)]; flow sigmas in [max(lo, f, FLOW_TAU_FLOOR), tau_max)."""
    if self.integer:
      hi = min(int(tau_max * self.horizon), self.horizon - 1)
      lo = jnp.maximum(jnp.asarray(lo, jnp.int32), int(fraction_lo * self.horizon))
      return jnp.clip(lo, 0, hi), hi
    lo = jnp.maximum(jnp.asarray(lo, jnp.float32), max(fraction_lo, FLOW_TAU_FLOOR))
    return jnp.minimum(lo, tau_max), tau_max


class TDMTrainer(Trainer):
  """Holds static things (graph, optimizers, teacher, grid, compiled functions); the state is a
  pytree (module docstring)."""

  R1 = False

  def __init__(self, config, backbone, mesh):
    c = self.c = config
    d = c.tdm
    self.bb, self.mesh = backbone, mesh
    self.rules = tuple(c.mesh.rules) + mesh_lib.DEFAULT_RULES
    self.sections = validate_tdm_section(d)
    self.net = common.Net.of(backbone.model, lora=c.lora, mesh=mesh,
                              rules=self.rules)
    self.ref_params = self.net.take_params()      # the frozen teacher, never donated
    self.grid = StudentGrid.of(backbone, int(d.num_steps), float(d.shift))
    self.ptype = backbone.prediction_type
    # A VP scheduler with clip_sample clips the student's x0_hat as its DDIM sampler does.
    self.clip_range = one_step.clip_range(backbone)
    self.tx = {n: optim.for_network(c.train, d, n) for n in networks(d)}
    self.guard = common.NonFiniteGuard(c.train.max_consecutive_nonfinite)
    self._negatives: dict[int, Any] = {}
    # Net.jit: the frozen rest (a LoRA run's base weights) is an argument, not a constant
    self._rollout = self._jit("the student rollout", self._rollout_impl)
    self._fake_update = self._jit("the fake-score update", self._fake_update_impl,
                                  donate_argnums=(0,))
    self._gen_update = self._jit("the generator update", self._gen_update_impl,
                                 donate_argnums=(0,))

  def _jit(self, name: str, fn, **kw):
    """``fn`` jitted with the network's frozen rest as an argument, its compiles logged."""
    return log_compiles(name, self.net.jit(fn, **kw))

  # ------------------------------------------------------------------------------ state

  def _copy(self, tree, dtype=None):
    return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), tree)

  def init_state(self) -> dict:
    """Student (``tdm.generator_path`` or a copy of the teacher), fake score (and TDM-R1's
    surrogate and its float32 EMA "old" copy) from the teacher, optimizer states, the
    generator EMA (float32, when ``tdm.ema_decay`` > 0) and the step."""
    d = self.c.tdm
    if d.generator_path:
      dtype = jnp.bfloat16 if self.c.backbone.dtype == "bfloat16" else jnp.float32
      gen = one_step.load_generator(d.generator_path, self.bb, self.ref_params, dtype=dtype,
                                    mesh=self.mesh, rules=self.rules,
                                    remat=self.c.backbone.remat,
                                    key="config.tdm.generator_path")
    else:
      gen = self._copy(self.ref_params)
    params = {"generator": gen, "fake": self._copy(self.ref_params)}
    ema = {}
    if float(d.ema_decay) > 0:
      ema["generator"] = self._copy(gen, jnp.float32)
    if self.R1:
      params["surrogate"] = self._copy(self.ref_params)
      ema["old"] = self._copy(self.ref_params, jnp.float32)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt": {k: self.tx[k].init(v) for k, v in params.items()}}
    if ema:                                       # no empty subtree in the checkpoints
      state["ema"] = ema
    return common.on_mesh(state, self.mesh)

  def policy_params(self, state) -> Any:
    """The generator EMA in the generator's dtypes (the raw generator when ema_decay = 0)."""
    gen = state["params"]["generator"]
    if "generator" not in state.get("ema", {}):
      return gen
    return common.ema_as(state["ema"]["generator"], gen)

  def fixed_sampler(self) -> dict:
    """How the student samples (what an export states): deterministic steps on its time grid
    (K + 1 boundary times) at its own guidance, the flow grid shifted by ``tdm.shift``."""
    d = self.c.tdm
    return {"kind": "few_step", "times": self.grid.times, "guidance": float(d.student_cfg),
            "shift": float(d.shift)}

  # ------------------------------------------------------------------------------ pieces

  def _shard(self, tree, batch: int):
    """Lays leaves with a leading batch axis out along the mesh's batch axes."""
    return mesh_lib.shard_batch(tree, batch, self.mesh, self.rules)

  def negative(self, batch: int):
    """The unconditional conditioning for ``batch`` samples (encoded once per batch size)."""
    if batch not in self._negatives:
      self._negatives[batch] = self._shard(self.bb.negative(batch), batch)
    return self._negatives[batch]

  def _times(self, t, batch: int) -> jax.Array:
    dt = jnp.int32 if self.grid.integer else jnp.float32
    return jnp.broadcast_to(jnp.asarray(t, dt), (batch,))

  def _alpha_sigma(self, t):
    a, s = self.bb.alpha_sigma(t)
    return jnp.asarray(a, jnp.float32), jnp.asarray(s, jnp.float32)

  def _out(self, params, x, t, cond, uncond=None, scale=1.0) -> jax.Array:
    """The network's output (float32) at (x, t) for ``cond`` (CFG ``scale`` with ``uncond``)."""
    model = self.net.bind(params)
    out = self.bb.denoise(model, x, self._times(t, x.shape[0]), cond, uncond, scale)
    return out.astype(jnp.float32)

  def _x0(self, out, x_t, t) -> jax.Array:
    return param.to_x0(out, x_t, *self._alpha_sigma(t), self.ptype)

  def _student_step(self, params, x, j, cond, uncond):
    """(x_{j+1}, x0_hat) of the student's deterministic step at boundary j (traced), with CFG
    ``tdm.student_cfg`` (``uncond`` unused at 1)."""
    times = jnp.asarray(self.grid.times)
    t, t_next = times[j], times[j + 1]
    scale = float(self.c.tdm.student_cfg)
    out = self._out(params, x, t, cond, uncond if scale != 1.0 else None, scale)
    x_next, x0_hat, _ = tdm_losses.student_step(out, x, *self._alpha_sigma(t),
                                                *self._alpha_sigma(t_next), self.ptype,
                                                self.clip_range)
    return x_next, x0_hat

  def _renoise(self, rng, x_next, x0_hat, j, fraction_lo: float = 0.0):
    """(x_tau, target, tau): tau between t_{j+1} and tau_max T, x_tau = q(x_tau | x_{j+1})
    with fresh eps, target = the output whose clean estimate at x_tau is x0_hat."""
    k_t, k_e = jax.random.split(rng)
    lo, hi = self.grid.tau_range(jnp.asarray(self.grid.times)[j + 1], fraction_lo,
                                 float(self.c.tdm.tau_max))
    tau = tdm_losses.sample_tau(k_t, (x_next.shape[0],), lo, hi, integer=self.grid.integer)
    eps = jax.random.normal(k_e, x_next.shape, jnp.float32)
    x_tau, target = tdm_losses.renoised_target(
        x_next, x0_hat, eps, *self._alpha_sigma(jnp.asarray(self.grid.times)[j + 1]),
        *self._alpha_sigma(tau), self.ptype)
    return x_tau, target, tau

  # ------------------------------------------------------------------------------ sampling

  def _rollout_impl(self, params, frozen, cond, uncond, x_init, student_cfg):
    """The K-step deterministic rollout: (SampleOutput with the K + 1 boundary states in
    ``latents`` and the grid times in ``timesteps`` / ``next_timesteps``, decoded x_K)."""
    times = jnp.asarray(self.grid.times)
    alphas, sigmas = self._alpha_sigma(times)
    model_out = lambda x, t: self._out(params, x, t, cond, uncond, student_cfg)
    idx = jnp.arange(self.grid.num_steps, dtype=jnp.int32)

    def step(out, x, j, j_next, level, z):
      del level, z
      x_next, _, _ = tdm_losses.student_step(out, x, alphas[j], sigmas[j], alphas[j_next],
                                             sigmas[j_next], self.ptype, self.clip_range)
      return x_next, jnp.zeros(x.shape[:1], jnp.float32), 0.0

    traj = ddim.run_sampler(step, lambda x, j: model_out(x, times[j[0]]), x_init, idx, idx + 1,
                            levels=0.0, rng=None, noise=None, return_outputs=False)
    traj = traj._replace(timesteps=times[:-1], next_timesteps=times[1:])
    return traj, self.bb.decode(frozen, traj.sample)

  def student_rollout(self, params, cond, rng):
    """Student rollouts from x_0 ~ N(0, I) (``rng``) for a batch of conditionings."""
    b = jax.tree.leaves(cond)[0].shape[0]
    x_init = self._shard(jax.random.normal(rng, self.bb.latent_shape(b), jnp.float32), b)
    scale = float(self.c.tdm.student_cfg)
    uncond = self.negative(b) if scale != 1.0 else None
    return self._rollout(params, self.bb.frozen(), cond, uncond, x_init, jnp.float32(scale))

  def sample(self, params, prompts, rng):
    """(SampleOutput, images (B, H, W, 3) in [0, 1], cond, None): the K-step deterministic
    student at guidance ``tdm.student_cfg``."""
    b = len(prompts)
    cond = self._shard(self.bb.encode(list(prompts)), b)
    traj, images = self.student_rollout(params, cond, rng)
    return traj, images, cond, None

  # ------------------------------------------------------------------------------ updates

  def _fake_update_impl(self, state, ref_params, latents, cond, uncond, j, rng):
    """TDM's fake-score step at boundary j (module docstring, 2a)."""
    d = self.c.tdm
    x_next, x0_hat = jax.lax.stop_gradient(self._student_step(
        state["params"]["generator"], latents[j], j, cond, uncond))
    x_tau, _, tau = self._renoise(rng, x_next, x0_hat, j)
    out_ref = self._out(ref_params, x_tau, tau, cond)
    a_tau, s_tau = self._alpha_sigma(tau)
    fake = state["params"]["fake"]

    def loss_fn(p):
      return tdm_losses.fake_score_loss(self._out(p, x_tau, tau, cond), out_ref, x_tau, x0_hat,
                                        a_tau, s_tau, self.ptype,
                                        ref_weight=float(d.fake_ref_weight))

    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(fake)
    new, opt, am = common.guarded_apply(self.tx["fake"], grads, state["opt"]["fake"], fake, loss)
    state = {**state, "params": {**state["params"], "fake": new},
             "opt": {**state["opt"], "fake": opt}}
    return state, {**m, "fake_loss": loss, "fake_grad_norm": am["grad_norm"],
                   "fake_nonfinite": am["nonfinite"]}

  def _generator_targets(self, state, ref_params, x_tau, tau, cond, uncond, x0_hat, scales,
                         renoise=None):
    """(loss, metrics) of the generator at x_tau given the live x0_hat: TDM's DM loss.
    ``renoise`` = (rng, sg x_{j+1}, sg x0_hat, j) for a method that re-noises again (TDM-R1's
    reward term); TDM does not."""
    del renoise
    x0 = lambda out: self._x0(out, x_tau, tau)
    ref_cond = x0(self._out(ref_params, x_tau, tau, cond))
    ref_cfg = ref_cond
    if float(self.c.tdm.ref_cfg) != 1.0:
      ref_cfg = guidance.cfg(x0(self._out(ref_params, x_tau, tau, uncond)), ref_cond,
                             scales["ref_cfg"])
    x0_fake = x0(self._out(state["params"]["fake"], x_tau, tau, cond))
    loss, m = tdm_losses.dm_loss(x0_hat, jax.lax.stop_gradient(ref_cfg),
                                 jax.lax.stop_gradient(x0_fake), floor=float(self.c.tdm.dm_floor))
    return loss, m

  def _gen_update_impl(self, state, ref_params, latents, cond, uncond, j, rng, scales):
    """The generator step at boundary j (module docstring, 2c), then the generator EMA.
    ``scales`` holds the CFG scales as traced scalars (one program for any value)."""
    d = self.c.tdm
    gen = state["params"]["generator"]

    def loss_fn(p):
      x_next, x0_hat = self._student_step(p, latents[j], j, cond, uncond)
      x_next_sg, x0_sg = jax.lax.stop_gradient(x_next), jax.lax.stop_gradient(x0_hat)
      x_tau, _, tau = self._renoise(rng, x_next_sg, x0_sg, j)
      return self._generator_targets(state, ref_params, x_tau, tau, cond, uncond, x0_hat, scales,
                                     renoise=(jax.random.fold_in(rng, 1), x_next_sg, x0_sg, j))

    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen)
    new_gen, new_opt, am = common.guarded_apply(self.tx["generator"], grads,
                                                state["opt"]["generator"], gen, loss)
    state = {**state, "step": state["step"] + 1,
             "params": {**state["params"], "generator": new_gen},
             "opt": {**state["opt"], "generator": new_opt}}
    if "generator" in state.get("ema", {}):
      state["ema"] = {**state["ema"], "generator": loss_common.ema_update(
          state["ema"]["generator"], new_gen, float(d.ema_decay))}
    return state, {**m, "generator_loss": loss, "generator_grad_norm": am["grad_norm"],
                   "nonfinite": am["nonfinite"]}

  def scales(self) -> dict:
    """The CFG scales the generator step reads, as float32 scalars (traced arguments)."""
    return {"ref_cfg": jnp.float32(self.c.tdm.ref_cfg)}

  # ------------------------------------------------------------------------------ iteration

  def boundaries(self, rng) -> list[int]:
    """M boundary indices, uniform without replacement from {0, ..., K-1}."""
    k = self.grid.num_steps
    perm = np.asarray(jax.random.permutation(rng, k))
    return [int(j) for j in perm[: int(self.c.tdm.boundaries_per_iter)]]

  def _before_boundaries(self, state, traj, rewards, rng):
    """TDM: nothing (its rewards are only logged). Returns (state, per-iteration context,
    metrics)."""
    del traj, rewards, rng
    return state, None, {}

  def _surrogate_phase(self, state, ctx, cond, rng):
    return state, {}

  # ------------------------------------------------------------------------------ phases

  updates_each_batch = True  # the boundary updates follow each rollout
  progress_keys = ("reward_mean", "generator_loss", "fake_loss", "surrogate_loss", "nonfinite")

  def epoch_keys(self, rng):
    """Each batch's key is folded from the epoch's key itself (no update key)."""
    return rng, rng

  def rollout(self, state, prompts, rng):
    """The student's rollouts of ``prompts`` (module docstring, step 1); the state is unchanged
    until ``after_rollout``."""
    b = len(prompts)
    k_roll, k_j, k_upd = jax.random.split(rng, 3)
    cond = self._shard(self.bb.encode(list(prompts)), b)
    traj, images = self.student_rollout(state["params"]["generator"], cond, k_roll)
    return state, images, {"traj": traj, "cond": cond, "k_j": k_j, "k_upd": k_upd}

  def after_rollout(self, state, data, rewards):
    """Per boundary the fake, (surrogate,) generator steps (module docstring, step 2) ->
    (state, metrics (device scalars))."""
    traj, cond, k_upd = data["traj"], data["cond"], data["k_upd"]
    uncond = self.negative(jax.tree.leaves(cond)[0].shape[0])
    state, ctx, pre = self._before_boundaries(state, traj, rewards, k_upd)
    ms, flags = [], []
    scales = self.scales()
    for i, j in enumerate(self.boundaries(data["k_j"])):
      k_f, k_s, k_g = jax.random.split(jax.random.fold_in(k_upd, i), 3)
      jj = jnp.int32(j)
      state, fm = self._fake_update(state, self.ref_params, traj.latents, cond, uncond, jj, k_f)
      state, sm = self._surrogate_phase(state, ctx, cond, k_s)
      state, gm = self._gen_update(state, self.ref_params, traj.latents, cond, uncond, jj, k_g,
                                   scales)
      flags += [fm.pop("fake_nonfinite"), sm.pop("surrogate_nonfinite", 0.0), gm["nonfinite"]]
      ms.append({**fm, **sm, **gm})
    m = {k: sum(x[k] for x in ms) / len(ms) for k in ms[0]}
    m["nonfinite"] = jnp.max(jnp.stack([jnp.asarray(f, jnp.float32) for f in flags]))
    self.guard.observe(m["nonfinite"])
    return state, {**pre, **m}

  def train_step(self, state, prompts, rng, rewarder=None):
    """One iteration on ``prompts`` outside the loop (the pretraining stage, benchmarks):
    ``rollout`` and ``after_rollout``, the rewards from ``rewarder`` (None: not scored; TDM-R1
    needs one). Returns (state, metrics (device scalars), images, futures of rewards)."""
    state, images, data = self.rollout(state, prompts, rng)
    future = None if rewarder is None else rewarder.submit(common.host_rows(images), prompts)
    state, metrics = self.after_rollout(state, data, future)
    return state, metrics, images, [] if future is None else [future]

  def update(self, state, batches, prompts, rewards, rng):
    """The iterations' metrics averaged (skipped steps summed); the rewards are only logged
    (TDM) or were used in ``after_rollout`` (TDM-R1)."""
    state, out = super().update(state, batches, prompts, rewards, rng)
    out["nonfinite"] = float(sum(float(m["nonfinite"]) for m in batches))
    return state, out
