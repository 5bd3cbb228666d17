"""Nothing else writes into a live run (issue 28): the workdir lock of ``didr_jax.main`` (a live
holder named, stale locks of dead processes and of silent hosts taken over), a workdir that
cannot be used (a file, a read-only or a full filesystem: real ones, tmpfs mounts in a private
mount namespace) refused in one line, and a checkpoint save that hits a full disk (a real
ENOSPC) ending in one line without an unfinished step left behind.

Where the rest is tested: a real second ``main`` on a live run is refused in test_hardening
(beside that module's training run), which also tests the checkpoints' checksums with a real
byte flip; the lock on two processes of a pod is in test_multiprocess."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from didr_jax.train import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _holder(workdir):
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
    return json.load(f)


def _forge(workdir, **fields):
  """A lock file as another run would have written it."""
  os.makedirs(workdir, exist_ok=True)
  holder = {"host": "tpu-worker-3", "pid": 4242, "started": "2026-01-01T00:00:00+00:00",
            "machine": "tpu-worker-3/some-boot/pid:[1]", "pid_start": "1", "token": "x",
            **fields}
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
    json.dump(holder, f)
  return holder


# ---------------------------------------------------------------------------- the lock itself

def test_a_live_lock_is_refused_naming_its_holder_and_released_at_the_end(tmp_path):
  w = str(tmp_path / "run")
  with workdir_lock.WorkdirLock(w) as lock:
    holder = _holder(w)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(workdir_lock.WorkdirLocked) as e:
      workdir_lock.WorkdirLock(w).acquire()
    msg = str(e.value)
    assert "\n" not in msg and f"pid {os.getpid()} on host {socket.gethostname()}" in msg
    assert f"since {holder['started']}" in msg and lock.path in msg
  assert os.listdir(w) == []  # released: the file is gone
  workdir_lock.WorkdirLock(w).acquire().release()  # and the workdir can be locked again


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over(tmp_path):
  w = str(tmp_path / "run")
  child = subprocess.Popen(  # a run that holds the lock until SIGKILL (no cleanup)
      [sys.executable, "-c", "import sys, time; from didr_jax.train import workdir_lock; "
       "workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
       "time.sleep(120)", w], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {child.pid} on host"):
      workdir_lock.WorkdirLock(w).acquire()
    child.kill()
    deadline = time.time() + 30
    while workdir_lock._proc_stat(child.pid)[0] != "Z":  # dead, not yet reaped: a zombie
      assert time.time() < deadline
      time.sleep(0.01)
    notes = []
    lock = workdir_lock.WorkdirLock(w).acquire(note=notes.append)
  finally:
    child.kill()
    child.wait()
  assert _holder(w)["pid"] == os.getpid()
  assert len(notes) == 1 and f"pid {child.pid} on host" in notes[0] and "which is gone" in notes[0]
  lock.release()
  assert os.listdir(w) == []  # nothing left aside


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path):
  w = str(tmp_path / "run")
  me = workdir_lock.WorkdirLock(w)
  # our own (live) pid, but a start time that is not ours: the holder died and the pid came back
  _forge(w, machine=workdir_lock._machine(), pid=os.getpid(), pid_start="1")
  notes = []
  me.acquire(note=notes.append).release()
  assert len(notes) == 1 and "which is gone" in notes[0]


def test_another_hosts_lock_holds_while_its_heartbeat_is_fresh(tmp_path):
  w = str(tmp_path / "run")
  _forge(w)  # another host: its pid means nothing here, only the heartbeat counts
  with pytest.raises(workdir_lock.WorkdirLocked,
                     match=r"pid 4242 on host tpu-worker-3 .*heartbeat is \d+ s old; it counts "
                           r"as stale after 300 s"):
    workdir_lock.WorkdirLock(w).acquire()
  old = time.time() - workdir_lock.STALE_AFTER_S - 5
  os.utime(os.path.join(w, workdir_lock.LOCK_NAME), (old, old))
  notes = []
  workdir_lock.WorkdirLock(w).acquire(note=notes.append).release()
  assert len(notes) == 1 and re.search(r"tpu-worker-3 .*no heartbeat for 30\d s", notes[0])


def test_the_holder_refreshes_its_heartbeat_and_keeps_another_runs_lock(tmp_path):
  w = str(tmp_path / "run")
  lock = workdir_lock.WorkdirLock(w, heartbeat_s=0.05).acquire()
  path = os.path.join(w, workdir_lock.LOCK_NAME)
  os.utime(path, (1.0, 1.0))
  time.sleep(0.5)
  assert time.time() - os.path.getmtime(path) < 5  # beaten again
  # a lock that was taken over meanwhile is not ours to delete
  other = _forge(w)
  lock.release()
  assert _holder(w) == other


def test_an_unreadable_lock_file_holds_until_it_is_old(tmp_path):
  w = str(tmp_path / "run")
  os.makedirs(w)
  path = os.path.join(w, workdir_lock.LOCK_NAME)
  open(path, "w").close()  # e.g. a holder killed between creating and writing it
  with pytest.raises(workdir_lock.WorkdirLocked, match="an unreadable lock file"):
    workdir_lock.WorkdirLock(w).acquire()
  os.utime(path, (1.0, 1.0))
  workdir_lock.WorkdirLock(w).acquire(note=lambda _: None).release()


# ---------------------------------------------------------------------------- unusable workdirs

def _can_mount():
  r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                     capture_output=True)
  return r.returncode == 0


def _in_tmpfs(mount, options, script):
  """``script`` (sh) in a private mount namespace where ``mount`` is a new tmpfs: a real small
  or read-only filesystem that disappears with the command."""
  return ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mount} && {script}"]


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a folder\n")
  with pytest.raises(workdir_lock.WorkdirError, match=f"--workdir={afile} is a file, not a"):
    workdir_lock.WorkdirLock(str(afile)).acquire()
  assert afile.read_text() == "not a folder\n"


TRY_LOCK = ("import os, sys; from didr_jax.train import workdir_lock as w\n"
            "try: w.WorkdirLock(sys.argv[1]).acquire()\n"
            "except w.WorkdirError as e: print(e)\n"
            "print(sorted(os.listdir(sys.argv[1])))")


@pytest.mark.parametrize("prepare,expected", [
    ("mount -o remount,ro {mnt}", "is not writable: cannot create its lock file {mnt}/run.lock "
                                  "(Read-only file system)"),
    # a dead run's lock (old and unreadable) on a folder mounted read-only since
    ("touch -d @1 {mnt}/run.lock && mount -o remount,ro {mnt}",
     "is not writable: cannot replace the stale lock file {mnt}/run.lock (Read-only file "
     "system)"),
    ("head -c 4096 /dev/zero > {mnt}/fill; true",
     "cannot write its lock file {mnt}/run.lock (No space left on device)")],
    ids=["read_only", "read_only_stale_lock", "full"])
def test_a_read_only_or_full_workdir_is_refused(tmp_path, prepare, expected):
  """Real filesystems: root ignores file modes, not a read-only mount."""
  if not _can_mount():
    pytest.skip("needs a private mount namespace (root or user namespaces) for a real "
                "read-only / full filesystem")
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  script = f"{prepare.format(mnt=mnt)} && {sys.executable} -c '{TRY_LOCK}' {mnt}"
  r = subprocess.run(_in_tmpfs(mnt, "size=4k", script), cwd=ROOT, env=ENV, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  message, listing = r.stdout.strip().splitlines()
  assert message.endswith(expected.format(mnt=mnt)), r.stdout
  assert listing == ("['fill']" if "fill" in prepare else  # no half-written lock left
                     "['run.lock']" if "touch" in prepare else "[]")


ENOSPC_SAVE = """
import json, os, shutil, sys
import jax.numpy as jnp, numpy as np
from didr_jax.train import checkpoint
out = []
for asyncs in (False, True):
  d = os.path.join(sys.argv[1], f"checkpoints_{asyncs}")
  ck = checkpoint.Checkpointer(d, async_save=asyncs)
  state = lambda n: {"w": jnp.asarray(np.random.default_rng(0).normal(size=n).astype(np.float32))}
  ck.save(1, state(1000), {"k": 1})
  try:
    ck.save(2, state(300_000), {"k": 2})  # 1.2 MB on a 1 MB disk
    ck.close()  # an asynchronous save fails here
    out.append({"error": None})
  except checkpoint.SaveError as e:
    ck.close()
    out.append({"error": str(e), "dir": d, "files": sorted(os.listdir(d))})
  shutil.rmtree(d)
print(json.dumps(out), flush=True)
sys.stderr.flush()
os._exit(0)  # as the command lines end after a failed save: the Orbax asyncio threads can print
             # "Event loop is closed" during interpreter teardown, a race unrelated to the save
"""


def test_a_save_on_a_full_disk_is_one_error_and_leaves_no_unfinished_step(tmp_path):
  if not _can_mount():
    pytest.skip("needs a private mount namespace (root or user namespaces) for a real full "
                "filesystem")
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  r = subprocess.run(_in_tmpfs(mnt, "size=1m", f"{sys.executable} -c '{ENOSPC_SAVE}' {mnt}"),
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  for out in json.loads(r.stdout.strip().splitlines()[-1]):  # synchronous, asynchronous
    assert out["error"] and "\n" not in out["error"]
    assert (f"could not save checkpoint step 2 in {out['dir']}: No space left on device"
            in out["error"]) and "the newest complete checkpoint is step 1" in out["error"]
    assert out["files"] == ["1"]  # no 2.orbax-checkpoint-tmp left behind
  assert "Traceback" not in r.stderr and "RESOURCE_EXHAUSTED" not in r.stderr  # Orbax's logs
