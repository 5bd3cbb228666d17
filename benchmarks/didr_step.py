"""DIDR generator steps per second, and the share of a step spent in the Diffused Reward Proxy.

  python benchmarks/didr_step.py [--batch=16] [--repeats=5] [--only=toy,tiny_sdxl]

One "DIDR step" is ``DIDRTrainer.train_step``: ``didr.fake_updates`` fake-score DSM updates and
one generator update (generator forward and backward, fake and CFG reference x0-hats, the DRP,
the optimizer steps and the EMA). Two workloads, each with its config's defaults:
  toy        configs/toy_didr.py on the shipped toy UNet (32 x 32 x 3 pixels, toy-CLIP reward;
             2 fake updates, DRP K = 2 ancestral, reference CFG 3);
  tiny_sdxl  configs/didr_sdxl.py on a tiny random SDXL folder with a tiny random PickScore
             (5 fake updates, K = 2, CFG 8; float32 on CPU, remat as the config).
Peers measured in the same run on the same trainer inputs: the same step in mode "di" (no
reward: no DRP) and "dipp" (the reward gradient on the clean sample only), and the DRP call
alone (``losses.didr.diffused_reward_score`` with the step's reference and reward, jitted).
Printed per workload: steps/s of didr, di, dipp; the DRP share = (t_didr - t_di) / t_didr (what
the reward costs a step) and t_DRP alone / t_didr. Compilation is excluded (one warm-up step).
Timings are wall clock on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return (time.perf_counter() - t0) / repeats


def _trainer(name: str, mode: str, overrides: dict):
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.testing.configs import load_config
  from didr_jax.train import config as config_lib, loop
  from didr_jax.train.didr import DIDRTrainer
  c = load_config(name, **{**overrides, "didr.mode": mode})
  config_lib.validate(c, num_devices=1)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  return DIDRTrainer(c, loop.build_backbone(c, mesh), mesh)


def step_time(name: str, mode: str, overrides: dict, batch: int, repeats: int,
              drp_alone: bool = False) -> tuple[float, float | None]:
  """(seconds per train_step, seconds per DRP call or None)."""
  from didr_jax.losses import didr as didr_losses
  from didr_jax.train import prompts as prompts_lib
  tr = _trainer(name, mode, overrides)
  ps = prompts_lib.load_prompts(tr.c.prompts.train)
  prompts = [ps[i % len(ps)] for i in range(batch)]
  box = {"state": tr.init_state(), "i": 0}

  def one():
    box["i"] += 1
    box["state"], m, _ = tr.train_step(box["state"], prompts, jax.random.key(box["i"]))
    return box["state"]

  t_step = _time(one, repeats)
  t_drp = None
  if drp_alone:
    cond, module, features = tr.inputs(prompts)
    d = tr.c.didr
    ref_fn = tr._score_fn(tr.ref_params, cond, tr.uncond, d.ref_cfg)
    frozen = tr.bb.frozen()

    @jax.jit
    def drp(x_t, t, rng):
      reward_fn = lambda x0: tr.reward.jax_fn(module, tr.bb.decode(frozen, x0), features)
      return didr_losses.diffused_reward_score(
          ref_fn, reward_fn, x_t, t, tr.process, reward_scale=d.reward_scale,
          num_steps=d.drp_steps, num_draws=d.drp_draws, eta=d.drp_eta,
          draw_weights=d.drp_draw_weights, rng=rng, remat=d.drp_remat)[0]

    x_t = jax.random.normal(jax.random.key(1), tr.bb.latent_shape(batch), jnp.float32)
    t, _ = tr._times_and_noise(jax.random.key(2), x_t.shape)
    t_drp = _time(lambda: drp(x_t, t, jax.random.key(3)), repeats)
  return t_step, t_drp


def bench(label: str, name: str, overrides: dict, batch: int, repeats: int) -> None:
  t_didr, t_drp = step_time(name, "didr", overrides, batch, repeats, drp_alone=True)
  t_di, _ = step_time(name, "di", overrides, batch, repeats)
  t_dipp, _ = step_time(name, "dipp", overrides, batch, repeats)
  print(f"{label:10s} batch {batch}: didr {1 / t_didr:6.3f} steps/s ({t_didr:6.2f} s) | "
        f"di {1 / t_di:6.3f} | dipp {1 / t_dipp:6.3f} | DRP share (didr - di) / didr "
        f"{(t_didr - t_di) / t_didr:5.1%} | DRP alone / didr {t_drp / t_didr:5.1%}", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", default="toy,tiny_sdxl")
  args = p.parse_args()
  only = args.only.split(",")
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; one step = fake updates + generator update")
  common = {"sample.batch_size": args.batch, "train.batch_size": args.batch}
  if "toy" in only:
    bench("toy", "toy_didr", common, args.batch, args.repeats)
  if "tiny_sdxl" in only:
    from didr_jax.testing import tiny
    with tempfile.TemporaryDirectory() as d:
      tiny.save_tiny_sd(os.path.join(d, "sdxl"), kind="sdxl", seed=5)
      tiny.save_tiny_pickscore(os.path.join(d, "pick"), words=("red", "blue", "circle"))
      os.environ["DIDR_PICKSCORE"] = os.path.join(d, "pick")
      bench("tiny_sdxl", "didr_sdxl", {**common, "backbone.path": os.path.join(d, "sdxl"),
                                       "backbone.dtype": "float32"}, args.batch, args.repeats)


if __name__ == "__main__":
  main()
