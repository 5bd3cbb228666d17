"""A method comparison decided with seeds: each arm is a ``didr_jax.main`` command run at several
seeds, one run at a time, and the table gives each final metric's mean +- standard error and
each arm's difference from the first arm against the spread.

  python benchmarks/seeded.py --name=crd_kl --seeds=0,1,2 \\
      --arm reward="--config=configs/toy_crd.py --config.crd.kl_weight=reward" \\
      --arm advantage="--config=configs/toy_crd.py --config.crd.kl_weight=advantage" \\
      --common="--config.num_epochs=15 --config.eval_every=15" [--train_keys=corr] \\
      [--out=docs/seeded_crd_kl]

``config.seed`` changes the training noise and the prompt order; the evaluation noise is fixed
(``train.evaluation``), so every run is evaluated on the same held-out draws. Runs live in
``workdirs/seeded/NAME/ARM/seedS`` and are resumed (or skipped once finished) when the command
is rerun. The evaluation metrics are the runs' last ``eval/*`` entries; ``--train_keys`` adds the
mean of training metrics over the last third of the epochs (e.g. CRD's ``corr``, the correlation
of the implicit reward with the centred reward). A difference counts as larger than the spread
when it exceeds twice its standard error (sqrt(se_a^2 + se_b^2)).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--arm", action="append", default=[], help='NAME="main flags" (repeatable)')
  p.add_argument("--common", default="", help="flags added to every arm")
  p.add_argument("--train_keys", default="", help="training metrics to average, e.g. corr")
  p.add_argument("--root", default="workdirs/seeded")
  p.add_argument("--out", default="")
  return p.parse_args()


def history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "history.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def final_metrics(hist: list[dict], train_keys: list[str]) -> dict:
  """The last eval/* values and the late-epoch means of ``train_keys``."""
  out = {}
  for h in hist:
    out.update({k[5:]: v for k, v in h.items() if k.startswith("eval/")})
  train = [h for h in hist if any(k in h for k in train_keys)]
  late = train[len(train) - max(1, len(train) // 3):]
  for k in train_keys:
    vals = [h[k] for h in late if k in h]
    if vals:
      out[f"train_{k}"] = float(np.mean(vals))
  return out


def summarise(results: dict) -> tuple[list[dict], str]:
  """results: {arm: {seed: metrics}} -> rows and a Markdown table."""
  arms = list(results)
  keys = sorted({k for a in arms for m in results[a].values() for k in m})
  rows = []
  for k in keys:
    row = {"metric": k}
    base = None
    for a in arms:
      v = np.asarray([m[k] for m in results[a].values() if k in m], np.float64)
      mean = float(v.mean()) if v.size else float("nan")
      se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
      row[a] = {"mean": mean, "se": se, "n": int(v.size), "values": v.tolist()}
      if base is None:
        base = row[a]
      else:
        diff = mean - base["mean"]
        se_d = float(np.hypot(se, base["se"]))
        row[a]["diff"], row[a]["diff_se"] = diff, se_d
        row[a]["beyond_spread"] = bool(abs(diff) > 2 * se_d)
    rows.append(row)
  head = "| metric | " + " | ".join(arms) + " |"
  lines = [head, "|" + "---|" * (1 + len(arms))]
  for row in rows:
    cells = []
    for a in arms:
      r = row[a]
      cell = f"{r['mean']:.4g} +- {r['se']:.2g} (n={r['n']})"
      if "diff" in r:
        cell += (f"; diff {r['diff']:+.3g} +- {r['diff_se']:.2g}"
                 f"{' (beyond spread)' if r['beyond_spread'] else ''}")
      cells.append(cell)
    lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
  return rows, "\n".join(lines)


def main():
  args = _parse()
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  arms = dict(a.split("=", 1) for a in args.arm)
  train_keys = [k for k in args.train_keys.split(",") if k]
  results, times = {}, {}
  for arm, flags in arms.items():
    results[arm] = {}
    for seed in seeds:
      workdir = os.path.join(args.root, args.name, arm, f"seed{seed}")
      cmd = ([sys.executable, "-m", "didr_jax.main"] + shlex.split(flags) +
             shlex.split(args.common) + [f"--workdir={workdir}", f"--config.seed={seed}"])
      print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
      t0 = time.time()
      done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      times[f"{arm}/seed{seed}"] = time.time() - t0
      if done.returncode != 0:
        print(f"error: {arm} seed {seed} exited {done.returncode}: "
              f"{done.stderr.strip().splitlines()[-1:]}", flush=True)
        continue
      results[arm][seed] = final_metrics(history(workdir), train_keys)
      print(json.dumps({"arm": arm, "seed": seed, **results[arm][seed]}), flush=True)
  rows, md = summarise(results)
  print(md)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    command = "python benchmarks/seeded.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with open(args.out + ".json", "w") as f:
      json.dump({"command": command, "results": {a: {str(s): m for s, m in r.items()}
                                                 for a, r in results.items()},
                 "rows": rows, "seconds": times,
                 "load_average_at_end": os.getloadavg()}, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(f"`{command}`\n\n{md}\n")


if __name__ == "__main__":
  main()
