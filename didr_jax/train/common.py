"""Pieces every trainer shares: trainable networks as (graph, params), optimizers, rollouts.

Trainers keep parameters as pure dicts of arrays (what optax, Orbax and jit see) and bind them
to the static module graph inside jitted functions with ``Net.bind``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from didr_jax.errors import ConfigError
from didr_jax.models import layers
from didr_jax.models import lora as lora_lib


@dataclasses.dataclass
class Net:
  """A module split into its static graph, its params (pure dict) and its other state."""
  graphdef: Any
  params: Any
  rest: Any
  mesh: Any = None    # with rules: the batch sharding its blocks keep (layers.activation_sharding)
  rules: Any = None
  _traced_rest: list = dataclasses.field(default_factory=list, repr=False)

  @classmethod
  def of(cls, module: nnx.Module, *, trainable: Any = nnx.Param, lora: Any = None,
         mesh: Any = None, rules: Any = None) -> "Net":
    """Splits ``module`` into the ``trainable`` variables (``params``) and everything else.
    Functions jitted by ``Net.jit`` trace the module under ``layers.activation_sharding(mesh,
    rules)``: its blocks keep their hidden states batch-sharded over ``mesh``.

    ``lora``: a ``config.lora`` section. When enabled, LoRA adapters are injected into the
    module's target layers (in place, see ``didr_jax.models.lora``) and only they
    (``nnx.LoRAParam``) are trainable: the frozen base weights stay in ``rest``, out of the
    optimizer state and the training checkpoints."""
    if lora is not None and lora.enabled:
      try:
        lora_lib.from_config(module, lora)
      except ValueError as e:
        raise ConfigError(f"config.lora.targets: {e}") from None
      trainable = nnx.LoRAParam
    graphdef, params, rest = nnx.split(module, trainable, ...)
    return cls(graphdef, nnx.to_pure_dict(params), rest, mesh, rules)

  def take_params(self) -> Any:
    """Hands the loaded parameters over (once): jitted updates donate them afterwards."""
    if self.params is None:
      raise RuntimeError("the parameters were already handed over to a training state")
    params, self.params = self.params, None
    return params

  def bind(self, params: Any) -> nnx.Module:
    """The module with ``params``; inside a function jitted by ``Net.jit`` the frozen ``rest``
    is that function's hidden argument, not a constant captured from ``self``."""
    rest = self._traced_rest[-1] if self._traced_rest else self.rest
    return nnx.merge(self.graphdef, nnx.State(params), rest)

  def jit(self, fn: Callable, *, donate_argnums: tuple[int, ...] = (), **kwargs) -> Callable:
    """``jax.jit(fn, ...)`` with the frozen ``rest`` passed as an extra argument: a LoRA run's
    base weights then stay device arrays in their shardings instead of being captured by
    ``bind`` as constants that XLA would embed, unsharded, in every program. Modules among the
    arguments (a pipeline's frozen VAE) go in as pytrees: ``nnx.jit`` would also return every
    variable of them, and of ``rest``, as outputs (a copy of all frozen weights per call).
    Same call signature as ``fn``; ``.lower`` / ``.trace`` take ``fn``'s arguments too."""
    def inner(rest, *args, **kw):
      self._traced_rest.append(rest)
      try:
        with layers.activation_sharding(self.mesh, self.rules):
          return fn(*args, **kw)
      finally:
        self._traced_rest.pop()

    jitted = jax.jit(inner, donate_argnums=tuple(i + 1 for i in donate_argnums), **kwargs)
    call = functools.wraps(fn)(lambda *args, **kw: jitted(self.rest, *args, **kw))
    call.lower = lambda *args, **kw: jitted.lower(self.rest, *args, **kw)
    call.trace = lambda *args, **kw: jitted.trace(self.rest, *args, **kw)
    return call


def on_mesh(tree: Any, mesh) -> Any:
  """Replicates over ``mesh`` every leaf that is not already laid out on its devices (scalars
  such as step counters, states created on the default device); others keep their sharding.
  A leaf on a single device is placed even when the mesh is that one device: an uncommitted
  ``SingleDeviceSharding`` input and the ``NamedSharding`` a jitted update returns are
  different cache keys, so the second update would compile again."""
  devices = set(mesh.devices.flat)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: x if (isinstance(x.sharding, jax.sharding.NamedSharding) and
                                      set(x.sharding.device_set) == devices)
                      else jax.device_put(x, replicated), tree)


