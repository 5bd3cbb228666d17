"""One evaluation for several toy runs, side by side: the tables of README's method comparisons.

  python benchmarks/toy_table.py --run NAME=WORKDIR [--run NAME=WORKDIR ...] \\
      [--start NAME] [--teacher_steps=10,50] [--teacher_eta=0] [--eval_samples=256] \\
      [--out=docs/NAME]

Every run (a ``didr_jax.main`` workdir) is evaluated at its latest checkpoint with its own sampler
(the run's ``sample`` / ``eval`` settings: steps, eta, CFG); ``--start NAME`` also evaluates
that run's starting model (its base state: the base UNet, or the TDM student a TDM-R1 run starts
from). ``--teacher_steps`` adds the shipped toy UNet as a multi-step teacher (DDIM with
``--teacher_eta``, CFG 3: the toy DDPO sampler) at each step count. Every point is evaluated by
``train.loop.run_eval`` on the 72 held-out toy prompts with the same noise: held-out toy detector
score (GenEval-like, non-differentiable), toy shape accuracy, toy fidelity (Frechet distance of
toy-CLIP image features to rendered scenes of the same prompts; lower is closer). The reward
calls a run has spent are ``sample.batch_size x sample.num_batches x epochs``.

Writes OUT.json (every number and the command) and OUT.md (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", action="append", default=[], help="NAME=WORKDIR (repeatable)")
  p.add_argument("--start", action="append", default=[],
                 help="NAME of a --run whose starting model is evaluated too (repeatable)")
  p.add_argument("--teacher_steps", default="", help="e.g. 10,50: the toy UNet as teacher")
  p.add_argument("--teacher_eta", type=float, default=0.0)
  p.add_argument("--eval_samples", type=int, default=256)
  p.add_argument("--out", default="", help="writes OUT.json and OUT.md")
  return p.parse_args()


def _load(workdir: str):
  from didr_jax.train import config as config_lib
  with open(os.path.join(workdir, "config.json")) as f:
    return config_lib.with_defaults(json.load(f))


def main():
  args = _parse()
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.testing.configs import load_config
  from didr_jax.train import checkpoint, config as config_lib, loop

  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  runs = dict(r.split("=", 1) for r in args.run)
  unknown = set(args.start) - set(runs)
  if unknown:
    sys.exit(f"error: --start {sorted(unknown)} is not a --run name")
  rows = []

  def point(name, c, trainer, state, epochs):
    c.eval.num_samples = args.eval_samples
    c.eval.batch_size = min(64, args.eval_samples)
    t0 = time.time()
    m, _ = loop.run_eval(c, trainer, state)
    steps = c.eval.num_steps if c.eval.num_steps > 0 else c.sample.num_steps
    cfg = c.sample.guidance_scale
    if c.method in ("tdm", "tdmr1"):         # the deterministic K-step student
      steps, cfg = c.tdm.num_steps, c.tdm.student_cfg
    row = {"name": name, "method": c.method, "epochs": epochs,
           "reward_calls": c.sample.batch_size * c.sample.num_batches * epochs,
           "sampler": f"{steps} steps, eta {c.eval.eta:g}, CFG {cfg:g}",
           "toy_detector": m["toy_detector"], "toy_shape_accuracy": m["toy_shape_accuracy"],
           "toy_fidelity_fd": m["toy_fidelity_fd"], "eval_s": round(time.time() - t0, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)

  teacher_steps = [int(s) for s in args.teacher_steps.split(",") if s]
  if teacher_steps:  # one teacher (the first run's backbone), evaluated at each step count
    path = _load(next(iter(runs.values()))).backbone.path if runs else ""
    c = load_config("toy_ddpo", **{"backbone.path": path, "eval.eta": args.teacher_eta,
                                   "sample.guidance_scale": 3.0})
    config_lib.validate(c, num_devices=1)
    tr = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
    state = tr.init_state()
    for n in teacher_steps:
      c.eval.num_steps = n
      point(f"teacher, {n} steps", c, tr, state, 0)

  for name, workdir in runs.items():
    c = _load(workdir)
    config_lib.validate(c, num_devices=1)
    tr = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
    state = tr.init_state()
    if name in args.start:
      point(f"{name}: start", c, tr, state, 0)
    ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
      state, _, step = ck.restore_latest(checkpoint.abstract_like(state))
    finally:
      ck.close()
    point(name, c, tr, state, step)

  head = ("| model | epochs | reward calls | sampler | detector | shape acc. | FD (lower is "
          "closer) |\n|---|---|---|---|---|---|---|")
  lines = [f"| {r['name']} | {r['epochs']} | {r['reward_calls']} | {r['sampler']} | "
           f"{r['toy_detector']:.3f} | {r['toy_shape_accuracy']:.3f} | "
           f"{r['toy_fidelity_fd']:.1f} |" for r in rows]
  table = "\n".join([head] + lines)
  print(table)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(f"`python {' '.join(sys.argv)}`\n\n{table}\n")


if __name__ == "__main__":
  main()
