"""Bias, variance and cost of the Diffused Reward Proxy's variants where the exact DRS is known: a
Gaussian reference N(m, S) with the exact (Tweedie) denoiser, flow process, and a concave
quadratic reward r = -(x - c)^T Q (x - c) / 2 (the linear reward b.x is exact for every
ancestral variant: tests/test_losses_didr.py). The tilted law is Gaussian, so the DRS is exact:

    (sigma^2 / alpha) s_r = E_tilted[x0 | x_t] - E[x0 | x_t],
    tilted prior: precision S^-1 + Q / beta, mean (S^-1 + Q / beta)^-1 (S^-1 m + Q c / beta).

  python benchmarks/didr_drp_table.py [--dim=2] [--points=256] [--reps=256] \\
      [--out=docs/didr_drp_table]

For each variant (K steps, M draws, eta, draw weights) and noise level: relative bias
|E_xi[DRP] - DRS| / |DRS| and relative spread std_xi(DRP) / |DRS| (root mean squares over
``--points`` x_t from the reference's marginal, ``--reps`` ancestral noises each), and the cost
in reference calls per sample (forward K M; the vjp adds about twice that).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = [  # (name, K, M, eta, draw weights)
    ("K=1 (Tweedie)", 1, 1, 0.0, "softmax"),
    ("K=2 eta=1 M=1", 2, 1, 1.0, "softmax"),
    ("K=2 eta=1 M=4", 2, 4, 1.0, "softmax"),
    ("K=4 eta=1 M=1", 4, 1, 1.0, "softmax"),
    ("K=4 eta=1 M=4", 4, 4, 1.0, "softmax"),
    ("K=4 eta=1 M=16", 4, 16, 1.0, "softmax"),
    ("K=8 eta=1 M=16", 8, 16, 1.0, "softmax"),
    ("K=2 eta=0 (DDIM)", 2, 1, 0.0, "softmax"),
]
SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95)


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dim", type=int, default=2)
  p.add_argument("--points", type=int, default=256)
  p.add_argument("--reps", type=int, default=256)
  p.add_argument("--beta", type=float, default=1.0)
  p.add_argument("--out", default="")
  return p.parse_args()


def problem(dim: int, seed: int = 0):
  """(m, S, c, Q): a random reference and reward of data scale about 1."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  s = 0.3 * (a @ a.T) + 0.2 * np.eye(dim)
  q = np.diag(rng.uniform(0.5, 2.0, size=dim))
  return rng.normal(size=dim) * 0.5, s, rng.normal(size=dim), q


def posterior_mean(m, s, x_t, alpha, sigma):
  """E[x0 | x_t] under N(m, s): m + alpha s (alpha^2 s + sigma^2 I)^-1 (x_t - alpha m)."""
  c = alpha ** 2 * s + sigma ** 2 * jnp.eye(s.shape[0], dtype=s.dtype)
  return m + alpha * jnp.linalg.solve(c, (x_t - alpha * m).T).T @ s.T


def table(dim=2, points=256, reps=256, beta=1.0, seed=0) -> list[dict]:
  from didr_jax.losses import didr
  from didr_jax.diffusion import param
  with jax.enable_x64(True):
    m, s, c, q = (jnp.asarray(v, jnp.float64) for v in problem(dim, seed))
    prec = jnp.linalg.inv(s) + q / beta
    s_t = jnp.linalg.inv(prec)
    m_t = s_t @ (jnp.linalg.solve(s, m) + q @ c / beta)
    process = didr.flow_process()
    reward = lambda x: -0.5 * jnp.sum((x - c) @ q * (x - c), -1)

    def denoise(x, t):
      a, sg = process.coeffs(t, x)            # one time per batch here: its first entry
      x0 = posterior_mean(m, s, x, jnp.ravel(a)[0], jnp.ravel(sg)[0])
      return param.x0_to_output(x0, x, a, sg, "flow")

    rows = []
    key = jax.random.key(seed)
    for sig in SIGMAS:
      k_x, k_e, key = jax.random.split(key, 3)
      alpha = 1.0 - sig
      x0 = m + jax.random.normal(k_x, (points, dim), jnp.float64) @ jnp.linalg.cholesky(s).T
      x_t = alpha * x0 + sig * jax.random.normal(k_e, (points, dim), jnp.float64)
      t = jnp.full((points,), sig, jnp.float64)
      exact = posterior_mean(m_t, s_t, x_t, alpha, sig) - posterior_mean(m, s, x_t, alpha, sig)
      norm = jnp.sqrt(jnp.mean(jnp.sum(exact ** 2, -1)))
      for name, k, draws, eta, weights in VARIANTS:
        def one(rk):
          s_r, _ = didr.diffused_reward_score(denoise, reward, x_t, t, process,
                                              reward_scale=1.0 / beta, num_steps=k,
                                              num_draws=draws, eta=eta, draw_weights=weights,
                                              rng=rk, remat=False)
          return param.x0_delta_from_score_delta(s_r, jnp.full((points,), alpha),
                                                 jnp.full((points,), sig))
        n = reps if (eta > 0 and k > 1) else 1
        est = jax.lax.map(one, jax.random.split(jax.random.fold_in(key, k * 100 + draws), n))
        mean = jnp.mean(est, 0)
        bias = float(jnp.sqrt(jnp.mean(jnp.sum((mean - exact) ** 2, -1))) / norm)
        spread = float(jnp.sqrt(jnp.mean(jnp.sum(jnp.var(est, 0), -1))) / norm) if n > 1 else 0.0
        rows.append({"sigma": sig, "variant": name, "K": k, "M": draws, "eta": eta,
                     "rel_bias": bias, "rel_std": spread, "forward_calls": k * draws,
                     "drs_rms": float(norm)})
        print(json.dumps(rows[-1]), flush=True)
  return rows


def markdown(rows) -> str:
  names = list(dict.fromkeys(r["variant"] for r in rows))
  sig = sorted({r["sigma"] for r in rows})
  head = "| variant | calls | " + " | ".join(f"sigma {v}: bias / std" for v in sig) + " |"
  lines = [head, "|" + "---|" * (2 + len(sig))]
  for n in names:
    rs = {r["sigma"]: r for r in rows if r["variant"] == n}
    lines.append(f"| {n} | {rs[sig[0]]['forward_calls']} | " + " | ".join(
        f"{100 * rs[v]['rel_bias']:.0f}% / {100 * rs[v]['rel_std']:.0f}%" for v in sig) + " |")
  return "\n".join(lines)


def main():
  args = _parse()
  rows = table(args.dim, args.points, args.reps, args.beta)
  md = markdown(rows)
  print(md)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"command": "python benchmarks/didr_drp_table.py " + " ".join(
          f"--{k}={v}" for k, v in vars(args).items()), "rows": rows}, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(md + "\n")


if __name__ == "__main__":
  main()
