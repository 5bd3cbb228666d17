"""Toy Pareto of DIDR against DI++: toy-CLIP reward against toy fidelity and the held-out detector.

  JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache python benchmarks/didr_pareto.py [--steps=40] \\
      [--batch=16] [--out=docs/didr_pareto]

Every run starts from the shipped one-step toy generator (``didr_jax/toy/assets/toy_onestep``,
``--generator``) with the frozen toy UNet as reference and trains ``--steps`` generator updates
(each after ``didr.fake_updates`` = 2 fake-score updates) of ``configs/toy_didr.py`` with the
toy-CLIP reward, at three reward strengths per method:

  DIDR   the Diffused Reward Score by the Diffused Reward Proxy (``--drp_steps``, default 1:
         Tweedie's x0-hat, one reference call; exact on Gaussian references like the config's
         ancestral K = 2, at half its DRP cost);
  DI++   the terminal reward gradient -alpha_r grad r(x0) on the clean sample;
  DI     zero reward (DI++ at alpha_r = 0, which is DI exactly: the same code path).

Strengths. The two methods put the reward in different units (DIDR's term is (sigma^2 / alpha)
s_r divided by the DMD normaliser, DI++'s is not normalised), so equal ``reward_scale`` values
mean different pushes. By default each method's strengths are set so that the reward term's
share of the generator direction at the first step (the loss's ``reward_share`` metric,
|reward term| / (|reward term| + |distribution-matching term|), measured at strength 1 on the
first batch, which is linear in the strength: share(s) = s a / (s a + d)) is ``--shares``
(0.25, 0.5, 0.75), i.e. both methods are swept over the same range of reward weight relative to
the matching term. ``--didr_scales`` / ``--dipp_scales`` give the strengths directly instead.

Reference points (no training): the base multi-step toy UNet (10 DDIM steps, eta 1, CFG 3: the
DDPO toy's sampler and the README's base row), the teacher read as a one-step generator
(t = 399, undistilled) and the shipped one-step generator itself.

Every point is evaluated by ``train.loop.run_eval`` on the 72 held-out toy prompts with the same
noise (``--eval_samples`` images): toy-CLIP reward (the trained reward), the toy detector score
(not trained on), the toy shape accuracy and the toy fidelity (Frechet distance of toy-CLIP image
features to rendered scenes of the same prompts; lower is closer). Writes OUT.json (every number,
the commands and timings), OUT.md (the table) and OUT.png (two panels). The generators'
evaluation uses their EMA (``--ema_decay``, 0.9 for these short runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=40, help="generator updates per run")
  p.add_argument("--batch", type=int, default=16, help="generator samples per update")
  p.add_argument("--shares", default="0.25,0.5,0.75",
                 help="target step-0 reward shares of the direction (both methods)")
  p.add_argument("--didr_scales", default="", help="explicit DIDR strengths 1/beta (overrides)")
  p.add_argument("--dipp_scales", default="", help="explicit DI++ strengths alpha_r (overrides)")
  p.add_argument("--drp_steps", type=int, default=1, help="K of the DRP")
  p.add_argument("--lr", type=float, default=3e-4, help="generator and fake-score lr")
  p.add_argument("--ema_decay", type=float, default=0.9)
  p.add_argument("--eval_samples", type=int, default=256)
  p.add_argument("--generator", default="", help="start generator (default: shipped one)")
  p.add_argument("--backbone", default="", help="reference folder (default: shipped toy UNet)")
  p.add_argument("--skip_base", action="store_true", help="no multi-step base evaluation")
  p.add_argument("--out", default="docs/didr_pareto", help="writes OUT.json, OUT.md, OUT.png")
  return p.parse_args()


def _floats(s: str) -> list[float]:
  return [float(v) for v in s.split(",") if v.strip()]


def main():
  args = _parse()
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.testing.configs import load_config
  from didr_jax.train import config as config_lib, loop, prompts as prompts_lib
  from didr_jax.train.didr import DIDRTrainer

  generator = args.generator or os.path.join(loop.TOY_ASSETS, "toy_onestep")
  backbone = args.backbone or os.path.join(loop.TOY_ASSETS, "toy_unet")
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  eval_kw = {"eval.num_samples": args.eval_samples, "eval.batch_size": min(64, args.eval_samples)}

  def didr_config(mode: str, gen_path: str):
    c = load_config("toy_didr", **{
        "backbone.path": backbone, "didr.mode": mode, "didr.generator_path": gen_path,
        "didr.drp_steps": args.drp_steps, "didr.ema_decay": args.ema_decay,
        "train.learning_rate": args.lr, "didr.fake_learning_rate": args.lr,
        "sample.batch_size": args.batch, "train.batch_size": args.batch, **eval_kw})
    config_lib.validate(c, num_devices=1)
    return c

  t_all = time.time()
  c0 = didr_config("dipp", generator)
  pipe = loop.build_backbone(c0, mesh)
  rows = []
  calib = {}

  def record(name, method, scale, metrics, extra=None):
    row = {"name": name, "method": method, "reward_scale": scale,
           "toy_clip": metrics["toy_clip"], "toy_detector": metrics["toy_detector"],
           "toy_shape_accuracy": metrics["toy_shape_accuracy"],
           "toy_fidelity_fd": metrics["toy_fidelity_fd"], **(extra or {})}
    rows.append(row)
    print(json.dumps(row), flush=True)
    save()

  def save(final: bool = False):
    """Writes OUT.json / .md / .png with the points so far (a cut-short sweep keeps them)."""
    verdict = dominance(rows)
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "args": vars(args), "calibration": calib, "rows": rows, "dominance": verdict,
              "complete": final,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} "
                         f"{jax.default_backend()}, load average now {os.getloadavg()}",
              "total_s": time.time() - t_all}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(table(rows) + "\n\n" + verdict["text"] + "\n")
    plot(rows, args.out + ".png")
    return verdict

  stream_seed = 0
  prompts = prompts_lib.load_prompts("toy:train")

  def train(trainer, scale: float, name: str, method: str):
    trainer.c.didr.reward_scale = float(scale)
    state = trainer.init_state()
    stream = prompts_lib.PromptStream(prompts, seed=stream_seed)
    t0 = time.time()
    hist = []
    for step in range(args.steps):
      state, m, _ = trainer.train_step(state, stream.next(args.batch),
                                       jax.random.fold_in(jax.random.key(7), step))
      if step == 0:
        jax.block_until_ready(state)
        t_first = time.time() - t0
      hist.append({k: float(v) for k, v in m.items()})
    jax.block_until_ready(state)
    train_s = time.time() - t0
    per_step = (train_s - t_first) / max(args.steps - 1, 1)
    t1 = time.time()
    ev, _ = loop.run_eval(trainer.c, trainer, state)
    last = {k: float(np.mean([h[k] for h in hist[-10:]])) for k in hist[-1]}
    record(name, method, scale, ev, {
        "steps": args.steps, "train_s": train_s, "s_per_step": per_step,
        "eval_s": time.time() - t1,
        "train_reward_share_last10": last.get("reward_share"),
        "train_drp_reward_last10": last.get("drp_reward", last.get("reward"))})
    return state

  def calibrate(trainer) -> tuple[float, float]:
    """(a / d) of the first step's direction at strength 1: share(s) = s a / (s a + d)."""
    trainer.c.didr.reward_scale = 1.0
    state = trainer.init_state()
    stream = prompts_lib.PromptStream(prompts, seed=stream_seed)
    _, m, _ = trainer.train_step(state, stream.next(args.batch),
                                 jax.random.fold_in(jax.random.key(7), 0))
    share = float(np.clip(float(m["reward_share"]), 1e-6, 1 - 1e-6))
    return share / (1 - share), share

  def scales_for(trainer, explicit: str) -> tuple[list[float], dict]:
    if explicit:
      return _floats(explicit), {}
    ratio, share1 = calibrate(trainer)
    out = [s / (1 - s) / ratio for s in _floats(args.shares)]
    return out, {"share_at_scale_1": share1}

  # DI++ trainer: the teacher as one step, the shipped generator, DI (alpha_r = 0), DI++ sweep.
  # (All through one trainer, so its compiled sampler and updates are reused.)
  dipp = DIDRTrainer(c0, pipe, mesh)
  t0 = time.time()
  m, _ = loop.run_eval(c0, dipp, dipp.init_state())
  record("shipped one-step generator (start of every run)", "onestep", None, m,
         {"eval_s": time.time() - t0})
  t0 = time.time()
  teacher = {"params": {"generator": dipp.ref_params}, "ema": {"generator": dipp.ref_params}}
  m, _ = loop.run_eval(c0, dipp, teacher)
  record("teacher as one-step generator (t = 399, undistilled)", "teacher_onestep", None, m,
         {"eval_s": time.time() - t0})
  c1 = didr_config("didr", generator)
  didr = DIDRTrainer(c1, pipe, mesh)
  dipp_scales, calib["dipp"] = scales_for(dipp, args.dipp_scales)
  didr_scales, calib["didr"] = scales_for(didr, args.didr_scales)
  train(dipp, 0.0, f"DI ({args.steps} steps, no reward)", "di")
  # strength by strength, so a sweep cut short still holds matched DIDR / DI++ pairs
  for s_didr, s_dipp in zip(didr_scales, dipp_scales):
    train(didr, s_didr, f"DIDR 1/beta={s_didr:.3g}", "didr")
    train(dipp, s_dipp, f"DI++ alpha_r={s_dipp:.3g}", "dipp")

  # ---- the multi-step base (last: the sweep is what matters if time runs out)
  if not args.skip_base:
    cb = load_config("toy_ddpo", **{"backbone.path": backbone, "rewards": {"toy_clip": 1.0},
                                    **eval_kw})
    t0 = time.time()
    base_trainer = loop.make_trainer(cb, pipe, mesh)
    m, _ = loop.run_eval(cb, base_trainer, base_trainer.init_state())
    record("base toy UNet (10 DDIM steps, CFG 3)", "base", None, m,
           {"eval_s": time.time() - t0})
    del base_trainer

  verdict = save(final=True)
  print(table(rows))
  print(verdict["text"])
  print(f"total {time.time() - t_all:.0f} s; wrote {args.out}.json, .md, .png")


