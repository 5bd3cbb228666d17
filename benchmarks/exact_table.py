"""Every method on the exact Gaussian-mixture benchmark (issue 27), measured against the exact
reward-tilted optimum p_ref e^{r/beta}/Z and the untilted base, at equal budgets of reward calls.

  python benchmarks/exact_table.py [--methods=didr,di,dipp,ddpo,rwr,crd,tdm,tdmr1] \\
      [--spec=ring2d:linear] [--beta=1.0] [--budgets=0,1024,4096] [--seeds=5] \\
      [--eval_samples=1024] [--workdir=/tmp/exact_table] [--out=docs/exact_table] \\
      [--arm=ddpo_kl1=ddpo:ddpo.kl_beta=1.0 ...]

Each (method, seed) is ``configs/exact_<method>.py`` run by the shared loop (``loop.train``, the
code path of ``python -m didr_jax.main``) into its own workdir, first to the smallest budget, then
resumed to each larger one; after each, the latest checkpoint is restored and the loop's own
evaluation sampler (``loop.run_eval``) draws ``--eval_samples`` points over the prompts (saved
as ``<workdir>/points_<budget>.npz``, the points and their prompt ids, for ``exact_figure.py``).
Budget 0 measures the untrained starting model (no checkpoint). Reward calls = ``sample.batch_size
x sample.num_batches x epochs`` (the samples scored per epoch). Seeds are the outer loop, so a
run cut short holds every method at the seeds it finished; OUT.json is rewritten after each row.
Metrics (``didr_jax.exact.evaluate``, per prompt then averaged): energy distance and sliced W2 to
exact draws of the tilted target and of the base, the component-weight TV distance, the mean
reward (the exact target's alongside). Mean +- standard error over seeds.

Strength: DIDR / DI++ use reward_scale = 1/beta; DDPO (group-normalised advantages + trajectory
KL ``ddpo.kl_beta``), RWR, CRD and TDM-R1 have no parameter that equals beta in raw reward units,
so their landing point is measured against the same target without being its optimiser; DI and
TDM do not use the reward (their target is the base).

Writes OUT.json (every number and the command) and OUT.md (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

METHODS = {  # name -> (config, overrides)
    "didr": ("exact_didr", {}),
    "di": ("exact_didr", {"didr.mode": "di"}),
    "dipp": ("exact_didr", {"didr.mode": "dipp"}),
    "ddpo": ("exact_ddpo", {}),
    "rwr": ("exact_ddpo", {"ddpo.objective": "rwr"}),
    "crd": ("exact_crd", {}),
    "tdm": ("exact_tdm", {}),
    "tdmr1": ("exact_tdmr1", {}),
}


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--spec", default="ring2d:linear", help="problem[:reward[:flow]]")
  p.add_argument("--beta", type=float, default=1.0)
  p.add_argument("--budgets", default="0,1024,4096",
                 help="reward calls, increasing; 0 = the untrained starting model")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--eval_samples", type=int, default=1024)
  p.add_argument("--workdir", default="/tmp/exact_table")
  p.add_argument("--out", default="")
  p.add_argument("--arm", action="append", default=[],
                 help="NAME=METHOD:key=value[,key=value]: an extra method, METHOD's config with "
                      "these overrides (values read as JSON, else strings); repeatable")
  return p.parse_args()


def add_arm(spec: str):
  """Registers ``--arm`` NAME=METHOD:key=value[,key=value] in ``METHODS``."""
  name, _, rest = spec.partition("=")
  method, _, sets = rest.partition(":")
  if not name or method not in METHODS:
    raise ValueError(f"--arm {spec!r}: expected NAME=METHOD:key=value,... with METHOD one of "
                     f"{', '.join(METHODS)}")
  config, overrides = METHODS[method]
  overrides = dict(overrides)
  for item in filter(None, sets.split(",")):
    key, _, value = item.partition("=")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  METHODS[name] = (config, overrides)


def _load_config(name: str, spec: str, overrides: dict):
  import importlib.util

  from didr_jax.testing.configs import CONFIGS
  module_spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  mod = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(mod)
  c = mod.get_config(spec)
  c.update_from_flattened_dict(overrides)
  return c


def measure(c, workdir: str, target, base, reward_fn, eval_samples: int, seed: int,
            restore: bool = True, save: str = "") -> dict:
  """Restores ``workdir``'s latest checkpoint (``restore``; else the untrained starting state)
  and measures the loop's evaluation samples, saving them to ``save`` (.npz) when given."""
  import jax

  from didr_jax import exact
  from didr_jax.exact import backbone as exact_backbone
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.train import checkpoint, loop
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = trainer.init_state()
  if restore:
    ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
      state, _, _ = ck.restore_latest(checkpoint.abstract_like(state))
    finally:
      ck.close()
  c.eval.num_samples = eval_samples
  c.eval.batch_size = min(eval_samples, 256)
  _, images = loop.run_eval(c, trainer, state)
  pts = np.asarray(exact_backbone.points(images))
  prompts = loop.eval_prompts(c)
  if save:
    np.savez(save, points=pts, prompt=np.array([int(q.split()[-1]) for q in prompts]))
  per_prompt = []
  for p, text in enumerate(sorted(set(prompts))):
    mask = np.array([q == text for q in prompts])
    pid = int(text.split()[-1])
    per_prompt.append(exact.evaluate(pts[mask], {"target": target, "base": base},
                                     jax.random.key(seed * 1000 + p), reward=reward_fn,
                                     prompt=pid, num_reference=4096))
  keys = [k for k, v in per_prompt[0].items() if np.isscalar(v)]
  return {k: float(np.mean([m[k] for m in per_prompt])) for k in keys}