def all_finite(tree: Any) -> jax.Array:
  """True iff every leaf of ``tree`` is finite (a scalar bool array; jit-friendly)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def accumulate(grad_fn: Callable[[jax.Array], tuple[Any, dict]], n: int) -> tuple[Any, dict]:
  """(sum of gradients, sum of metrics) of ``grad_fn(i)`` over i = 0 .. n-1 (a traced int32),
  the gradient accumulation of every method's update: a rolled ``lax.scan``, so the program
  holds one call's forward-backward (compile time does not grow with n) and only one call's
  activations are live at a time (an unrolled loop let XLA keep all n calls' activations for
  one backward: a 20-step DDPO update asked for 60 GB). Convolution gradients stay fast inside
  the loop on XLA:CPU through ``layers.conv_general_dilated``."""
  shapes = jax.eval_shape(grad_fn, jnp.int32(0))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, i):
    return jax.tree.map(jnp.add, carry, grad_fn(i)), None

  return jax.lax.scan(body, zeros, jnp.arange(n, dtype=jnp.int32))[0]


def guarded_apply(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                  loss: jax.Array) -> tuple[Any, Any, dict]:
  """The optimizer step of every method's jitted update, skipped when it would poison the run.

  ``ok = isfinite(loss) & isfinite(||g||_2) & isfinite(new params)``; when ``ok`` is false the
  step returns ``(params, opt_state)`` unchanged (one ``lax.cond`` over the whole update)
  and the metric ``nonfinite`` is 1. Unlike ``optax.apply_if_finite`` this also looks
  at the loss and at the updated parameters (a finite gradient can still overflow a weight), it
  never gives up and applies a bad step (the host-side ``NonFiniteGuard`` aborts the run
  instead), and the optimizer state keeps its structure (checkpoints stay compatible).
  Returns (params, opt_state, {"grad_norm", "nonfinite"})."""
  grad_norm = optax.global_norm(grads)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
  # One conditional, not a select per leaf: XLA fused the and-chain of ``ok`` (over every
  # leaf's finiteness) into each leaf's select, O(leaves^2) instructions (a tiny SDXL
  # fake-score update: 620k HLO lines, 136 s of XLA:CPU compilation).
  new_params, new_opt = jax.lax.cond(ok, lambda new, old: new, lambda new, old: old,
                                     (new_params, new_opt), (params, opt_state))
  return new_params, new_opt, {"grad_norm": grad_norm,
                               "nonfinite": jnp.where(ok, 0.0, 1.0).astype(jnp.float32)}


class NonFiniteError(RuntimeError):
  """Too many consecutive optimizer steps were skipped as non-finite; the run must stop."""


class EpochAbandoned(Exception):
  """Raised by ``loop.run_epoch`` when asked to stop inside an epoch. ``trained`` batches of it
  had already changed the state (the methods that update per batch): then the state is not the
  epoch's start and the run resumes from its last checkpoint; with 0 it is the epoch's start."""

  def __init__(self, epoch: int, trained: int = 0):
    super().__init__(epoch, trained)
    self.epoch, self.trained = epoch, trained


def ema_as(ema, like):
  """An EMA copy (kept in float32) cast to the dtypes of the parameters ``like``."""
  return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, like)


class NonFiniteGuard:
  """Host-side count of consecutive skipped (non-finite) optimizer steps, kept across epochs
  and checkpoints. ``observe(flag)`` takes each update's ``nonfinite`` metric (a device scalar;
  the check lags one step behind so updates stay queued on the device) and raises
  ``NonFiniteError`` once ``max_consecutive`` steps in a row were skipped; ``flush()`` checks
  the last one (call it at the end of an epoch)."""

  def __init__(self, max_consecutive: int = 3):
    self.max_consecutive = max_consecutive
    self.consecutive = 0
    self.total = 0
    self._pending = None

  def _check(self, flag) -> None:
    if float(flag) > 0:
      self.consecutive += 1
      self.total += 1
    else:
      self.consecutive = 0
    if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
      raise NonFiniteError(
          f"{self.consecutive} consecutive optimizer steps had a non-finite loss, gradient or "
          f"update and were skipped (train.max_consecutive_nonfinite={self.max_consecutive}); "
          "stopping. Lower train.learning_rate or check the rewards; the checkpoints on disk "
          "are the last finite states")

  def observe(self, flag) -> None:
    pending, self._pending = self._pending, flag
    if pending is not None:
      self._check(pending)

  def flush(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      self._check(pending)

  def state_dict(self) -> dict:
    return {"consecutive": self.consecutive, "total": self.total}

  def load_state_dict(self, d: dict) -> None:
    self.consecutive = int(d.get("consecutive", 0))
    self.total = int(d.get("total", 0))


def host_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def all_rows(x: jax.Array) -> np.ndarray:
  """Every row of a batch-sharded global array on every process (evaluation metrics are
  computed on the whole held-out set, identically on each host)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
