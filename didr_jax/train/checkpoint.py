"""Training checkpoints: one Orbax ``CheckpointManager`` for everything a run needs to go on
as if it had never stopped.

Two items per step: ``state`` (a pytree of arrays: parameters, optimizer states, EMA snapshots,
RNG key data, step) saved with StandardSave straight from its shardings, and ``host`` (JSON:
prompt-stream position, the trainer's host state such as advantage buffers, metric history).
Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never leaves a half-written checkpoint that a restart would pick up.

Two guards keep a good checkpoint on disk whatever happens to the run:
- ``save`` refuses a state with any non-finite leaf (``NonFiniteState``), so the rotation of
  ``max_to_keep`` never replaces finite checkpoints by poisoned ones;
- ``restore_latest`` tries the steps newest first: a step that fails to restore (truncated or
  overwritten files) or holds non-finite values is reported, moved to ``<dir>.corrupt/<step>``
  (kept, not deleted, and out of the way of later saves) and the next older step is used.
  If no step restores, ``RestoreError`` carries the first error (typically: a different config).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from didr_jax.train import common


class NonFiniteState(RuntimeError):
  """A state with NaN or inf values was about to be saved."""


class RestoreError(RuntimeError):
  """No checkpoint step could be restored."""


_all_finite = jax.jit(common.all_finite)


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {text[:limit]}"


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "host"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, host: dict, *, force: bool = False) -> bool:
    """Saves ``state`` and ``host`` as ``step``; raises ``NonFiniteState`` (saving nothing) if
    any leaf of ``state`` is NaN or inf."""
    if not bool(_all_finite(state)):
      raise NonFiniteState(f"the state of step {step} has non-finite values: not saved "
                           f"(the last good checkpoint in {self.directory} is step "
                           f"{self.latest_step()})")
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
      raise RestoreError(f"checkpoint step {step} in {self.directory} could not be restored "
                         f"({_first_line(e)})") from e
    if not bool(_all_finite(out["state"])):
      raise RestoreError(f"checkpoint step {step} in {self.directory} holds non-finite values")
    return out["state"], out["host"], step

  def restore_host(self, step: int) -> dict:
    """Only the JSON host item of ``step`` (no model needed)."""
    return self.manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]

  def restore_latest(self, abstract_state: Any, warn: Callable[[str], None] = print
                     ) -> tuple[Any, dict, int]:
    """The newest step that restores and is finite. Newer steps that fail are reported with
    ``warn`` and moved to ``<directory>.corrupt/`` once an older step restores (so the run
    can save newer steps again); if none restores, ``RestoreError`` (nothing moved)."""
    steps = self.all_steps()[::-1]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for step in steps:
      try:
        out = self.restore(abstract_state, step)
      except RestoreError as e:
        errors.append((step, e))
        continue
      if errors:
        self._quarantine(errors, out[2], warn)
      return out
    raise RestoreError(str(errors[0][1])) from errors[0][1]

  def _quarantine(self, errors: list, good: int, warn: Callable[[str], None]):
    dest = self.directory + ".corrupt"
    for s, err in errors:
      if jax.process_index() == 0:
        os.makedirs(dest, exist_ok=True)
        target = os.path.join(dest, str(s))
        n = 1
        while os.path.exists(target):
          target, n = os.path.join(dest, f"{s}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(s)), target)
      warn(f"warning: {err}; it is corrupt: moved to {dest}/ and resuming from step {good}, "
           "the newest intact one")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("didr_jax.checkpoint.quarantine")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a concrete pytree (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