def main():
  args = _parse()
  import jax

  from didr_jax import exact
  from didr_jax.exact import backbone as exact_backbone, config as exact_config
  from didr_jax.train import config as config_lib, loop

  problem, reward, _ = exact_config.parse_spec(args.spec)
  prob = exact_backbone.PROBLEMS[problem]
  base = prob.make_mixture()
  target = prob.tilted(reward, args.beta)
  reward_fn = prob.rewards()[reward]
  for spec in args.arm:
    try:
      add_arm(spec)
    except ValueError as e:
      sys.exit(f"error: {e}")
  budgets = sorted(int(b) for b in args.budgets.split(","))
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - set(METHODS)
  if unknown:
    sys.exit(f"error: --methods {sorted(unknown)} unknown; known: {', '.join(METHODS)}")
  exact_reward = float(np.mean([reward_fn(exact.sample_law(target, jax.random.key(7), 4096, p))
                                 for p in range(base.num_prompts)]))
  run = {"command": "python " + " ".join(sys.argv), "commit": _commit(),
         "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg(),
         "cpus": os.cpu_count(), "target_reward": exact_reward, "rows": []}
  rows = run["rows"]
  t_start = time.time()
  for seed in range(args.seeds):
    for method in methods:
      name, overrides = METHODS[method]
      workdir = os.path.join(args.workdir, f"{method}_{args.spec.replace(':', '_')}_s{seed}")
      for budget in budgets:
        c = _load_config(name, args.spec, {**overrides, "seed": seed})
        if c.method == "didr" and c.didr.mode != "di":
          c.didr.reward_scale = 1.0 / args.beta
        per_epoch = c.sample.batch_size * c.sample.num_batches
        c.num_epochs = max(1, budget // per_epoch)
        c.checkpoint_every = c.num_epochs
        config_lib.validate(c)
        t0 = time.time()
        if budget > 0:
          loop.train(c, workdir)
        os.makedirs(workdir, exist_ok=True)
        m = measure(c, workdir, target, base, reward_fn, args.eval_samples, seed,
                    restore=budget > 0, save=os.path.join(workdir, f"points_{budget}.npz"))
        row = {"method": method, "seed": seed, "budget": budget,
               "reward_calls": c.num_epochs * per_epoch if budget > 0 else 0, **m,
               "seconds": round(time.time() - t0, 1), "load1": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
          run["wall_s"] = round(time.time() - t_start, 1)
          _write(args.out + ".json", run)
  run["wall_s"] = round(time.time() - t_start, 1)
  run["load_end"] = os.getloadavg()
  table = _table(rows, methods, budgets, exact_reward, args)
  print(table)
  if args.out:
    _write(args.out + ".json", run)
    with open(args.out + ".md", "w") as f:
      f.write(f"`python {' '.join(sys.argv)}`\n\n{table}\n")


def _write(path: str, run: dict):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(run, f, indent=1)
  os.replace(path + ".tmp", path)


def _commit() -> str:
  import subprocess
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except OSError:
    return ""


def _table(rows, methods, budgets, exact_reward, args) -> str:
  cols = [("target/energy", "energy to target"), ("target/sliced_w2", "SW2 to target"),
          ("target/weight_tv", "weight TV to target"), ("base/energy", "energy to base"),
          ("base/sliced_w2", "SW2 to base"), ("reward", "reward")]
  head = ("| method | reward calls | n | " + " | ".join(c[1] for c in cols) + " |\n|---|---|---|"
          + "---|" * len(cols))
  lines = []
  for method in methods:
    for budget in budgets:
      sel = [r for r in rows if r["method"] == method and r["budget"] == budget]
      if not sel:
        continue
      cells = []
      for key, _ in cols:
        v = np.array([r[key] for r in sel])
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        cells.append(f"{v.mean():.3f} +- {se:.3f}")
      calls = sel[0]["reward_calls"] if budget > 0 else "0 (start)"
      lines.append(f"| {method} | {calls} | {len(sel)} | " + " | ".join(cells) + " |")
  n = len({r["seed"] for r in rows})
  note = (f"\n\n{args.spec}, beta {args.beta:g}, {n} seeds (mean +- standard error); the exact "
          f"target's mean reward: {exact_reward:.3f}")
  return "\n".join([head] + lines) + note


if __name__ == "__main__":
  main()
