"""Does TDM-R1's surrogate reward learn the reward? A probe on the toy, the generator held fixed.

  python benchmarks/tdmr1_surrogate_probe.py [--iters=60] [--probe_every=20] \\
      [--set tdm.surrogate_learning_rate=3e-5 ...] [--out=docs/tdmr1_probe]

Starts ``configs/toy_tdmr1.py`` (the shipped 4-step toy student, the non-differentiable toy
detector as the reward) and runs only the surrogate's DGPO step (``TDMR1Trainer._surrogate_phase``)
on fresh student rollouts for ``--iters`` iterations; the student and the fake score do not move.
Every ``--probe_every`` iterations it measures the surrogate phi on a fixed held-out set of
student rollouts (``--probe_prompts`` toy training prompts never drawn by the training stream x
``sample.group_size`` rollouts, rewards from the config's reward, the detector by default):

- **implicit reward**: r_i = -(l_phi,i - l_ref,i), the per-sample denoising-loss gap of phi to
  the reference (the quantity DGPO trains), averaged over ``--draws`` re-noisings of the final
  clean state x_K to tau in [t_min, T) with noise shared within each group (as in training);
  reported as its Pearson correlation with the detector reward after removing each prompt's
  mean from both (``corr_within``: what a group preference can learn), and across all samples;
- **generator direction**: the surrogate's term of the generator target,
  delta = x0_phi^CFG - x0_ref^CFG at the same re-noised states (averaged over the draws); the
  clean samples are moved to x_K + s delta / mean|delta| for ``--step_sizes`` s and re-scored
  by the reward (``uphill_s``: mean reward after minus before); ``random_s`` is the same move
  along a random direction of the same per-sample norm (the control);
- **drift**: mean |out_phi - out_ref|^2 (``drift``) and mean l_phi - l_ref (``gap``).

Prints one JSON line per probe and writes OUT.json. Options are config overrides (``--set
KEY=VALUE``, repeatable) of the toy TDM-R1 config, so each setting is probed the same way.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--iters", type=int, default=60, help="surrogate iterations")
  p.add_argument("--probe_every", type=int, default=20)
  p.add_argument("--probe_prompts", type=int, default=16, help="held-out probe prompts")
  p.add_argument("--draws", type=int, default=4, help="re-noisings per probe sample")
  p.add_argument("--step_sizes", default="0.05,0.1,0.2", help="moves along delta (mean-abs units)")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="writes OUT.json")
  return p.parse_args()


def _value(s: str):
  try:
    return ast.literal_eval(s)
  except (ValueError, SyntaxError):
    return s


def _corr(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  den = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / den) if den > 0 else 0.0


def main():
  args = _parse()
  from didr_jax.diffusion import guidance
  from didr_jax.losses import tdm as tdm_losses, tdm_r1 as r1_losses
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.rewards import AsyncRewards, from_config
  from didr_jax.testing.configs import load_config
  from didr_jax.train import common, loop, prompts as prompts_lib
  from didr_jax.train.tdm_r1 import TDMR1Trainer

  overrides = dict(kv.split("=", 1) for kv in args.set)
  c = load_config("toy_tdmr1", **{k: _value(v) for k, v in overrides.items()})
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  pipe = loop.build_backbone(c, mesh)
  tr = TDMR1Trainer(c, pipe, mesh)
  state = tr.init_state()
  rewarder = AsyncRewards(from_config(dict(c.rewards)))
  detector = from_config(dict(c.rewards))     # the trained reward scores the probe
  g = int(c.sample.group_size)
  d = c.tdm

  # held-out probe set: the last probe_prompts training prompts (the stream draws from the front
  # of a shuffled list, so use a disjoint slice), group_size rollouts each, fixed noise
  train_prompts = prompts_lib.load_prompts("toy:train")
  probe_prompts = [p for p in train_prompts[-args.probe_prompts:] for _ in range(g)]
  stream = prompts_lib.PromptStream(train_prompts[: -args.probe_prompts], seed=args.seed)
  b = len(probe_prompts)
  cond = tr._shard(pipe.encode(probe_prompts), b)
  uncond = tr.negative(b)
  traj, images = tr.student_rollout(state["params"]["generator"], cond, jax.random.key(1000 + args.seed))
  rewards = np.asarray(detector(np.asarray(images), probe_prompts), np.float64)
  ids = jnp.arange(b, dtype=jnp.int32) // g
  groups = b // g
  x0 = traj.latents[-1]
  times = jnp.asarray(tr.grid.times)
  lo, hi = tr.grid.tau_range(times[-1], float(d.t_min_reward), float(d.tau_max))
  a_s, s_s = tr._alpha_sigma(times[-1])

  @jax.jit
  def measure(phi, ref, rng):
    """Per-sample implicit reward, delta (averaged over draws), drift and gap."""
    def one(k):
      k_t, k_e = jax.random.split(k)
      tau = r1_losses.group_shared_uniform(k_t, ids, groups, lo, hi, integer=tr.grid.integer)
      eps = r1_losses.group_shared_normal(k_e, ids, groups, x0.shape[1:])
      x_tau, target = tdm_losses.renoised_target(x0, x0, eps, a_s, s_s, *tr._alpha_sigma(tau),
                                                 tr.ptype)
      o_phi, o_ref = tr._out(phi, x_tau, tau, cond), tr._out(ref, x_tau, tau, cond)
      u_phi, u_ref = tr._out(phi, x_tau, tau, uncond), tr._out(ref, x_tau, tau, uncond)
      l_phi, l_ref, _, dist = r1_losses.surrogate_losses(o_phi, o_ref, o_ref, target)
      to_x0 = lambda o: tr._x0(o, x_tau, tau)
      s = jnp.float32(d.surrogate_cfg)
      delta = (guidance.cfg(to_x0(u_phi), to_x0(o_phi), s)
               - guidance.cfg(to_x0(u_ref), to_x0(o_ref), s))
      return -(l_phi - l_ref), delta, dist
    r, delta, dist = jax.lax.map(one, jax.random.split(rng, args.draws))
    return r.mean(0), delta.mean(0), dist.mean()

  steps = [float(s) for s in args.step_sizes.split(",")]
  centered = lambda v: v - np.repeat(v.reshape(groups, g).mean(1), g)

  def probe(it):
    r, delta, drift = measure(state["params"]["surrogate"], tr.ref_params,
                              jax.random.key(2000 + args.seed))
    r = np.asarray(r, np.float64)
    row = {"iter": it, "corr_within": _corr(centered(r), centered(rewards)),
           "corr_all": _corr(r, rewards), "drift": float(drift), "gap": float(-r.mean()),
           "reward_probe_mean": float(rewards.mean())}
    delta = np.asarray(delta)
    norm = np.abs(delta).mean(axis=tuple(range(1, delta.ndim)), keepdims=True) + 1e-12
    rnd = np.asarray(jax.random.normal(jax.random.key(3000 + args.seed), delta.shape))
    rnd = rnd / np.abs(rnd).mean(axis=tuple(range(1, rnd.ndim)), keepdims=True)
    row["delta_mean_abs"] = float(norm.mean())
    for s in steps:
      for name, direction in (("uphill", delta / norm), ("random", rnd)):
        moved = pipe.decode(pipe.frozen(), jnp.asarray(x0 + s * direction, jnp.float32))
        after = np.asarray(detector(np.asarray(moved), probe_prompts), np.float64)
        row[f"{name}_{s:g}"] = float(after.mean() - rewards.mean())
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}),
          flush=True)
    return row

  t0 = time.time()
  rows = [probe(0)]
  train_rewards = []
  for it in range(1, args.iters + 1):
    rng = jax.random.fold_in(jax.random.key(args.seed), it)
    k_roll, k_s = jax.random.split(rng)
    prompts = stream.next(c.sample.batch_size // g, g)
    bc = len(prompts)
    cnd = tr._shard(pipe.encode(list(prompts)), bc)
    tj, imgs = tr.student_rollout(state["params"]["generator"], cnd, k_roll)
    future = rewarder.submit(common.host_rows(imgs), prompts)
    state, ctx, _ = tr._before_boundaries(state, tj, future, k_s)
    train_rewards.append(float(np.mean(future.result())))
    for m in range(int(d.boundaries_per_iter)):
      state, sm = tr._surrogate_phase(state, ctx, cnd, jax.random.fold_in(k_s, m))
    if it % args.probe_every == 0 or it == args.iters:
      row = probe(it)
      row.update({k: float(v) for k, v in sm.items()})
      row["train_reward_mean"] = float(np.mean(train_rewards))
      rows.append(row)
  rewarder.close()
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                 "overrides": overrides, "rows": rows, "total_s": time.time() - t0,
                 "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()}"},
                f, indent=2)


if __name__ == "__main__":
  main()
