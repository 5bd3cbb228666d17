"""Pieces every trainer shares: trainable networks as (graph, params), optimizers, rollouts.

Trainers keep parameters as pure dicts of arrays (what optax, Orbax and jit see) and bind them
to the static module graph inside jitted functions with ``Net.bind``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx



@dataclasses.dataclass
class Net:
  """A module split into its static graph, its params (pure dict) and its other state."""
  graphdef: Any
  params: Any
  rest: Any

  @classmethod
  def of(cls, module: nnx.Module) -> "Net":
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return cls(graphdef, nnx.to_pure_dict(params), rest)

  def take_params(self) -> Any:
    """Hands the loaded parameters over (once): jitted updates donate them afterwards."""
    if self.params is None:
      raise RuntimeError("the parameters were already handed over to a training state")
    params, self.params = self.params, None
    return params

  def bind(self, params: Any) -> nnx.Module:
    return nnx.merge(self.graphdef, nnx.State(params), self.rest)


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


def make_optimizer(lr: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, max_grad_norm: float | None = 1.0
                   ) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (the optimizer of every method; betas per network)."""
  parts = []
  if max_grad_norm:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


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


def host_row_range(global_batch: int) -> tuple[int, int]:
  """The [start, end) rows of a batch-sharded global batch that this process holds."""
  n = jax.process_count()
  per = global_batch // n
  i = jax.process_index()
  return i * per, (i + 1) * per
