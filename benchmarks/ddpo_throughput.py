"""DDPO epoch throughput beside the diffusers PyTorch pipeline, in the same run and process.

  python benchmarks/ddpo_throughput.py [--batch=16] [--steps=10] [--repeats=3]

Three workloads, each sampled by both implementations with the same architecture, weights,
steps, batch and CFG:
  toy      the shipped pixel-space toy UNet (32 x 32 x 3) with its toy-CLIP text encoder;
           the PyTorch peer is diffusers' UNet2DConditionModel + DDIMScheduler in a plain loop
           (diffusers has no pipeline class for a VAE-less UNet).
  toy_dit  the shipped pixel-space toy DiT (a tiny Z-Image with a Qwen3 text encoder), Euler
           flow sampling; the peer is diffusers' ZImagePipeline.__call__ on the same folder
           (output_type "latent": the toy has no VAE), given the same initial noise; the final
           images of the two are compared and the largest difference printed.
  tiny_sd  a tiny random StableDiffusionPipeline (UNet + VAE + CLIP, 32 px images);
           the peer is diffusers' StableDiffusionPipeline.__call__.
Printed: sampling samples/s of each, their ratio (JAX / PyTorch, > 1 means faster), and our
full DDPO epoch (sampling + rewards + training) samples/s on the toy UNet, the toy DiT and the
tiny SD. Compilation is excluded (one warm-up call), as is PyTorch's first call. Timings are
wall clock on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch


def _time(fn, repeats):
  fn()  # warm-up / compile
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t0) / repeats


def torch_loop_sampler(folder, prompts, steps, guidance, seed):
  """diffusers UNet + DDIMScheduler + CLIP in the standard CFG loop (pixel space)."""
  from diffusers import DDIMScheduler, UNet2DConditionModel
  from transformers import AutoTokenizer, CLIPTextModel
  unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
  te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
  tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
  sched = DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
  n = te.config.max_position_embeddings

  @torch.no_grad()
  def run():
    ids = tok(list(prompts) + [""] * len(prompts), padding="max_length", max_length=n,
              truncation=True, return_tensors="pt").input_ids
    ctx = te(ids).last_hidden_state
    ctx = torch.cat([ctx[len(prompts):], ctx[:len(prompts)]])
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=g)
    for t in sched.timesteps:
      out = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
      u, c = out.chunk(2)
      x = sched.step(u + guidance * (c - u), t, x, eta=1.0, generator=g).prev_sample
    return x
  return run


def bench_toy(args):
  from didr_jax.pipelines.sd import SDPipeline
  from didr_jax.train import loop
  folder = loop.TOY_ASSETS + "/toy_unet"
  prompts = ["two red circles", "a blue square and a yellow triangle"] * (args.batch // 2)
  pipe = SDPipeline.from_pretrained(folder)
  ours = lambda: jax.block_until_ready(pipe.sample(prompts, num_steps=args.steps,
                                                   guidance_scale=3.0, eta=1.0, seed=0)[0])
  peer = torch_loop_sampler(folder, prompts, args.steps, 3.0, 0)
  return _time(ours, args.repeats), _time(peer, args.repeats)


def bench_toy_dit(args):
  """(ours s/batch, diffusers s/batch, max |image difference|) on the shipped toy DiT."""
  from didr_jax.pipelines.zimage import ZImagePipeline as OurZImage
  from didr_jax.testing import tiny_zimage
  from didr_jax.train import loop
  folder = loop.TOY_ASSETS + "/toy_dit"
  prompts = ["two red circles", "a blue square and a yellow triangle"] * (args.batch // 2)
  pipe = OurZImage.from_pretrained(folder)
  noise = np.random.default_rng(0).standard_normal((args.batch, pipe.size, pipe.size, 3))
  noise = noise.astype(np.float32)
  ours = lambda: np.asarray(pipe.sample(prompts, num_steps=args.steps, guidance_scale=3.0,
                                        latents=noise)[0])
  ref = tiny_zimage.diffusers_pixel_sampler(folder)
  peer = lambda: ref(prompts, noise, args.steps, 3.0)
  diff = float(np.abs(ours() - peer()).max())
  return _time(ours, args.repeats), _time(peer, args.repeats), diff


def bench_tiny_sd(args, folder):
  from didr_jax.pipelines.sd import SDPipeline
  from diffusers import StableDiffusionPipeline
  prompts = ["two red circles", "a blue square"] * (args.batch // 2)
  pipe = SDPipeline.from_pretrained(folder)
  ours = lambda: jax.block_until_ready(pipe.sample(prompts, num_steps=args.steps,
                                                   guidance_scale=5.0, eta=1.0, seed=0)[0])
  ref = StableDiffusionPipeline.from_pretrained(folder)
  ref.set_progress_bar_config(disable=True)
  peer = lambda: ref(prompts, num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0,
                     output_type="np", generator=torch.Generator().manual_seed(0))
  return _time(ours, args.repeats), _time(peer, args.repeats)


def ddpo_epoch(args, config_name, **overrides):
  """Our whole DDPO epoch (sampling, host rewards, one inner epoch of training): samples/s."""
  from didr_jax.testing.configs import load_config
  from didr_jax.train import loop
  settings = {"sample.batch_size": args.batch, "sample.num_batches": 2,
              "sample.num_steps": args.steps,
              "train.batch_size": args.batch, "train.grad_accum": 1,
              "num_epochs": 1 + args.repeats, "eval.num_samples": 0, "checkpoint_every": 1000}
  c = load_config(config_name, **{**settings, **overrides})
  with tempfile.TemporaryDirectory() as d:
    loop.train(c, d)
    hist = __import__("json").load(open(os.path.join(d, "history.json")))
  rates = [h["samples_per_s"] for h in hist if "samples_per_s" in h][1:]  # skip compile epoch
  return float(np.mean(rates))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPU threads for torch; "
        f"batch {args.batch}, {args.steps} sampling steps, CFG on")
  jt, tt = bench_toy(args)
  b = args.batch
  print(f"toy sampling      jax {b / jt:8.2f} samples/s | diffusers torch {b / tt:8.2f} "
        f"samples/s | ratio {tt / jt:5.2f}x")
  jt, tt, diff = bench_toy_dit(args)
  print(f"toy_dit sampling  jax {b / jt:8.2f} samples/s | diffusers torch {b / tt:8.2f} "
        f"samples/s | ratio {tt / jt:5.2f}x | max |image diff| {diff:.1e}")
  with tempfile.TemporaryDirectory() as d:
    from didr_jax.testing import tiny
    tiny.save_tiny_sd(d, kind="sd", seed=0)
    jt, tt = bench_tiny_sd(args, d)
    print(f"tiny_sd sampling  jax {b / jt:8.2f} samples/s | diffusers torch {b / tt:8.2f} "
          f"samples/s | ratio {tt / jt:5.2f}x")
    rate = ddpo_epoch(args, "ddpo_sdxl", **{"backbone.path": d, "backbone.kind": "sd",
                                            "backbone.dtype": "float32", "backbone.remat": False})
    print(f"tiny_sd DDPO epoch (sample + reward + train) jax {rate:8.2f} samples/s")
  rate = ddpo_epoch(args, "toy_ddpo")
  print(f"toy DDPO epoch (sample + reward + train)     jax {rate:8.2f} samples/s")
  rate = ddpo_epoch(args, "toy_ddpo_dit")
  print(f"toy DiT DDPO epoch (flow SDE, a = 0.7)       jax {rate:8.2f} samples/s")


if __name__ == "__main__":
  main()
