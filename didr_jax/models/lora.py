"""LoRA adapters on the Linear (and 1x1 Conv) layers of any NNX model, with flax's ``nnx.LoRA``.

A targeted layer ``W`` (kernel (..., in, out), bias b) becomes

    y = x W + b + s * (x A) B,      A: (..., in, r) ``nnx.LoRAParam``, B: (..., r, out),
    s = alpha / r,                  A ~ He-uniform, B = 0 (so the adapted model starts as the base)

``inject`` replaces each target module in place by a ``LoRA`` wrapper (a subclass of flax's
``nnx.LoRA`` whose ``base_module`` is the original layer: its parameters keep their values and
sharding metadata, the adapters are ``nnx.LoRAParam``); ``nnx.split(model, nnx.LoRAParam, ...)``
then separates the trainable adapters from the frozen base. ``merge`` folds the adapters back,
W' = W + s A B, and puts plain layers back in place (the base model's parameter names again).

Targets are regular expressions over dotted module paths (diffusers' names, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``): a layer is targeted when some
pattern matches a dot-separated suffix of its path (``to_q`` matches every ``...to_q``,
``attn2\\.to_q`` only cross-attention queries). A leading stacking axis (Z-Image's scanned
``layers``) is carried by the adapters as well.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.models import zimage_dit

# diffusers' usual LoRA targets (PEFT ``target_modules``) per model family.
UNET_ATTENTION = (r"to_q", r"to_k", r"to_v", r"to_out\.0")
UNET_FF = (r"ff\.net\.0\.proj", r"ff\.net\.2")
UNET_PROJ = (r"proj_in", r"proj_out")
ZIMAGE_ATTENTION = (r"attention\.to_q", r"attention\.to_k", r"attention\.to_v",
                    r"attention\.to_out\.0")


def default_targets(model: nnx.Module) -> tuple[str, ...]:
  """The attention projections of the model's family (what diffusers' LoRA scripts train)."""
  return ZIMAGE_ATTENTION if isinstance(model, zimage_dit.ZImageTransformer) else UNET_ATTENTION


class LoRA(nnx.LoRA):
  """``base_module(x) + (alpha / r) * (x A) B`` (flax's ``nnx.LoRA`` plus PEFT's alpha / r scale;
  the low-rank path runs in the base layer's compute dtype)."""

  def __init__(self, base: nnx.Linear | nnx.Conv, rank: int, alpha: float, *, rngs: nnx.Rngs):
    kernel = base.kernel
    lead = len(kernel.shape) - (2 if isinstance(base, nnx.Linear) else 4)  # stacking axes (scan)
    prefix = tuple(kernel.shape[:lead])
    fan_in, fan_out = kernel.shape[-2], kernel.shape[-1]
    md = kernel.get_metadata()
    names = md.get("out_sharding") or md.get("sharding_names")  # logical axes, if any
    meta = lambda axes: {} if names is None else {"sharding_names": tuple(names[:lead]) + axes}
    abstract = isinstance(kernel.get_value(), jax.ShapeDtypeStruct)

    def init(fn):
      def make(key, shape, dtype):
        shape = prefix + tuple(shape)
        if abstract:
          return jax.ShapeDtypeStruct(shape, dtype)
        return fn(key, shape, dtype)
      return make

    he = nnx.initializers.he_uniform(in_axis=-2, out_axis=-1)
    with nnx.use_eager_sharding(False):
      super().__init__(fan_in, rank, fan_out, base_module=base, dtype=base.dtype,
                       param_dtype=jnp.float32, a_initializer=init(he),
                       b_initializer=init(nnx.initializers.zeros), rngs=rngs,
                       a_metadata=meta((names[-2] if names else None, None)),
                       b_metadata=meta((None, names[-1] if names else None)))
    self.rank = rank
    self.alpha = float(alpha)
    _shard_like(kernel.get_value(), self.lora_a, self.lora_b, lead)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
    y = self.base_module(x, **kwargs)
    h, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    return y + (((h @ a) * jnp.asarray(self.scale, h.dtype)) @ b).astype(y.dtype)

  def delta(self) -> jax.Array:
    """s A B in the kernel's layout ((..., in, out), or (..., 1, 1, in, out) for a 1x1 conv)."""
    d = self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))
    kernel = self.base_module.kernel
    if isinstance(self.base_module, nnx.Conv):  # (..., in, out) -> (..., 1, 1, in, out)
      d = d.reshape(d.shape[:-2] + (1, 1) + d.shape[-2:])
    return d.reshape(kernel.shape)


def _shard_like(kernel: Any, a: nnx.Variable, b: nnx.Variable, lead: int) -> None:
  """Lays A and B out like the kernel they adapt: A's ``in`` axis as the kernel's input axis,
  B's ``out`` axis as its output axis (an axis the kernel keeps whole borrows the other one's
  mesh axes), the stacking axes as the kernel's, the rank whole. Under fsdp the adapters (and
  their AdamW moments) then shrink with the mesh like the base weights instead of being
  replicated on every device (a 1x1 conv kernel (..., 1, 1, in, out) ends in in, out as well).
  A kernel without a NamedSharding leaves them as they are."""
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return
  spec = tuple(sharding.spec) + (None,) * (len(kernel.shape) - len(sharding.spec))
  stack, k_in, k_out = spec[:lead], spec[-2], spec[-1]
  def borrow(axes, dim):  # ``axes`` when their mesh size divides ``dim``
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return axes if dim % math.prod(sharding.mesh.shape[n] for n in names) == 0 else None

  # fsdp usually shards one axis of a kernel: the adapter on the whole side borrows those mesh
  # axes (when they divide it), or it would stay whole on every device
  if k_out is None and k_in is not None:
    k_out = borrow(k_in, kernel.shape[-1])
  elif k_in is None and k_out is not None:
    k_in = borrow(k_out, kernel.shape[-2])
  P = jax.sharding.PartitionSpec
  for var, axes in ((a, stack + (k_in, None)), (b, stack + (None, k_out))):
    target = jax.sharding.NamedSharding(sharding.mesh, P(*axes))
    value = var.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
      var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=target))
    else:
      var.set_value(jax.device_put(value, target))


