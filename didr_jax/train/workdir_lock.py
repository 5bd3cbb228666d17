"""One training run per workdir: ``python -m didr_jax.main`` holds ``<workdir>/run.lock`` for
the run's whole life, and a second ``main`` on the same workdir is refused with one line naming
the holder (host, pid, start time). ``evaluate`` and ``sample`` only read a workdir and take no
lock.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFS) and
holds JSON: host, pid, start time, and what tells a dead holder from a live one. A lock is
stale, and is taken over with a note naming the dead holder, when:

- the holder ran on this machine (same host name, boot and PID namespace) and its pid is gone,
  a zombie, or now another process (a different start time in /proc);
- the holder ran elsewhere (another host of a pod sharing the workdir, or this host before a
  reboot) and its heartbeat stopped: a live holder refreshes the file's mtime every
  ``HEARTBEAT_S`` (30 s), and an mtime older than ``STALE_AFTER_S`` (5 min: well above NFS
  attribute caching and clock skew between hosts) marks it stale.

Taking over renames the stale file aside and creates the lock anew with ``O_EXCL``, so of two
processes that find the same stale lock only one gets it. On several processes (a pod) only
process 0 locks (``didr_jax.train.loop`` tells the others whether it got the lock).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirError(Exception):
  """The workdir cannot be used: not a folder, not writable, or in use by another run."""


class WorkdirLocked(WorkdirError):
  """Another live run holds the workdir's lock."""


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def _machine() -> str:
  """This machine and PID namespace: pids are comparable between processes with equal values."""
  parts = [socket.gethostname(), _read("/proc/sys/kernel/random/boot_id").strip()]
  try:
    parts.append(os.readlink("/proc/self/ns/pid"))
  except OSError:
    pass
  return "/".join(parts)


def _proc_stat(pid: int) -> tuple[str, str] | None:
  """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None."""
  text = _read(f"/proc/{pid}/stat")
  fields = text.rsplit(")", 1)[-1].split()
  return (fields[0], fields[19]) if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    pass
  stat = _proc_stat(pid)
  if stat is None:
    return True
  return stat[0] not in ("Z", "X") and (start is None or stat[1] == start)


def describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
          f"{holder.get('started', '?')}")


class WorkdirLock:
  """``with WorkdirLock(workdir): ...`` holds the workdir's lock (creating the workdir).

  ``acquire`` raises ``WorkdirLocked`` when a live run holds it and ``WorkdirError`` when the
  workdir is not a writable folder; every message is one line."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self._token = None
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  def acquire(self, note=print) -> "WorkdirLock":
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except FileExistsError:
      raise WorkdirError(f"--workdir={self.workdir} is a file, not a folder: pass a folder "
                         "(a new one starts a new run)") from None
    except OSError as e:
      raise WorkdirError(f"--workdir={self.workdir}: cannot create it ({e.strerror})") from None
    stat = _proc_stat(os.getpid())
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat("T", "seconds"),
          "machine": _machine(), "pid_start": stat[1] if stat else None}
    for _ in range(3):
      token = uuid.uuid4().hex
      text = json.dumps({**me, "token": token})
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        seen = _read(self.path)
        why = self._stale(seen)
        if why is None:
          continue  # released (or taken over) meanwhile: try again
        try:
          self._take_over(seen)
        except OSError as e:
          raise WorkdirError(f"--workdir={self.workdir} is not writable: cannot replace the "
                             f"stale lock file {self.path} ({e.strerror})") from None
        note(f"note: took over the stale lock of {self.workdir} ({why})")
        continue
      except OSError as e:
        raise WorkdirError(f"--workdir={self.workdir} is not writable: cannot create its lock "
                           f"file {self.path} ({e.strerror})") from None
      try:
        os.write(fd, text.encode())
        os.fsync(fd)
      except OSError as e:
        os.close(fd)
        os.unlink(self.path)
        raise WorkdirError(f"--workdir={self.workdir}: cannot write its lock file "
                           f"{self.path} ({e.strerror})") from None
      os.close(fd)
      self._token = token
      self._stop.clear()
      self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                      daemon=True)
      self._thread.start()
      return self
    raise WorkdirLocked(f"--workdir={self.workdir}: could not take its lock {self.path} "
                        "(other runs kept taking it); try again")

  def _stale(self, text: str) -> str | None:
    """Why the lock holding ``text`` is stale, or None: raises ``WorkdirLocked`` if it is live,
    None if the file is gone."""
    try:
      age = time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      holder["pid"] = int(holder["pid"])
    except (ValueError, KeyError, TypeError):
      holder = None
    if holder is not None and holder.get("machine") == _machine():
      if not _alive(holder["pid"], holder.get("pid_start")):
        return f"{describe(holder)}, which is gone"
      live = f"the run of {describe(holder)} is using it (this machine)"
    elif age > self.stale_after_s:
      return (f"{describe(holder) if holder else 'an unreadable holder'}, with no heartbeat "
              f"for {age:.0f} s")
    else:
      who = describe(holder) if holder else "an unreadable lock file"
      live = (f"the run of {who} is using it (its heartbeat is {age:.0f} s old; it counts as "
              f"stale after {self.stale_after_s:.0f} s without one)")
    raise WorkdirLocked(f"--workdir={self.workdir} is locked: {live}. Wait for that run or "
                        f"stop it, or use another --workdir; if no run uses it, delete "
                        f"{self.path}")

  def _take_over(self, seen: str):
    aside = f"{self.path}.stale.{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:  # another process took it over first
      return
    if _read(aside) == seen:
      os.unlink(aside)
    else:  # a live lock written since we looked: put it back
      os.rename(aside, self.path)

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self):
    if self._token is None:
      return
    self._stop.set()
    self._thread.join()
    try:
      if json.loads(_read(self.path) or "{}").get("token") == self._token:
        os.unlink(self.path)
    except (OSError, ValueError):
      pass
    self._token = None


def lock_for_run(workdir: str) -> WorkdirLock | None:
  """The lock a training run holds (``release`` it when the run ends): taken by process 0; on
  several processes every one learns whether process 0 got it, and all raise its
  ``WorkdirError`` together instead of the others hanging in the run's first collective."""
  import jax
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirError(f"--workdir={workdir}: process 0 could not lock it (its error line "
                           "says why)")
  if error is not None:
    raise error
  return lock
