"""Worker of test_multiprocess: one of two jax.distributed CPU processes on localhost.

Each process holds its own slice of the epoch's prompts and rewards; the advantage statistics
must be computed from the gathered global batch, identically on both processes."""

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
print(json.dumps({"pid": pid, "processes": jax.process_count(), "gathered": glob.tolist(),
                  **out}), flush=True)
