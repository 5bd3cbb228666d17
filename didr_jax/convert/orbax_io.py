"""Orbax save / restore of NNX modules' parameters.

Restoring builds nothing concrete first: the caller passes abstract modules (``nnx.eval_shape``)
and a sharding function, and Orbax reads each array straight into its target sharding.
"""

from __future__ import annotations

import json
import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

from didr_jax.convert.core import ConversionError

ShardingFn = Callable[[nnx.Variable], Any]


def _pure(module: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def save_modules(path: str, modules: Mapping[str, nnx.Module]) -> None:
  """Writes the parameters of each named module to an Orbax checkpoint at ``path``
  (atomic: Orbax writes to a temporary folder and renames it when complete)."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {k: _pure(m) for k, m in modules.items()}, force=True)
    ckptr.wait_until_finished()


def abstract_target(module: nnx.Module, sharding_fn: ShardingFn | None = None) -> dict:
  """The Orbax restore target of a (possibly abstract) module: ShapeDtypeStructs with
  the sharding ``sharding_fn(var)`` (default: the first local device)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = nnx.state(module, nnx.Param)
  shardings = jax.tree.map(lambda v: sharding_fn(v) if sharding_fn else default, state,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  pure_shard = nnx.to_pure_dict(shardings)
  pure = nnx.to_pure_dict(state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure,
                      pure_shard)


_REQUIRED = ("_METADATA",)  # (+ _CHECKPOINT_METADATA, checked when present)


def check_cache(path: str) -> None:
  """Cheap completeness check of an Orbax checkpoint folder (no array is read): it exists and
  holds readable metadata files. A truncated data file is only found by ``restore_modules``."""
  if not os.path.isdir(path):
    raise ConversionError(f"Orbax checkpoint {path!r} does not exist")
  for name in _REQUIRED + ("_CHECKPOINT_METADATA",):
    f = os.path.join(path, name)
    if name not in _REQUIRED and not os.path.exists(f):
      continue
    try:
      with open(f) as fh:
        json.load(fh)
    except FileNotFoundError:
      raise ConversionError(f"Orbax checkpoint {path!r} is incomplete ({name} is missing): "
                            "delete it and convert the source folder again") from None
    except (OSError, ValueError) as e:
      raise ConversionError(f"Orbax checkpoint {path!r} is corrupt ({name}: {e}): delete it "
                            "and convert the source folder again") from None


def root_cause(e: BaseException, limit: int = 300) -> str:
  """The first line of the innermost cause of ``e`` (Orbax wraps TensorStore errors twice)."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


class _held_stderr(contextlib.AbstractContextManager):
  """Points file descriptor 2 at a temporary file until exit; ``release()`` copies what was
  written there to the real stderr (call it on success; on failure the text is dropped)."""

  QUIET_S, MAX_S = 0.5, 5.0

  def __enter__(self):
    sys.stderr.flush()
    self._file = tempfile.TemporaryFile()
    self._saved = os.dup(2)
    os.dup2(self._file.fileno(), 2)
    return self

  def __exit__(self, kind, *_):
    if kind is not None:  # let the failed read's callbacks run (and print) in here: wait until
      last, quiet, waited = -1, 0.0, 0.0  # nothing new is written for QUIET_S (at most MAX_S)
      while quiet < self.QUIET_S and waited < self.MAX_S:
        time.sleep(0.1)
        waited += 0.1
        size = os.fstat(self._file.fileno()).st_size
        quiet, last = (quiet + 0.1 if size == last else 0.0), size
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    return False

  def release(self):
    self._file.seek(0)
    text = self._file.read()
    self._file.close()
    if text:
      sys.stderr.write(text.decode(errors="replace"))
      sys.stderr.flush()


def tree_metadata(path: str) -> dict:
  """The saved tree of the checkpoint at ``path``: nested dicts of array metadata (shapes,
  dtypes; no array is read)."""
  path = os.path.abspath(path)
  check_cache(path)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return dict(ckptr.metadata(path).item_metadata.tree)
  except Exception as e:
    raise ConversionError(f"could not read the Orbax checkpoint {path!r} ({root_cause(e)}); "
                          "it is incomplete or corrupt: delete it and convert the source "
                          "folder again (python -m didr_jax.convert)") from e


def restore_modules(path: str, modules: Mapping[str, nnx.Module],
                    sharding_fn: ShardingFn | None = None) -> dict[str, nnx.Module]:
  """Restores the named (abstract) modules from ``path``; fails clearly on a missing or
  incompatible checkpoint."""
  path = os.path.abspath(path)
  check_cache(path)
  target = {k: abstract_target(m, sharding_fn) for k, m in modules.items()}
  try:
    # A failed read leaves TensorStore callbacks aimed at Orbax's closed event loop; they print
    # tracebacks from other threads straight to file descriptor 2. Held back here and shown
    # only when the restore succeeds.
    with _held_stderr() as held, ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(path, target)
    held.release()
  except Exception as e:  # orbax raises many types; name the path and the root cause
    raise ConversionError(f"could not restore the Orbax checkpoint {path!r} ({root_cause(e)}); "
                          f"it is incomplete, corrupt or of another model: delete it and "
                          "convert the source folder again (python -m didr_jax.convert)") from e
  out = {}
  for k, m in modules.items():
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, restored[k])
    out[k] = nnx.merge(graphdef, params, rest)
  return out
