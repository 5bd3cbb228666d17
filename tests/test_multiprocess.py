"""Two jax.distributed processes on localhost gather the advantage statistics correctly and
share process 0's workdir lock."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from didr_jax.train import advantages, workdir_lock

WORKER = os.path.join(os.path.dirname(__file__), "helpers", "two_process_advantages.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_gather_advantage_statistics(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
  free, busy = str(tmp_path / "free"), str(tmp_path / "busy")
  held = workdir_lock.WorkdirLock(busy).acquire()  # a live run (this process) holds it
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), free, busy], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  held.release()
  # the lock: process 0 took the free workdir's; process 1 took none and saw process 0's; the
  # busy workdir was refused on both (process 1 without waiting for a collective that hangs)
  assert [o["locked_here"] for o in outs] == [True, False]
  assert outs[0]["lock_holder"] == outs[1]["lock_holder"] == procs[0].pid
  assert "is locked" in outs[0]["busy"] and f"pid {os.getpid()}" in outs[0]["busy"]
  assert "process 0 could not lock it" in outs[1]["busy"]
  rng = np.random.default_rng(0)
  prompts = [f"p{i % 3}" for i in range(12)]
  rewards = (rng.normal(size=12) + np.arange(12) % 3).astype(np.float32)
  for o in outs:
    assert o["processes"] == 2
    np.testing.assert_array_equal(np.float32(o["gathered"]), rewards)
    for mode in ("per_prompt", "group"):
      want = advantages.AdvantageNormalizer(mode, buffer_size=8, min_count=2)(prompts, rewards)
      np.testing.assert_allclose(o[mode], want, rtol=1e-6)
  assert outs[0]["group"] == outs[1]["group"]
  for o in outs:
    np.testing.assert_array_equal(np.float32(o["all_rows"])[:, 0], np.arange(12))
