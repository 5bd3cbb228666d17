"""XLA:CPU compile time of a tiny SDXL UNet training program, default back end against -O0.

  python benchmarks/compile_flags.py [--flags="--xla_backend_optimization_level=0"]

Measures what XLA:CPU's LLVM back end at ``--xla_backend_optimization_level=0`` buys for a
compile-bound program: the value-and-gradient of three chained UNet calls on the tiny random SDXL folder the tests
use, compiled in a fresh subprocess per setting (the two settings alternate, ``--repeats`` each),
and prints tracing + lowering time, XLA compile time, the run time of the compiled program and
the loss, which must agree between the settings (the same program, compiled differently).

Measured on this project's 2-core CPU (2026-12-01, other jobs running): XLA compile 0.48x at -O0,
run time 1.9x. The test suite runs at -O0 (``tests/conftest.py``): the sum of its test times fell
from 4623 s to 3696 s (2026-12-02, same load); the run-bound tests on the shipped toy models got
slower, and three comparisons of two float32 computations of the same value (fake = reference
gives a zero gradient; one network call per micro-batch equals the per-step calls; VAE remat
gradients) moved by float32 rounding (1e-7 .. 3e-8), so their tolerances were widened to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from didr_jax.models import unet as unet_lib
folder = sys.argv[1]
u = unet_lib.load_unet(os.path.join(folder, "unet"))
cfg = json.load(open(os.path.join(folder, "unet", "config.json")))
graph, params = nnx.split(u)
b = 2
x = jnp.ones((b, 16, 16, cfg["in_channels"]))
ehs = jnp.ones((b, 8, cfg["cross_attention_dim"]))
te = jnp.ones((b, cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]))
ti = jnp.ones((b, 6))

def loss(p, x):
  m = nnx.merge(graph, p)
  for t in (900.0, 600.0, 300.0):
    x = x - 0.1 * m(x, jnp.full((b,), t), ehs, text_embeds=te, time_ids=ti)
  return jnp.mean(x ** 2)

f = jax.jit(jax.value_and_grad(loss))
t0 = time.perf_counter(); lowered = f.lower(params, x); t1 = time.perf_counter()
compiled = lowered.compile(); t2 = time.perf_counter()
jax.block_until_ready(compiled(params, x))
t3 = time.perf_counter()
for _ in range(3):
  v = jax.block_until_ready(compiled(params, x))
t4 = time.perf_counter()
print(json.dumps({"lower_s": t1 - t0, "xla_s": t2 - t1, "run_ms": (t4 - t3) / 3 * 1e3,
                  "loss": float(v[0])}))
"""


def _run(folder: str, flags: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run([sys.executable, "-c", _CHILD, folder], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--flags", default="--xla_backend_optimization_level=0")
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  from didr_jax.testing import tiny
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "sdxl")
    tiny.save_tiny_sd(folder, kind="sdxl", seed=5)
    runs = {"default": [], args.flags: []}
    for _ in range(args.repeats):
      for flags in runs:
        runs[flags].append(_run(folder, "" if flags == "default" else flags))
  base = min(r["xla_s"] for r in runs["default"])
  for flags, rs in runs.items():
    best = min(rs, key=lambda r: r["xla_s"])
    print(f"{flags:40s} lower {best['lower_s']:5.1f} s  XLA compile {best['xla_s']:5.1f} s "
          f"({best['xla_s'] / base:.2f}x)  run {best['run_ms']:6.0f} ms  loss {best['loss']:.6f}")


if __name__ == "__main__":
  main()
