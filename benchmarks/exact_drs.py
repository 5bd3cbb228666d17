"""DIDR's DRS estimates against the exact Diffused Reward Score of a Gaussian mixture (issue 27).

  python benchmarks/exact_drs.py [--problem=ring2d] [--scales=0.1,1] [--times=100,400,700]

On the exact backbone (``didr_jax.exact``: its network at initialisation is the exact denoiser),
for the linear reward b.x of ``--problem`` (prompt 0), 256 points x_t from the joint at each VP
timestep: the relative RMS error ||s_DRP - s_r|| / ||s_r|| of ``losses.didr.diffused_reward_score``
(Tweedie K = 1; the deterministic K = 2 DRP; ancestral K = 4 / 8 with 32 / 128 softmax draws)
against s_r = (alpha / sigma^2)(E*[x0 | x_t] - E[x0 | x_t]) of the closed-form tilted mixture,
1/beta = each of ``--scales``. Accuracy, not timing. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

SETTINGS = ((1, 1, 0.0), (2, 1, 0.0), (4, 32, 1.0), (8, 128, 1.0))   # (K, draws, eta)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--problem", default="ring2d")
  p.add_argument("--scales", default="0.1,1")
  p.add_argument("--times", default="100,400,700")
  args = p.parse_args()
  from didr_jax import exact
  from didr_jax.exact import backbone as eb
  from didr_jax.losses import didr as didr_losses
  from didr_jax.train import common

  bb = eb.build(f"exact_{args.problem}")
  net = common.Net.of(bb.model)
  model = net.bind(net.params)
  process = didr_losses.vp_process(bb.schedule)
  b = np.asarray(eb.PROBLEMS[args.problem].linear_b)
  reward = exact.linear_reward(b)
  n, d = 256, bb.dim
  cond = jnp.zeros((n,), jnp.int32)
  x0 = exact.sample(bb.mixture, jax.random.key(0), n, prompt=0)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  head = ("| 1/beta | t | |s_r| (RMS) | " + " | ".join(
      f"K={k}, M={m}, eta={e:g}" for k, m, e in SETTINGS) + " |\n|---|---|---|"
      + "---|" * len(SETTINGS))
  lines = []
  for scale in (float(s) for s in args.scales.split(",")):
    tilted = exact.tilt_linear(bb.mixture, b, 1.0 / scale)
    for t in (int(s) for s in args.times.split(",")):
      a, s = bb.alpha_sigma(jnp.int32(t))
      x_t = a * x0 + s * noise
      drs = exact.exact_drs(bb.mixture, tilted, x_t, a, s, cond)
      norm = float(jnp.linalg.norm(drs))
      cells = []
      for k, m, eta in SETTINGS:
        est, _ = didr_losses.diffused_reward_score(
            lambda x, tt: bb.denoise(model, x, tt, cond, None, 1.0),
            lambda x: reward(x.reshape(n, d)), x_t.reshape(n, 1, 1, d), jnp.full((n,), t),
            process, reward_scale=scale, num_steps=k, num_draws=m, eta=eta,
            rng=jax.random.key(2))
        cells.append(f"{float(jnp.linalg.norm(est.reshape(n, d) - drs)) / norm:.3f}")
      lines.append(f"| {scale:g} | {t} | {norm / np.sqrt(n):.3f} | " + " | ".join(cells) + " |")
  print("\n".join([head] + lines))


if __name__ == "__main__":
  main()
