"""Pieces every method's loss shares (docs/methods.md §5), as pure jit-able functions.

- Per-prompt (group) statistics with segment sums over prompt ids.
- EMA snapshot decay schedules and updates (``SnapshotSchedule`` keeps one schedule's numbers).
- The stop-gradient-target loss and the mean-abs normaliser of distribution-matching methods.
- Denoising score matching (the fake-score / surrogate / RWR regression) in any parameterisation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from didr_jax.diffusion import param


def segment_mean(x: jax.Array, ids: jax.Array, num_segments: int) -> jax.Array:
  """Mean of ``x`` (B,) within each segment id in [0, num_segments), broadcast back to (B,)."""
  s = jax.ops.segment_sum(x, ids, num_segments)
  n = jax.ops.segment_sum(jnp.ones_like(x), ids, num_segments)
  return (s / jnp.maximum(n, 1))[ids]


def group_advantages(rewards: jax.Array, ids: jax.Array, num_groups: int, *,
                     std: str = "global", eps: float = 1e-4, clip: float | None = None) -> jax.Array:
  """A_i = (R_i - mean_{g(i)} R) / (std + eps).

  ``std="global"`` divides by the std of the whole batch (Flow-GRPO, CRD, TDM-R1),
  ``std="group"`` by each group's own std. ``clip`` clips A to [-clip, clip].
  """
  centered = rewards - segment_mean(rewards, ids, num_groups)
  if std == "global":
    scale = jnp.std(rewards)
  elif std == "group":
    scale = jnp.sqrt(segment_mean(centered ** 2, ids, num_groups))
  else:
    raise ValueError(f"std must be 'global' or 'group', got {std!r}")
  adv = centered / (scale + eps)
  return adv if clip is None else jnp.clip(adv, -clip, clip)


def center_in_groups(x: jax.Array, ids: jax.Array, num_groups: int) -> jax.Array:
  """x_i - mean over the group of i (exact per-prompt means, not the minibatch mean)."""
  return x - segment_mean(x, ids, num_groups)


def ema_decay(step: jax.Array | int, *, start: float, slope: float, end: float,
              start_step: int = 0) -> jax.Array:
  """d(step) = start for step < start_step, else min(start + slope (step - start_step), end)."""
  step = jnp.asarray(step, jnp.float32)
  ramp = jnp.minimum(start + slope * (step - start_step), end)
  return jnp.where(step < start_step, start, ramp)


def ema_update(snapshot, params, decay: jax.Array | float):
  """snapshot <- d snapshot + (1 - d) params, leaf-wise in the snapshot's dtype."""
  return jax.tree.map(lambda s, p: (decay * s + (1.0 - decay) * p).astype(s.dtype),
                      snapshot, params)


def mean_abs(x: jax.Array) -> jax.Array:
  """Per-sample mean |x| over non-batch dims, shaped to broadcast against x."""
  return jnp.mean(jnp.abs(x), axis=tuple(range(1, x.ndim)), keepdims=True)


def stop_gradient_target_loss(x: jax.Array, grad: jax.Array) -> jax.Array:
  """0.5 * ||x - sg(x - g)||^2 summed per sample, averaged over the batch.

  Its gradient with respect to x is exactly ``g`` (per sample), which is how a score-difference
  direction is pushed through a generator with ordinary autodiff.
  """
  target = jax.lax.stop_gradient(x - grad)
  per = 0.5 * jnp.sum((x - target) ** 2, axis=tuple(range(1, x.ndim)))
  return jnp.mean(per)


