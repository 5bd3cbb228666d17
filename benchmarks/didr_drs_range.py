"""How large is DIDR's reward term where the generator uses it? The x0-unit Diffused Reward Score
(sigma^2 / alpha) s_r, whose exact value E_tilted[x0 | x_t] - E[x0 | x_t] lies within the data
range's width (docs/methods.md §3), measured on the shipped toy (``configs/toy_didr.py``: the
one-step toy generator's samples, the toy UNet reference at CFG 3, the toy-CLIP reward, 1/beta 1).

  python benchmarks/didr_drs_range.py [--batch=32] [--times=250,500,750,900,980] \\
      [--set didr.drp_steps=1 ...] [--out=docs/didr_drs_range.json]

For each t: mean |term| per pixel, the fraction of pixels outside [-w, w] (w = the data range's
width, 2 for images in [-1, 1]), the largest |term|, and the fraction of pixels where the
reference's own x0 estimate lies outside [-1.5, 1.5]; for the raw DRP estimate ("raw") and for
what the generator actually uses ("used": ``losses.didr.generator_loss``'s term after the
config's bound). Also the share of the reward push (sum of |used term| over t) per t.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--times", default="250,500,750,900,980")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  p.add_argument("--out", default="")
  return p.parse_args()


def measure(trainer, prompts, times, seed: int = 0) -> list[dict]:
  """Rows of the statistics above for one batch of generator samples at each t in ``times``."""
  from didr_jax.diffusion import param
  from didr_jax.losses import didr as didr_losses
  from didr_jax.train import one_step
  c = trainer.c
  b = len(prompts)
  cond, module, features = trainer.inputs(prompts)
  rng = jax.random.key(seed)
  z = trainer._noise(jax.random.fold_in(rng, 0), b)
  x0 = one_step.generate(trainer.bb, trainer.net.bind(trainer.init_state()["params"]["generator"]),
                         z, cond, trainer.spec)
  ref_fn = trainer._score_fn(trainer.ref_params, cond, trainer.uncond, c.didr.ref_cfg)
  frozen = trainer.bb.frozen()
  reward_fn = lambda x: trainer.reward.jax_fn(module, trainer.bb.decode(frozen, x), features)
  cfg = trainer.loss_cfg
  # the toy's images are in [-1, 1]; the bound under test is the config's (cfg.data_range)
  lo, hi = (-1.0, 1.0) if trainer.data_range is None else trainer.data_range
  width = hi - lo
  rows = []
  for i, t_int in enumerate(times):
    t = jnp.full((b,), t_int, jnp.int32 if trainer.process.integer_time else jnp.float32)
    eps = jax.random.normal(jax.random.fold_in(rng, 100 + i), x0.shape, jnp.float32)
    alpha, sigma = trainer.process.coeffs(t, x0)
    x_t = (param.bcast(alpha, x0) * x0 + param.bcast(sigma, x0) * eps).astype(x0.dtype)
    x0_ref = param.to_x0(ref_fn(x_t, t), x_t, alpha, sigma, trainer.process.prediction_type)
    s_r, _ = didr_losses.diffused_reward_score(
        ref_fn, reward_fn, x_t, t, trainer.process, reward_scale=cfg.reward_scale,
        num_steps=cfg.num_steps, num_draws=cfg.num_draws, eta=cfg.eta,
        draw_weights=cfg.draw_weights, rng=jax.random.fold_in(rng, 200 + i), remat=False,
        clip=cfg.data_range if cfg.drp_clip else None)
    raw = np.asarray(param.x0_delta_from_score_delta(s_r, alpha, sigma))
    used = np.asarray(didr_losses.bounded_drs_term(jnp.asarray(raw), x0_ref, cfg.data_range))
    x0r = np.asarray(x0_ref)
    row = {"t": int(t_int), "ref_x0_outside_1.5": float(np.mean(np.abs(x0r) > 1.5))}
    for name, v in (("raw", raw), ("used", used)):
      row.update({f"{name}_mean_abs": float(np.mean(np.abs(v))),
                  f"{name}_outside_range": float(np.mean(np.abs(v) > width + 1e-6)),
                  f"{name}_max_abs": float(np.max(np.abs(v)))})
    rows.append(row)
    print(json.dumps(row), flush=True)
  total = sum(r["used_mean_abs"] for r in rows)
  for r in rows:
    r["used_share_of_push"] = r["used_mean_abs"] / max(total, 1e-30)
  return rows


def main():
  args = _parse()
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.testing.configs import load_config
  from didr_jax.train import config as config_lib, loop, prompts as prompts_lib
  from didr_jax.train.didr import DIDRTrainer
  import ast

  def value(v: str):
    try:
      return ast.literal_eval(v)
    except (ValueError, SyntaxError):
      return v
  overrides = {k: value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
  c = load_config("toy_didr", **overrides)
  config_lib.validate(c, num_devices=1)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = DIDRTrainer(c, loop.build_backbone(c, mesh), mesh)
  prompts = prompts_lib.PromptStream(prompts_lib.load_prompts("toy:train"), seed=0).next(args.batch)
  rows = measure(trainer, prompts, [float(t) for t in args.times.split(",")], args.seed)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"command": "python benchmarks/didr_drs_range.py " + " ".join(
          f"--{k}={v}" for k, v in vars(args).items() if k != "set") + (
          " --set " + " ".join(args.set) if args.set else ""),
                 "machine": f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}",
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
