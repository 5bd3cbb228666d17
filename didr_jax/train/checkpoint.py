"""Training checkpoints: one Orbax ``CheckpointManager`` for everything a run needs to go on
as if it had never stopped.

Two items per step: ``state`` (a pytree of arrays: parameters, optimizer states, EMA snapshots,
RNG key data, step) saved with StandardSave straight from its shardings, and ``host`` (JSON:
prompt-stream position, advantage-tracker buffers, metric history). Orbax writes each step into
a temporary folder and renames it when complete, so a crash mid-save never leaves a half-written
checkpoint that a restart would pick up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "host"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, host: dict, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores into ``abstract_state`` (ShapeDtypeStructs carrying target shardings)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
    except Exception as e:
      raise RuntimeError(f"checkpoint step {step} in {self.directory} could not be restored "
                         f"(corrupt, or written by a different config?): {e}") from e
    return out["state"], out["host"], step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a concrete pytree (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
