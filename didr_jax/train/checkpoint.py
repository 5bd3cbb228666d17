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

Orbax does not checksum what it writes, so bit rot or an overwritten byte would restore as good
values. Each step therefore gets ``checksums.json`` (size and SHA-256 of every file in it),
written by process 0 once the step is on disk: at once for a synchronous save, at the next
``save`` / ``wait`` / ``close`` for an asynchronous one (after Orbax's own wait, so the write
itself is not slowed). ``restore`` checks them first and a mismatch is a corrupt step like any
other. A step without the file (older runs, or a crash between Orbax's commit and the checksum
write) restores unchecked.

A ``read_only`` Checkpointer (``evaluate``, ``sample``, exports: readers of a run that may be
live, holding no lock) never creates, deletes or moves anything: a corrupt step is named and
the next older one used.

A save that fails because the disk is full, read-only or out of quota raises ``SaveError`` (one
line) after removing the unfinished ``<step>.orbax-checkpoint-tmp`` folder; Orbax's tracebacks
for it are kept off the log.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from didr_jax.train import common


class NonFiniteState(RuntimeError):
  """A state with NaN or inf values was about to be saved."""


class RestoreError(RuntimeError):
  """No checkpoint step could be restored."""


class SaveError(RuntimeError):
  """A checkpoint could not be written (disk full, read-only, over quota): one line."""


CHECKSUMS = "checksums.json"
# errnos that mean "the disk cannot take this checkpoint", and TensorStore's way of carrying one
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                errno.EFBIG}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def disk_errno(e: BaseException) -> int | None:
  """The errno of a disk failure anywhere in ``e``'s chain (an OSError, or a TensorStore error
  whose text carries ``os_error_code``), else None."""
  while e is not None:
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
      m = _OS_ERROR_CODE.search(str(e))
      code = int(m.group(1)) if m else None
    if code in _DISK_ERRNOS:
      return code
    e = e.__cause__ or e.__context__
  return None


class _QuietOrbax(logging.Filter):
  """Drops the tracebacks that Orbax and asyncio log for a disk failure (``SaveError`` says it
  in one line) and Orbax's warning that a reader's directory is read-only (as asked)."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and disk_errno(exc):
      return False
    text = record.getMessage()
    return not ("orbax" in record.pathname and
                (_OS_ERROR_CODE.search(text) or text.startswith("Given directory is read only")))


for _name in ("absl", "asyncio"):
  logging.getLogger(_name).addFilter(_QuietOrbax())


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def _files(folder: str, under: str = "") -> list[str]:
  out = []
  for root, _, names in os.walk(os.path.join(folder, under)):
    out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
  return sorted(f for f in out if f != CHECKSUMS)


def write_checksums(step_dir: str):
  """``step_dir/checksums.json``: {relative path: [size, sha256]} of every file in the step."""
  sums = {f: [os.path.getsize(os.path.join(step_dir, f)), _digest(os.path.join(step_dir, f))]
          for f in _files(step_dir)}
  path = os.path.join(step_dir, CHECKSUMS)
  with open(path + ".tmp", "w") as fh:
    json.dump({"algorithm": "sha256", "files": sums}, fh, indent=0, sort_keys=True)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(path + ".tmp", path)


def verify_checksums(step_dir: str, under: str = "") -> str | None:
  """What in ``step_dir`` (only files below ``under`` if given) does not match its
  ``checksums.json``, or None when all match or the step has no checksums."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as fh:
      sums = json.load(fh)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its {CHECKSUMS} is unreadable ({type(e).__name__})"
  for rel, (size, digest) in sorted(sums.items()):
    if not rel.startswith(under):
      continue
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      return f"{rel} is missing"
    if os.path.getsize(full) != size:
      return f"{rel} has {os.path.getsize(full)} bytes, {size} were saved"
    if _digest(full) != digest:
      return f"{rel} does not match its SHA-256 (bit rot or an overwritten file)"
  return None


_all_finite = jax.jit(common.all_finite)


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {text[:limit]}"


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    """``read_only``: a reader of a run that may be live (``evaluate``, ``sample``, exports):
    it creates, deletes and moves nothing."""
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self.async_save = async_save and not read_only
    self._pending = None  # the step saved last, still without checksums
    self._failed = False
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                             enable_async_checkpointing=False)
    else:
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
    any leaf of ``state`` is NaN or inf, and ``SaveError`` if the disk refuses the write (here
    or, for an asynchronous save, at the next ``save`` / ``wait`` / ``close``)."""
    if not bool(_all_finite(state)):
      raise NonFiniteState(f"the state of step {step} has non-finite values: not saved "
                           f"(the last good checkpoint in {self.directory} is step "
                           f"{self.latest_step()})")
    self._seal()
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)), force=force)
    except Exception as e:
      self._raise_save_error(step, e)
    if saved:
      self._pending = step
      if not self.async_save:
        self._seal()
    return saved

  def _seal(self):
    """Waits for the pending save and writes its ``checksums.json`` (process 0)."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
      if jax.process_index() == 0:
        write_checksums(os.path.join(self.directory, str(step)))
    except Exception as e:
      self._raise_save_error(step, e)

  def _raise_save_error(self, step: int, e: Exception):
    """Re-raises ``e``; a disk failure as ``SaveError`` after removing the unfinished step."""
    code = disk_errno(e)
    if code is None:
      raise e
    self._failed = True
    if jax.process_index() == 0:
      for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(tmp, ignore_errors=True)
      for tmp in glob.glob(os.path.join(self.directory, str(step), CHECKSUMS + ".tmp")):
        os.remove(tmp)
    done = max((int(n) for n in os.listdir(self.directory) if n.isdigit()), default=None)
    kept = (f"the newest complete checkpoint is step {done}" if done is not None else
            "no complete checkpoint yet")
    raise SaveError(f"could not save checkpoint step {step} in {self.directory}: "
                    f"{os.strerror(code)} (the unfinished save was removed; {kept}); free "
                    "space or fix the folder and rerun to resume") from None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores into ``abstract_state`` (ShapeDtypeStructs carrying target shardings)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    bad = verify_checksums(os.path.join(self.directory, str(step)))
    if bad:
      raise RestoreError(f"checkpoint step {step} in {self.directory} does not match its "
                         f"checksums: {bad}")
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
    bad = verify_checksums(os.path.join(self.directory, str(step)), under="host")
    if bad:
      raise RestoreError(f"checkpoint step {step}: {bad}")
    return self.manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]

  def restore_latest(self, abstract_state: Any, warn: Callable[[str], None] = print
                     ) -> tuple[Any, dict, int]:
    """The newest step that restores, matches its checksums and is finite. Newer steps that
    fail are reported with ``warn`` and moved to ``<directory>.corrupt/`` once an older step
    restores (so the run can save newer steps again; a ``read_only`` reader moves nothing); if
    none restores, ``RestoreError`` (nothing moved)."""
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
    if self.read_only:
      for _, err in errors:
        warn(f"warning: {err}; it is corrupt: using step {good}, the newest intact one "
             "(nothing moved: a reader leaves the run's files as they are)")
      return
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
    self._seal()
    self.manager.wait_until_finished()

  def close(self):
    """Finishes the pending save; after a ``SaveError`` it only lets go of the manager."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 (only after a failed save, whose error was raised)
        if not self._failed:
          raise


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a concrete pytree (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
