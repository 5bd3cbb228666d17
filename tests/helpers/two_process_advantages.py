"""Worker of test_multiprocess: one of two jax.distributed CPU processes on localhost.

Each process holds its own slice of the epoch's prompts and rewards; the advantage statistics
must be computed from the gathered global batch, identically on both processes; evaluation
images sharded over the processes are gathered whole on each."""

import json
import sys

import jax

port, pid = sys.argv[1], int(sys.argv[2])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

from didr_jax.train import advantages  # noqa: E402

rng = np.random.default_rng(0)
prompts = [f"p{i % 3}" for i in range(12)]
rewards = (rng.normal(size=12) + np.arange(12) % 3).astype(np.float32)
lo, hi = pid * 6, (pid + 1) * 6
local_rewards = rewards[lo:hi]
glob = advantages.gather_host(local_rewards)
out = {}
for mode in ("per_prompt", "group"):
  norm = advantages.AdvantageNormalizer(mode, buffer_size=8, min_count=2)
  out[mode] = norm(prompts, glob).tolist()
# evaluation gathers a batch-sharded global array (one row block per process) on every host
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from didr_jax.train import common  # noqa: E402
mesh = Mesh(np.array(jax.devices()), ("data",))
local = np.arange(lo, hi, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
images = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
out["all_rows"] = common.all_rows(images).tolist()
# the workdir lock of a run: process 0 takes it for all (test_workdir_lock); a workdir that
# another run holds is refused on every process together
from didr_jax.train import workdir_lock  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
free, busy = sys.argv[3], sys.argv[4]
lock = workdir_lock.lock_for_run(free)
with open(f"{free}/{workdir_lock.LOCK_NAME}") as f:
  out["lock_holder"], out["locked_here"] = json.load(f)["pid"], lock is not None
multihost_utils.sync_global_devices("read the lock")
if lock is not None:
  lock.release()
try:
  workdir_lock.lock_for_run(busy)
except workdir_lock.WorkdirError as e:
  out["busy"] = str(e)
print(json.dumps({"pid": pid, "processes": jax.process_count(), "gathered": glob.tolist(),
                  **out}), flush=True)
