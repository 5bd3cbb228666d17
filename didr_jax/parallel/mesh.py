"""Device mesh, logical-axis rules and parameter placement.

A config names the mesh axes and their sizes (one size may be -1: "all remaining devices") and
a list of rules mapping the logical axis names of ``didr_jax.models.layers`` to mesh axes.
Parameters are placed by those rules; a dimension that a mesh axis does not divide evenly is
replicated instead (tiny test models and odd head counts then still run on any mesh).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

DEFAULT_AXES: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))

# Logical name -> mesh axis (or tuple of axes, or None). Activations use "batch".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


def make_mesh(axes: Sequence[tuple[str, int]] | Mapping[str, int] = DEFAULT_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types (what logical-rule sharding with GSPMD propagation needs).

  ``axes`` is an ordered list of (name, size); one size may be -1.
  """
  items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(s) for _, s in items]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh axes {items}: at most one size may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh axes {items}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh axes {items} need {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available")
  names = tuple(n for n, _ in items)
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # odd CPU/GPU topologies: a plain reshape is fine there
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, names, axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec; each mesh axis is used at most once, and
  a mesh axis that does not divide the dimension (when ``shape`` is given) is dropped."""
  if logical is None:
    return P()
  table: dict[str, Any] = {}
  for name, target in rules:  # the first rule for a name wins (config rules come first)
    table.setdefault(name, target)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical):
    target = table.get(name) if name is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
    if shape is not None:
      keep, size = [], 1
      for a in axes:
        if shape[i] % (size * mesh.shape[a]) == 0:
          keep.append(a)
          size *= mesh.shape[a]
      axes = tuple(keep)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  axes = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  return tuple(axes) if axes else None


def param_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(variable_axes(var), rules, mesh, var.shape))


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """A pytree of NamedShardings matching an nnx State (works on abstract states too)."""
  return jax.tree.map(lambda v: param_sharding(v, mesh, rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Places every variable of ``model`` according to its logical axes (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES,
                   batch_size: int | None = None) -> NamedSharding:
  """Sharding of an activation / data array whose leading axis is the global batch."""
  shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh, shape)
  return NamedSharding(mesh, spec)


def shard_batch(tree: Any, batch: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Lays the leaves of ``tree`` with a leading batch axis of size ``batch`` out along the
  mesh's batch axes (``batch_sharding``); other leaves are returned as arrays."""
  def put(x):
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] != batch:
      return x
    return jax.device_put(x, batch_sharding(mesh, x.ndim, rules, batch))
  return jax.tree.map(put, tree)


def params_mesh(module: nnx.Module) -> Mesh | None:
  """The mesh ``module``'s parameters are laid out on (None when they carry no named sharding,
  as after loading without a mesh)."""
  for _, node in nnx.iter_graph(module):  # the first parameter tells (a whole state is slow)
    if isinstance(node, nnx.Param):
      mesh = getattr(getattr(node.get_value(), "sharding", None), "mesh", None)
      return mesh if isinstance(mesh, Mesh) else None
  return None


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def cpu_device_count(requested: int, batch_sizes: Iterable[int],
                     axes: Sequence[tuple[str, int]] = DEFAULT_AXES,
                     cores: int | None = None) -> int:
  """How many devices to split this machine's CPU into (``config.cpu_devices``): ``requested``
  when it is > 0, else the largest count up to the number of cores (``cores``, default the
  ones this process may run on) that divides every batch size and fits the mesh ``axes``
  (their fixed sizes divide it; equal it when no size is -1); 1 when none does.

  XLA:CPU runs one device's program on a thread pool that keeps about 1.5 of 2 cores busy on
  the tiny SD UNet; with the batch sharded over one device per core both are (UNet forward at
  batch 16: 515 -> 349 ms on 2 cores)."""
  if requested > 0:
    return int(requested)
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  sizes = [int(s) for _, s in axes]
  fixed = math.prod(s for s in sizes if s != -1)
  batch_sizes = [int(b) for b in batch_sizes]
  for n in range(max(int(cores or 1), 1), 1, -1):
    fits = n % fixed == 0 if -1 in sizes else n == fixed
    if fits and all(b % n == 0 for b in batch_sizes):
      return n
  return 1


def split_cpu(n: int) -> bool:
  """Makes JAX's CPU backend ``n`` devices (``jax_num_cpu_devices``). Does nothing, and returns
  False, when ``n`` is 1, when the environment already chose (``JAX_NUM_CPU_DEVICES``, or
  ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``) or when JAX's backends have
  started (the setting only applies before). Accelerators are unaffected: the CPU devices then
  sit unused beside them."""
  if n <= 1 or "JAX_NUM_CPU_DEVICES" in os.environ or (
      "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
    return False
  try:
    jax.config.update("jax_num_cpu_devices", int(n))
  except RuntimeError:  # backends already initialised (a notebook, a test session)
    return False
  return True


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize()`` when the environment describes a multi-process job
  (TPU pod workers, SLURM, or explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID). Returns True when it initialised. Must run before any other JAX call."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
        process_id=int(env.get("JAX_PROCESS_ID", "0")))
    return True
  if env.get("SLURM_NTASKS", "1") != "1" or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()
    return True
  return False