def table(rows) -> str:
  lines = ["| point | strength | toy-CLIP reward | toy fidelity FD (lower = closer) | "
           "detector score | shape accuracy |", "|---|---|---|---|---|---|"]
  for r in rows:
    s = "" if r["reward_scale"] is None else f"{r['reward_scale']:.3g}"
    lines.append(f"| {r['name']} | {s} | {r['toy_clip']:.3f} | {r['toy_fidelity_fd']:.1f} | "
                 f"{r['toy_detector']:.3f} | {r['toy_shape_accuracy']:.3f} |")
  return "\n".join(lines)


def dominance(rows) -> dict:
  """Pairwise Pareto checks of the trained reward-on points (DI, DIDR, DI++): a point A
  dominates B on (reward, FD) when A's reward >= B's and A's FD <= B's (one strictly); the same
  with the detector score (higher better) instead of FD."""
  pts = {m: [r for r in rows if r["method"] == m] for m in ("didr", "dipp")}
  out = {}
  for other_key, better in (("toy_fidelity_fd", -1), ("toy_detector", 1)):
    def dom(a, b):
      ge = a["toy_clip"] >= b["toy_clip"] and better * a[other_key] >= better * b[other_key]
      gt = a["toy_clip"] > b["toy_clip"] or better * a[other_key] > better * b[other_key]
      return ge and gt
    for x, y in (("didr", "dipp"), ("dipp", "didr")):
      n = sum(any(dom(a, b) for a in pts[x]) for b in pts[y])
      out[f"{x}_dominates_{y}_on_{other_key}"] = f"{n}/{len(pts[y])}"
  text = ("Pareto (reward vs FD): DI++ points dominated by some DIDR point "
          f"{out['didr_dominates_dipp_on_toy_fidelity_fd']}, DIDR points dominated by some DI++ "
          f"point {out['dipp_dominates_didr_on_toy_fidelity_fd']}. Reward vs detector: "
          f"{out['didr_dominates_dipp_on_toy_detector']} and "
          f"{out['dipp_dominates_didr_on_toy_detector']}.")
  return {**out, "text": text}


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  di = [r for r in rows if r["method"] == "di"]
  style = {"didr": ("DIDR", "C0", "o-"), "dipp": ("DI++", "C3", "s-")}
  for ax, key, label in ((axes[0], "toy_fidelity_fd", "toy fidelity FD (lower = closer)"),
                         (axes[1], "toy_detector", "held-out toy detector score")):
    for m, (name, color, fmt) in style.items():
      pts = di + sorted([r for r in rows if r["method"] == m], key=lambda r: r["reward_scale"])
      ax.plot([r[key] for r in pts], [r["toy_clip"] for r in pts], fmt, color=color, label=name)
    for m, marker, name in (("di", "D", "DI (no reward)"), ("base", "*", "base UNet, 10 steps"),
                            ("onestep", "^", "shipped one-step (start)"),
                            ("teacher_onestep", "v", "teacher as one-step")):
      for r in rows:
        if r["method"] == m:
          ax.plot(r[key], r["toy_clip"], marker, color="k" if m != "di" else "C2",
                  markersize=10 if m == "base" else 7, label=name, linestyle="none")
    ax.set_xlabel(label)
    ax.set_ylabel("toy-CLIP reward (trained)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("Toy DIDR vs DI++ (held-out prompts; each method at 3 reward strengths)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