def _dotted(path: Sequence[Any]) -> str:
  return ".".join(str(p) for p in path)


def _is_1x1(m: nnx.Conv) -> bool:
  k = m.kernel.shape
  pad = m.padding
  no_pad = pad in ("SAME", "VALID") or all(v == 0 for v in jax.tree.leaves(pad))
  return (tuple(k[-4:-2]) == (1, 1) and all(s == 1 for s in jax.tree.leaves(m.strides))
          and m.feature_group_count == 1 and no_pad)


def _layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """(path, module) of every Linear / Conv in the model (LoRA wrappers' bases excluded)."""
  out = []
  for path, m in nnx.iter_graph(model):
    if isinstance(m, (nnx.Linear, nnx.Conv)) and "base_module" not in path:
      out.append((tuple(path), m))
  return out


def _matches(pattern: str, dotted: str) -> bool:
  return re.search(rf"(?:^|\.)(?:{pattern})$", dotted) is not None


def target_paths(model: nnx.Module, targets: Iterable[str] = ()) -> list[tuple]:
  """Paths of the layers ``targets`` select (default: ``default_targets(model)``).

  Every pattern must select at least one layer, and only Linear layers and 1x1 stride-1 convs
  can be adapted; otherwise ValueError names the pattern (and the layers it did match)."""
  targets = tuple(targets) or default_targets(model)
  found, used = [], set()
  layers = _layers(model)
  for pattern in targets:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"LoRA target {pattern!r} is not a regular expression: {e}") from None
    hits = [(p, m) for p, m in layers if _matches(pattern, _dotted(p))]
    bad = [_dotted(p) for p, m in hits if isinstance(m, nnx.Conv) and not _is_1x1(m)]
    if bad:
      raise ValueError(f"LoRA target {pattern!r} selects convolutions that are not 1x1 "
                       f"(only Linear and 1x1 conv layers take adapters): {bad[:5]}")
    if not hits:
      raise ValueError(f"LoRA target {pattern!r} selects no Linear / 1x1 conv layer of "
                       f"{type(model).__name__}")
    for p, _ in hits:
      if p not in used:
        used.add(p)
        found.append(p)
  return found


def _set(model: nnx.Module, path: tuple, value: nnx.Module) -> None:
  parent = _layer_at(model, path[:-1])
  last = path[-1]
  if isinstance(last, int) or isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
    parent[last] = value
  else:
    setattr(parent, last, value)


def inject(model: nnx.Module, *, rank: int, alpha: float | None = None,
           targets: Iterable[str] = (), seed: int = 0) -> list[str]:
  """Wraps every target layer of ``model`` in a ``LoRA`` (in place; works on concrete and on
  ``nnx.eval_shape`` models). ``alpha`` defaults to ``rank`` (scale 1). Returns the dotted
  paths adapted. Layers already wrapped are refused (call once)."""
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  if any(isinstance(m, LoRA) for _, m in nnx.iter_graph(model)):
    raise ValueError("the model already has LoRA adapters")
  alpha = float(rank if alpha is None else alpha)
  paths = target_paths(model, targets)
  rngs = nnx.Rngs(seed)
  for path in paths:
    layer = _layer_at(model, path)
    _set(model, path, LoRA(layer, rank, alpha, rngs=rngs))
  return [_dotted(p) for p in paths]


def _layer_at(model: nnx.Module, path: tuple) -> nnx.Module:
  m = model
  for p in path:
    m = m[p] if isinstance(p, int) or not hasattr(m, str(p)) else getattr(m, p)
  return m


def adapters(model: nnx.Module) -> list[tuple[tuple, LoRA]]:
  """(path, LoRA wrapper) of every adapter in the model, in graph order."""
  return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, LoRA)]


def merge(model: nnx.Module, *, inplace: bool = False) -> nnx.Module:
  """The model with every adapter folded into its base layer, W' = W + (alpha / r) A B (in the
  kernel's dtype), and plain layers back in place: the base model's structure and parameter
  names. Without ``inplace`` the input keeps its adapters (a shallow copy: untouched arrays are
  shared, not copied)."""
  if not inplace:  # new Variables (split / merge alone would share them with the input)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  for path, lora in adapters(model):
    base = lora.base_module
    kernel = base.kernel
    kernel.set_value((kernel[...].astype(jnp.float32) + lora.delta()).astype(kernel.dtype))
    _set(model, path, base)
  return model


def from_config(model: nnx.Module, lora_config: Any, seed: int = 0) -> list[str]:
  """``inject`` with the settings of a ``config.lora`` section (rank, alpha, targets)."""
  return inject(model, rank=int(lora_config.rank), alpha=float(lora_config.alpha),
                targets=tuple(lora_config.targets), seed=seed)