def dsm_per_sample(output: jax.Array, x0: jax.Array, eps: jax.Array, alpha, sigma,
                   prediction_type: str) -> jax.Array:
  """Denoising score matching per sample: mean over non-batch dims of
  (output - target)^2 in float32 (float64 kept), target =
  ``param.x0_eps_to_output(x0, eps, alpha, sigma)``
  (eps | alpha eps - sigma x0 | x0 | eps - x0) for x_t = alpha x0 + sigma eps.

  Minimised over the network, output(x_t) -> E[target | x_t], i.e. the score of the noised data
  (Vincent 2011): every fake score (DIDR, TDM), surrogate (TDM-R1) and RWR regression uses it.
  """
  dt = compute_dtype(output)
  target = param.x0_eps_to_output(x0.astype(dt), eps.astype(dt), alpha, sigma, prediction_type)
  err = (output.astype(dt) - jax.lax.stop_gradient(target)) ** 2
  return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def dsm_loss(output: jax.Array, x0: jax.Array, eps: jax.Array, alpha, sigma,
             prediction_type: str, weight: jax.Array | None = None) -> jax.Array:
  """mean_i w_i * ``dsm_per_sample``_i (w = 1 when ``weight`` is None)."""
  per = dsm_per_sample(output, x0, eps, alpha, sigma, prediction_type)
  return jnp.mean(per if weight is None else per * weight)


# --- compute dtype and EMA snapshot schedules (shared by CRD, DIDR, TDM-R1) -----------------------

def compute_dtype(x: jax.Array):
  """The dtype losses are computed in: float32, or float64 when x already is (finite-difference
  tests run in float64; bfloat16 activations are upcast)."""
  return jnp.promote_types(x.dtype, jnp.float32)


@dataclasses.dataclass(frozen=True)
class SnapshotSchedule:
  """An EMA snapshot's decay schedule, ``ema_decay`` with its four numbers kept together:
  d(step) = start for step < start_step, else min(start + slope (step - start_step), end), and
  the update snapshot <- d snapshot + (1 - d) theta (``ema_update``).

  d = 0 copies theta, d = 1 freezes the snapshot. ``step`` is the caller's step counter at the
  update (CRD: optimizer steps, updated once per rollout epoch)."""
  start: float
  slope: float
  end: float
  start_step: int = 0

  def __post_init__(self):
    for name in ("start", "end"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: a decay must lie in [0, 1], got {v}")
    if self.slope < 0.0:
      raise ValueError(f"slope: must be >= 0, got {self.slope}")
    if self.start_step < 0:
      raise ValueError(f"start_step: must be >= 0, got {self.start_step}")

  @classmethod
  def of(cls, d) -> "SnapshotSchedule":
    """From a mapping (e.g. a ConfigDict section) with keys start, slope, end, start_step."""
    return cls(float(d["start"]), float(d["slope"]), float(d["end"]), int(d.get("start_step", 0)))

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def decay(self, step: jax.Array | int) -> jax.Array:
    return ema_decay(step, start=self.start, slope=self.slope, end=self.end,
                     start_step=self.start_step)

  def update(self, snapshot, params, step: jax.Array | int):
    """(new snapshot, decay used)."""
    d = self.decay(step)
    return ema_update(snapshot, params, d), d


# --- per-sample squared distance (TDM fake-score regulariser, TDM-R1 surrogate; CRD's KL anchor) --

def mean_sq_dist(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-sample mean over non-batch dims of (a - b)^2 (B,), in ``compute_dtype(a)``. b is used as
  given: wrap it in stop_gradient where it is a target."""
  dt = compute_dtype(a)
  d = a.astype(dt) - b.astype(dt)
  return jnp.mean(d ** 2, axis=tuple(range(1, d.ndim)))


# --- DMD normaliser of distribution-matching directions (DIDR / DI / DI++, TDM, TDM-R1) -----------

def dmd_normaliser(x0: jax.Array, x0_ref: jax.Array, floor: float = 1e-8) -> jax.Array:
  """n = sg(max(mean |x0 - x0_ref|, floor)) per sample, shaped to broadcast against x0, in
  ``compute_dtype(x0)``: DMD's per-sample normaliser of a direction in x0 units."""
  dt = compute_dtype(x0)
  x0, x0_ref = jax.lax.stop_gradient(x0), jax.lax.stop_gradient(x0_ref)
  return jnp.maximum(mean_abs(x0.astype(dt) - x0_ref.astype(dt)), floor)
