"""The exact benchmark's picture (issue 27): for a 2-D problem, exact draws of the base p_ref and
of the tilted target p_ref e^{r/beta}/Z, then each method's samples at one budget, one panel
each on the same axes, points coloured by prompt.

  python benchmarks/exact_figure.py --workdir=/tmp/exact_table [--spec=ring2d:linear] \\
      [--beta=1.0] [--budget=4096] [--seed=0] [--methods=didr,di,...] \\
      [--out=docs/exact_benchmark.png]

The methods' samples are the points ``exact_table.py`` saved when it measured each run
(``<workdir>/<method>_<spec>_s<seed>/points_<budget>.npz``: the loop's evaluation sampler at that
checkpoint), so nothing is retrained or resampled. The axes are those of the exact laws (their
0.5-99.5 percentiles, padded); a panel whose points leave them says what fraction did and where
their mean lies, and when most do, an inset draws them on their own scale with the shared box
outlined. The reward's gradient direction b (linear reward) is drawn as an arrow.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from exact_table import METHODS  # this script's folder is on sys.path when run as a script

TITLES = {"didr": "DIDR", "di": "DI", "dipp": "DI++", "ddpo": "DDPO", "rwr": "RWR",
          "crd": "CRD", "tdm": "TDM", "tdmr1": "TDM-R1"}


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/exact_table")
  p.add_argument("--spec", default="ring2d:linear")
  p.add_argument("--beta", type=float, default=1.0)
  p.add_argument("--budget", type=int, default=4096)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--num_exact", type=int, default=1024, help="exact draws per prompt")
  p.add_argument("--out", default="docs/exact_benchmark.png")
  return p.parse_args()


def main():
  args = _parse()
  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from didr_jax import exact
  from didr_jax.exact import backbone as exact_backbone, config as exact_config

  problem, reward, _ = exact_config.parse_spec(args.spec)
  prob = exact_backbone.PROBLEMS[problem]
  base = prob.make_mixture()
  if base.dim != 2:
    sys.exit(f"error: {problem} is {base.dim}-D; the figure draws 2-D problems")
  target = prob.tilted(reward, args.beta)
  prompts = range(max(base.num_prompts, 1))

  def exact_points(law, salt):
    pts = [np.asarray(exact.sample_law(law, jax.random.key(1000 * salt + p), args.num_exact,
                                       p if base.num_prompts else None)) for p in prompts]
    return np.concatenate(pts), np.repeat(np.arange(len(pts)), args.num_exact)

  panels = [("base p_ref (exact)", *exact_points(base, 1)),
            (f"tilted target, beta {args.beta:g} (exact)", *exact_points(target, 2))]
  for method in [m for m in args.methods.split(",") if m]:
    path = os.path.join(args.workdir, f"{method}_{args.spec.replace(':', '_')}_s{args.seed}",
                        f"points_{args.budget}.npz")
    if not os.path.exists(path):
      print(f"skipping {method}: no {path}")
      continue
    saved = np.load(path)
    panels.append((f"{TITLES.get(method, method)}, {args.budget} reward calls",
                   saved["points"], saved["prompt"]))

  ref = np.concatenate([panels[0][1], panels[1][1]])
  lo, hi = np.percentile(ref, 0.5, axis=0), np.percentile(ref, 99.5, axis=0)
  pad = 0.15 * (hi - lo)
  lo, hi = lo - pad, hi + pad
  cols = min(5, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
  colours = plt.get_cmap("tab10")
  for ax, (title, pts, pid) in zip(axes.flat, panels):
    for p in np.unique(pid):
      sel = pts[pid == p]
      ax.scatter(sel[:, 0], sel[:, 1], s=2, alpha=0.4, color=colours(int(p)),
                 label=f"group {p}")
    outside = np.any((pts < lo) | (pts > hi), axis=1)
    if outside.any():
      mean = pts.mean(axis=0)
      ax.text(0.02, 0.02, f"{outside.mean():.0%} outside; mean ({mean[0]:.1f}, {mean[1]:.1f})",
              transform=ax.transAxes, fontsize=7, color="crimson")
    if outside.mean() > 0.5:  # an inset on the points' own scale, the shared box outlined
      inset = ax.inset_axes([0.08, 0.3, 0.62, 0.62])
      for p in np.unique(pid):
        sel = pts[pid == p]
        inset.scatter(sel[:, 0], sel[:, 1], s=1, alpha=0.4, color=colours(int(p)))
      inset.add_patch(plt.Rectangle(lo, *(hi - lo), fill=False, color="gray", lw=0.8))
      inset.tick_params(labelsize=6)
      inset.set_aspect("equal", adjustable="datalim")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
  if reward == "linear":
    b = np.asarray(prob.linear_b, float)
    axes.flat[0].annotate("", xy=tuple(b), xytext=(0.0, 0.0),
                          arrowprops=dict(arrowstyle="->", color="black"))
    axes.flat[0].text(*b, " r = b.x", fontsize=7)
  axes.flat[0].legend(fontsize=7, markerscale=4, loc="upper left")
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(f"exact benchmark {args.spec}: base, exact tilted target and each method's "
               f"samples (seed {args.seed})", fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
