"""Compile time and run time of the DDPO update on the embedded toy config, per layout.

  python benchmarks/ddpo_update_compile.py [--config=toy_ddpo] [--steps_per_call=0]
                                           [--set key=value ...]

Builds the config's trainer on one device, samples one epoch, then runs the epoch's updates
(``train_on``: the layout step + every optimizer step) ``--runs`` times (3) and prints: the compile time
inside the first run (``CompileClock``: tracing + lowering + XLA), how many XLA compilations
each run made (a second run must make none), and the seconds of the later runs (the training
time of an epoch without compilation). ``--steps_per_call`` picks ``ddpo.steps_per_call``
(0: one network call per micro-batch; 1: one per trained step, the layout before pair
micro-batches).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="toy_ddpo")
  ap.add_argument("--steps_per_call", type=int, default=0)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--set", action="append", default=[], help="dotted.key=python literal")
  args = ap.parse_args()
  import ast

  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.testing.configs import load_config
  from didr_jax.train import loop
  from didr_jax.train.logging import CompileClock

  backend_compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: backend_compiles.append(secs)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  CompileClock.install()
  overrides = {"eval.num_samples": 0}
  c0 = load_config(args.config)
  if "steps_per_call" in c0.ddpo:
    overrides["ddpo.steps_per_call"] = args.steps_per_call
  for kv in args.set:
    k, v = kv.split("=", 1)
    overrides[k] = ast.literal_eval(v)
  c = load_config(args.config, **overrides)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = trainer.init_state()
  s = c.sample
  prompts = (["a red circle", "two blue squares", "a green triangle", "a yellow square"]
             * s.batch_size)[: s.batch_size]
  parts = []
  for b in range(s.num_batches):
    levels = trainer.levels(s.eta, s.num_steps, max(int(s.sde_window[0]), 0))
    traj, _, cond, uncond = trainer.sample(trainer.policy_params(state), prompts,
                                           jax.random.key(b), levels=levels)
    n = len(prompts)
    parts.append({"latents": jnp.swapaxes(traj.latents, 0, 1),
                  "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond,
                  "levels": jnp.broadcast_to(traj.levels, (n,) + traj.levels.shape),
                  "stochastic": jnp.broadcast_to(traj.stochastic, (n,) + traj.stochastic.shape)})
  data = jax.tree.map(lambda *x: jnp.concatenate(x), *parts)
  n = data["log_probs"].shape[0]
  data.update({"timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
               "advantages": jnp.linspace(-1.0, 1.0, n), "rewards": jnp.linspace(0.0, 1.0, n)})
  data = jax.block_until_ready(data)
  k = trainer.num_train_t
  spc = trainer.steps_per_call() if hasattr(trainer, "steps_per_call") else 1
  print(f"{args.config}: {n} samples per epoch, train.batch_size {c.train.batch_size} x "
        f"grad_accum {c.train.grad_accum}, {k} trained steps per sample, {spc} per network "
        f"call, CFG in training {c.train.cfg}, backend {jax.default_backend()}", flush=True)
  for run in range(args.runs):
    before = len(backend_compiles)
    t0, p0 = time.time(), time.process_time()
    state, m = trainer.train_on(state, data, uncond, jax.random.key(10 + run))
    jax.block_until_ready(state)
    t1 = time.time()
    print(f"run {run + 1}: {t1 - t0:.1f} s (CPU {time.process_time() - p0:.1f} s), of it compiling {CompileClock.seconds(t0, t1):.1f} s "
          f"({len(backend_compiles) - before} XLA compilations: "
          f"{', '.join(f'{x:.1f}' for x in backend_compiles[before:])} s), loss "
          f"{float(m['loss']):.4g}", flush=True)


if __name__ == "__main__":
  main()
