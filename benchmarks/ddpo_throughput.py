"""DDPO throughput beside diffusers / PyTorch peers, in the same run and process.

  python benchmarks/ddpo_throughput.py [--workloads=toy,sd64,...] [--batch=N] [--steps=N]
                                       [--repeats=3] [--remat] [--cpu_devices=0]

Workloads (--workloads, a comma list; default all), each run by both implementations with the
same architecture, weights, steps, batch and CFG (defaults: batch 16 / 10 steps for the first
three, batch 8 / 20 steps for the last three; --batch / --steps override all of them):
  toy      the shipped pixel-space toy UNet (32 x 32 x 3) with its toy-CLIP text encoder, CFG 3;
           the PyTorch peer is diffusers' UNet2DConditionModel + DDIMScheduler in a plain loop
           (diffusers has no pipeline class for a VAE-less UNet). Then our whole DDPO epoch.
  toy_dit  the shipped pixel-space toy DiT (a tiny Z-Image with a Qwen3 text encoder), Euler
           flow sampling; the peer is diffusers' ZImagePipeline.__call__ on the same folder
           (output_type "latent": the toy has no VAE), given the same initial noise; the final
           images of the two are compared and the largest difference printed. Then our epoch.
  tiny_sd  a tiny random StableDiffusionPipeline (UNet + VAE + CLIP, 32 px images), CFG 5;
           the peer is diffusers' StableDiffusionPipeline.__call__. Then our DDPO epoch.
  sd64     a tiny random SD pipeline at 64 x 64 px (latents 4 x 32 x 32, ``save_tiny_sd(...,
           sample_size=32)``): DDIM eta 1, CFG 5, our ``SDPipeline.sample`` against
           ``StableDiffusionPipeline.__call__`` (output_type "np") on the same folder.
  sdxl64   the same with the tiny SDXL pipeline (two text encoders, pooled + time ids) against
           ``StableDiffusionXLPipeline.__call__``.
  ddpo_trl a DDPO epoch of TRL DDPOTrainer's workload on the sd64 pipeline: 2 sampling batches
           x 8 samples, 20 DDIM steps at eta 1, every step trained (timestep fraction 1) with
           CFG 5 in training too, minibatches of 4 (4 AdamW steps per epoch, each over the 20
           steps of its minibatch), PPO clip 1e-4, advantage clip 5, AdamW lr 3e-4, betas
           (0.9, 0.999), weight decay 1e-4, eps 1e-8, gradient-norm clip 1, JPEG
           compressibility reward, advantages as our config normalises them (per-prompt
           buffers, batch statistics until a prompt has 16 rewards). Ours: ``loop.train`` on
           configs/ddpo_sdxl.py with overrides (the figures come from its history.json). Peer:
           ``TorchDDPO`` below, the same epoch written in PyTorch on diffusers' UNet, CLIP and
           VAE from the same folder (same loss, optimizer and number of network calls). A
           self-check runs one identical minibatch (same weights, latents, log-probs,
           advantages, conditioning; 4 samples x 2 of the 20 steps, so its update compiles
           quickly) through our update and through the PyTorch one and prints both losses and
           pre-clip gradient norms. If our update runs out of memory the error is printed
           and the peer still runs; --remat trains our UNet with rematerialisation.
On a CPU, JAX runs as the command line does by default (``config.cpu_devices`` 0): the cores
split into one device each as far as every batch size divides, our pipelines and trainers
sharding their batches over them; ``--cpu_devices=1`` measures one device. PyTorch uses every
core in both cases (``torch.set_num_threads``).
Printed: images (samples) per second of each side and the ratio ours / peer (> 1 means ours is
faster). Compilation and PyTorch's first call are excluded from the sampling figures (one
warm-up call each); sd64 / sdxl64 time two interleaved rounds (ours, peer, ours, peer) of
--repeats calls each, so drift in the machine's load shows, and print the process CPU seconds
per call beside the wall clock (on a shared machine the wall clock is mostly the wait for a
core). For ddpo_trl: samples/s, sampling seconds (sampling + rewards) and training seconds
per epoch, the first epoch (ours: compiling) apart from the mean of the --repeats steady
epochs. For toy / toy_dit / tiny_sd our whole DDPO epoch (sampling + rewards + training,
compile epoch skipped) in samples/s. Timings are wall clock on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

# workload -> (default batch, default sampling steps)
WORKLOADS = {"toy": (16, 10), "toy_dit": (16, 10), "tiny_sd": (16, 10),
             "sd64": (8, 20), "sdxl64": (8, 20), "ddpo_trl": (8, 20)}
PROMPTS = ["two red circles", "a blue square"]
TRL_MINIBATCH = 4  # ddpo_trl's train.batch_size (TRL DDPOTrainer's train_batch_size)


def _mesh():
  """Every device on the batch axis (``--cpu_devices``): our pipelines shard a sampling batch
  over it, as the trainers do."""
  from didr_jax.parallel import mesh as mesh_lib
  return mesh_lib.make_mesh()


def _clock(fn, repeats):
  """Mean (wall seconds, process CPU seconds) per call of ``fn`` over ``repeats`` calls (no
  warm-up). CPU seconds count every thread of this process, so on a machine shared with other
  jobs they show the work done when the wall clock mostly shows the wait for a core."""
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats


def _time(fn, repeats):
  fn()  # warm-up / compile
  return _clock(fn, repeats)[0]


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
  pipe = SDPipeline.from_pretrained(folder, mesh=_mesh())
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
  pipe = OurZImage.from_pretrained(folder, mesh=_mesh(), scan_layers=args.scan_layers)
  noise = np.random.default_rng(0).standard_normal((args.batch, pipe.size, pipe.size, 3))
  noise = noise.astype(np.float32)
  ours = lambda: np.asarray(pipe.sample(prompts, num_steps=args.steps, guidance_scale=3.0,
                                        latents=noise)[0])
  ref = tiny_zimage.diffusers_pixel_sampler(folder)
  peer = lambda: ref(prompts, noise, args.steps, 3.0)
  diff = float(np.abs(ours() - peer()).max())
  return _time(ours, args.repeats), _time(peer, args.repeats), diff


def sd_samplers(args, folder, kind):
  """(ours, peer): one call each samples ``args.batch`` images from ``folder`` with DDIM
  (eta 1, CFG 5, ``args.steps`` steps) and returns them; ours is ``SDPipeline.sample``, the
  peer diffusers' StableDiffusion(XL)Pipeline.__call__ with output_type "np"."""
  from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
  from didr_jax.pipelines.sd import SDPipeline
  prompts = PROMPTS * (args.batch // 2)
  pipe = SDPipeline.from_pretrained(folder, mesh=_mesh())
  ours = lambda: np.asarray(jax.block_until_ready(pipe.sample(
      prompts, num_steps=args.steps, guidance_scale=5.0, eta=1.0, seed=0)[0]))
  ref = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[kind]
  ref = ref.from_pretrained(folder)
  ref.set_progress_bar_config(disable=True)
  peer = lambda: ref(prompts, num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images
  return ours, peer


def bench_tiny_sd(args, folder):
  ours, peer = sd_samplers(args, folder, "sd")
  return _time(ours, args.repeats), _time(peer, args.repeats)


def bench_sd64(args, folder, kind):
  """Images/s of ours and of diffusers in two interleaved rounds (ours, peer, ours, peer) of
  ``args.repeats`` calls each, after one warm-up call of each, and the process CPU seconds per
  call; prints the image shapes too."""
  ours, peer = sd_samplers(args, folder, kind)
  a, b = ours(), peer()  # warm-up (ours: compile)
  print(f"  images: ours {a.shape} (NHWC), diffusers {b.shape}")
  rounds = []
  for r in range(2):
    (jt, jc), (tt, tc) = _clock(ours, args.repeats), _clock(peer, args.repeats)
    rounds.append((jt, tt, jc, tc))
    print(f"  round {r + 1}   ours {args.batch / jt:7.2f} images/s | diffusers "
          f"{args.batch / tt:7.2f} images/s | ratio {tt / jt:5.2f}x | CPU s/call ours "
          f"{jc:6.1f} diffusers {tc:6.1f}", flush=True)
  jt, tt, jc, tc = np.mean(rounds, axis=0)
  print(f"  mean      ours {args.batch / jt:7.2f} images/s | diffusers {args.batch / tt:7.2f} "
        f"images/s | ratio {tt / jt:5.2f}x | CPU s/call ours {jc:6.1f} diffusers {tc:6.1f}")


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
    hist = json.load(open(os.path.join(d, "history.json")))
  rates = [h["samples_per_s"] for h in hist if "samples_per_s" in h][1:]  # skip compile epoch
  return float(np.mean(rates))


# ------------------------------------------------------------------------------ ddpo_trl

def trl_config(args, folder, num_epochs):
  """configs/ddpo_sdxl.py set to TRL DDPOTrainer's workload on the tiny SD in ``folder``."""
  from didr_jax.testing.configs import load_config
  c = load_config("ddpo_sdxl", **{
      "backbone.path": folder, "backbone.kind": "sd", "backbone.dtype": "float32",
      "backbone.remat": args.remat,
      "sample.batch_size": args.batch, "sample.num_batches": 2, "sample.num_steps": args.steps,
      "sample.guidance_scale": 5.0, "sample.eta": 1.0,
      "sample.deterministic_last_step": False,   # TRL trains the last step too
      "train.batch_size": TRL_MINIBATCH, "train.grad_accum": 1, "train.timestep_fraction": 1.0,
      "train.cfg": True, "train.num_inner_epochs": 1, "train.learning_rate": 3e-4,
      "train.adam_b1": 0.9, "train.adam_b2": 0.999, "train.adam_eps": 1e-8,
      "train.weight_decay": 1e-4, "train.max_grad_norm": 1.0,
      "ddpo.clip_range": 1e-4, "ddpo.adv_clip_max": 5.0, "ddpo.steps_per_call": 1,
      "num_epochs": num_epochs, "eval.num_samples": 0, "checkpoint_every": 1000})
  assert dict(c.rewards) == {"jpeg_compressibility": 1.0}, c.rewards
  return c


def ddim_gaussian(out, x, abar_t, abar_prev, eta):
  """(mean, std) of the DDIM step x_t -> x_prev for an epsilon-predicting model without
  x0 clipping (didr_jax/diffusion/ddim.py's formulas):
      x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
      std = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
      mean = sqrt(abar_prev) x0 + sqrt(max(1 - abar_prev - std^2, 0)) eps"""
  x0 = (x - torch.sqrt(1 - abar_t) * out) / torch.sqrt(abar_t)
  std = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
  mean = torch.sqrt(abar_prev) * x0 + torch.sqrt(torch.clamp(1 - abar_prev - std ** 2, min=0)) * out
  return mean, std


def gaussian_log_prob(x, mean, std):
  """log N(x; mean, std^2 I) averaged over the non-batch dims (all steps here have std > 0)."""
  lp = -(x - mean) ** 2 / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
  return lp.mean(dim=tuple(range(1, x.ndim)))


class TorchDDPO:
  """A DDPO epoch in PyTorch, shaped as TRL's DDPOTrainer runs it: diffusers' UNet (trained,
  all weights), CLIP text encoder and VAE (frozen) and DDIM timesteps from ``folder``.
  Sampling stores each step's latents and log-prob; training runs, per minibatch of
  ``train.batch_size`` samples, one CFG forward + backward per trained step (loss / k, so the
  gradient is the mean over the k steps, as our update's), then clips the gradient norm and
  takes one AdamW step."""

  def __init__(self, folder, c):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    self.c = c
    self.unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).train()
    self.te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    self.vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval()
    self.tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    sched = DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    assert sched.config.prediction_type == "epsilon" and not sched.config.clip_sample
    sched.set_timesteps(c.sample.num_steps)
    self.timesteps = sched.timesteps
    self.prev_timesteps = self.timesteps - sched.config.num_train_timesteps // c.sample.num_steps
    self.abar = sched.alphas_cumprod.float()
    self.final_abar = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float32)
    self.uncond = self.encode([""])
    t = c.train
    self.opt = torch.optim.AdamW(self.unet.parameters(), lr=t.learning_rate,
                                 betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps,
                                 weight_decay=t.weight_decay)

  @torch.no_grad()
  def encode(self, prompts):
    ids = self.tok(list(prompts), padding="max_length", max_length=self.tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids
    return self.te(ids).last_hidden_state

  def alpha_bar(self, t):
    return self.abar[t] if t >= 0 else self.final_abar

  def guided(self, x, t, context):
    """CFG output u + w (c - u) of one batched UNet call on (uncond, cond)."""
    ctx = torch.cat([self.uncond.expand(len(x), -1, -1), context])
    u, c = self.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
    return u + self.c.sample.guidance_scale * (c - u)

  @torch.no_grad()
  def sample(self, prompts, generator):
    """One rollout batch: latents (B, n + 1, C, H, W), log_probs (B, n), context, images."""
    s = self.c.sample
    context = self.encode(prompts)
    size, ch = self.unet.config.sample_size, self.unet.config.in_channels
    x = torch.randn(len(prompts), ch, size, size, generator=generator)
    latents, log_probs = [x], []
    for t, t_prev in zip(self.timesteps.tolist(), self.prev_timesteps.tolist()):
      mean, std = ddim_gaussian(self.guided(x, t, context), x, self.alpha_bar(t),
                                self.alpha_bar(t_prev), s.eta)
      x = mean + std * torch.randn(x.shape, generator=generator)
      latents.append(x)
      log_probs.append(gaussian_log_prob(x, mean, std))
    images = self.vae.decode(x / self.vae.config.scaling_factor).sample
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return {"latents": torch.stack(latents, 1), "log_probs": torch.stack(log_probs, 1),
            "context": context, "images": images}

  def accumulate(self, mb):
    """Adds to the .grad of the UNet the gradient of (1 / k) sum_j L_j over the minibatch's k
    steps, L_j = mean_b max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log p_new - log p_old),
    A clipped to +-adv_clip_max. mb: x_t, x_next (B, k, C, H, W), t, t_next (k,) ints,
    logp_old (B, k), adv (B,), context (B, T, D). Returns (loss, max |log p_new - log p_old|)."""
    d = self.c.ddpo
    k = mb["logp_old"].shape[1]
    adv = mb["adv"].clamp(-d.adv_clip_max, d.adv_clip_max)
    loss_sum, dlogp_max = 0.0, 0.0
    for j in range(k):
      t, t_prev = int(mb["t"][j]), int(mb["t_next"][j])
      x = mb["x_t"][:, j]
      mean, std = ddim_gaussian(self.guided(x, t, mb["context"]), x, self.alpha_bar(t),
                                self.alpha_bar(t_prev), self.c.sample.eta)
      dlogp = gaussian_log_prob(mb["x_next"][:, j], mean, std) - mb["logp_old"][:, j]
      ratio = torch.exp(dlogp)
      clipped = torch.clamp(ratio, 1 - d.clip_range, 1 + d.clip_range)
      loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
      (loss / k).backward()
      loss_sum += loss.item()
      dlogp_max = max(dlogp_max, dlogp.detach().abs().max().item())
    return loss_sum / k, dlogp_max

  def grad_norm(self):
    return float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in self.unet.parameters() if p.grad is not None])))

  def step(self):
    torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.c.train.max_grad_norm)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)

  def epoch(self, stream, normalizer, reward, generator):
    """One epoch; returns (samples/s, sampling + reward seconds, training seconds)."""
    s, t = self.c.sample, self.c.train
    t0 = time.perf_counter()
    parts, prompts, rewards = [], [], []
    for _ in range(s.num_batches):
      p = stream.next(s.batch_size)
      part = self.sample(p, generator)
      rewards.append(reward(part.pop("images"), p))
      parts.append(part)
      prompts += p
    t1 = time.perf_counter()
    adv = torch.as_tensor(normalizer(prompts, np.concatenate(rewards)))
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    n, steps = data["log_probs"].shape
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, t.batch_size):
      idx = perm[i:i + t.batch_size]
      order = torch.randperm(steps, generator=generator)  # all steps (timestep fraction 1)
      lat = data["latents"][idx]
      self.accumulate({"x_t": lat[:, order], "x_next": lat[:, order + 1],
                       "t": self.timesteps[order], "t_next": self.prev_timesteps[order],
                       "logp_old": data["log_probs"][idx][:, order], "adv": adv[idx],
                       "context": data["context"][idx]})
      self.step()
    t2 = time.perf_counter()
    return n / (t2 - t0), t1 - t0, t2 - t1


def ours_ddpo_epochs(args, folder):
  """Our trainer (``loop.train``) for 1 + repeats epochs: the history's per-epoch
  (samples/s, sampling s, training s), or None when the update ran out of memory (then the
  error is printed), and the seconds JAX spent compiling in the run."""
  from didr_jax.train import loop
  from didr_jax.train.logging import CompileClock
  c = trl_config(args, folder, 1 + args.repeats)
  CompileClock.install()
  with tempfile.TemporaryDirectory() as d:
    t0 = time.time()
    try:
      loop.train(c, d)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      print(f"  ours: {str(e).splitlines()[0]} (try --remat)", flush=True)
      return None, CompileClock.seconds(t0, time.time())
    compile_s = CompileClock.seconds(t0, time.time())
    hist = json.load(open(os.path.join(d, "history.json")))
  rows = [(h["samples_per_s"], h["time_rollout_s"], h["time_update_s"]) for h in hist
          if "samples_per_s" in h]
  return rows, compile_s


def torch_ddpo_epochs(args, folder):
  """``TorchDDPO`` for 1 + repeats epochs on the same prompts, reward and normaliser."""
  from didr_jax import rewards as rewards_lib
  from didr_jax.train import ddpo, prompts
  c = trl_config(args, folder, 1 + args.repeats)
  peer = TorchDDPO(folder, c)
  stream = prompts.PromptStream(prompts.load_prompts(c.prompts.train), seed=c.seed)
  normalizer = ddpo.make_normalizer(c.ddpo)
  reward = rewards_lib.from_config(dict(c.rewards))
  g = torch.Generator().manual_seed(c.seed)
  return [peer.epoch(stream, normalizer, reward, g) for _ in range(1 + args.repeats)]


def ddpo_self_check(args, folder, check_steps=2):
  """One minibatch (4 samples x ``check_steps`` of the 20 steps, from one of our rollouts, with
  fixed advantages including two beyond the clip of 5) through our jitted update and through
  ``TorchDDPO.accumulate`` from the same initial weights and conditioning: (loss, pre-clip
  gradient norm) of each, the parameter counts, and the largest |log p_torch - log p_ours|.
  A few steps, not all 20, so the check is quick."""
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.train import common, loop, prompts
  c = trl_config(args, folder, 1)
  c.train.timestep_fraction = check_steps / args.steps
  mesh = mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  tr = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = tr.init_state()
  ours_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  batch = prompts.PromptStream(prompts.load_prompts(c.prompts.train), seed=1).next(args.batch)
  traj, _, cond, uncond = tr.sample(tr.policy_params(state), batch, jax.random.key(1))
  n = len(batch)
  adv = np.array([1.5, -0.5, 6.0, -2.0, 0.3, -6.5, 2.0, -1.0] * (n // 8 + 1), np.float32)[:n]
  data = {"latents": jnp.swapaxes(traj.latents, 0, 1),
          "log_probs": jnp.swapaxes(traj.log_probs, 0, 1),
          "levels": jnp.broadcast_to(traj.levels, (n,) + traj.levels.shape),
          "stochastic": jnp.broadcast_to(traj.stochastic, (n,) + traj.stochastic.shape),
          "cond": cond, "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
          "advantages": jnp.asarray(adv), "rewards": jnp.asarray(adv)}
  mb = jax.tree.map(lambda x: x[0], tr._prepare(jax.random.key(2), data))  # the first update
  state0 = common.on_mesh(jax.tree.map(jnp.copy, state), mesh)
  _, m = tr._update(state0, mb, uncond, None, jnp.float32(c.sample.guidance_scale),
                    jax.random.key(3))
  mb = jax.tree.map(np.array, mb)  # writable host copies for torch
  ours = float(m["loss"]), float(m["grad_norm"])

  peer = TorchDDPO(folder, c)
  peer.uncond = torch.tensor(np.asarray(uncond.context))  # the same conditioning as ours
  nchw = lambda x: torch.tensor(np.moveaxis(x[0], -1, 2))  # (B, k, H, W, C) -> (B, k, C, H, W)
  loss, dlogp = peer.accumulate({
      "x_t": nchw(mb["x_t"]), "x_next": nchw(mb["x_next"]),
      "t": torch.as_tensor(mb["t"][0, 0]), "t_next": torch.as_tensor(mb["t_next"][0, 0]),
      "logp_old": torch.as_tensor(mb["logp_old"][0]), "adv": torch.as_tensor(mb["adv"][0]),
      "context": torch.as_tensor(mb["cond"].context[0])})
  peer_params = sum(p.numel() for p in peer.unet.parameters())
  return ours, (loss, peer.grad_norm()), (ours_params, peer_params), dlogp


def bench_ddpo_trl(args, folder):
  b = args.batch
  print(f"ddpo_trl: tiny SD 64 px; 2 x {b} samples, {args.steps} DDIM steps (eta 1), all "
        f"{args.steps} steps trained with CFG 5, minibatch {TRL_MINIBATCH} -> "
        f"{2 * b // TRL_MINIBATCH} AdamW steps / epoch, JPEG compressibility"
        f"{'; ours with remat' if args.remat else ''}", flush=True)
  rows, compile_s = ours_ddpo_epochs(args, folder)
  peer_rows = torch_ddpo_epochs(args, folder)
  fmt = lambda r: f"{r[0]:6.2f} samples/s | sampling {r[1]:6.1f} s | training {r[2]:6.1f} s"
  peer = np.mean(peer_rows[1:], axis=0)
  if rows is None:
    print(f"  ours  no epoch ran (out of memory after {compile_s:.0f} s of compiling)")
  else:
    print(f"  ours  first epoch (compile {compile_s:.0f} s in the run) {fmt(rows[0])}")
  print(f"  torch first epoch                     {fmt(peer_rows[0])}")
  if rows is not None:
    print(f"  ours  steady ({len(rows) - 1} epochs)                {fmt(np.mean(rows[1:], 0))}")
  print(f"  torch steady ({len(peer_rows) - 1} epochs)                {fmt(peer)}")
  if rows is not None:
    ours = np.mean(rows[1:], axis=0)
    print(f"  ratio ours / torch (steady samples/s) {ours[0] / peer[0]:5.2f}x | sampling "
          f"{peer[1] / ours[1]:5.2f}x | training {peer[2] / ours[2]:5.2f}x", flush=True)
  k = 2
  (jl, jg), (tl, tg), (jn, tn), dlogp = ddpo_self_check(args, folder, k)
  rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)
  print(f"  self-check (one minibatch, 4 samples x {k} of the {args.steps} steps, same weights "
        f"and data):\n"
        f"    loss      ours {jl:+.8e} | torch {tl:+.8e} | rel diff {rel(jl, tl):.1e}\n"
        f"    grad norm ours {jg:.8e} | torch {tg:.8e} | rel diff {rel(jg, tg):.1e}\n"
        f"    trained parameters ours {jn} | torch {tn}; "
        f"max |log p torch - log p ours at sampling| {dlogp:.1e}")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workloads", default=",".join(WORKLOADS),
                 help=f"comma list of {', '.join(WORKLOADS)}")
  p.add_argument("--batch", type=int, default=None, help="default: per workload (16 or 8)")
  p.add_argument("--steps", type=int, default=None, help="default: per workload (10 or 20)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--remat", action="store_true",
                 help="ddpo_trl: our UNet with rematerialisation (less memory, more compute)")
  p.add_argument("--scan_layers", action="store_true",
                 help="toy_dit: the DiT's layers stacked and scanned (backbone.scan_layers)")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="JAX devices the CPU is split into, as the CLI's config.cpu_devices (0: "
                      "one per core as the batch sizes allow; 1: one device)")
  args = p.parse_args()
  names = [w for w in args.workloads.split(",") if w]
  unknown = set(names) - set(WORKLOADS)
  if unknown:
    p.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
  from didr_jax.parallel import mesh as mesh_lib  # before JAX starts its backends
  batches = [args.batch or WORKLOADS[n][0] for n in names] + [TRL_MINIBATCH]
  mesh_lib.split_cpu(mesh_lib.cpu_device_count(args.cpu_devices, batches))
  torch.set_num_threads(os.cpu_count() or 1)
  import diffusers, transformers
  diffusers.utils.logging.disable_progress_bar()
  transformers.utils.logging.disable_progress_bar()
  print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU "
        f"threads for torch; repeats {args.repeats}", flush=True)
  from didr_jax.testing import tiny
  with tempfile.TemporaryDirectory() as tmp:
    folders = {}

    def folder(kind, size):
      """A tiny random SD / SDXL pipeline with size x size latents (2 size px images)."""
      if (kind, size) not in folders:
        folders[kind, size] = os.path.join(tmp, f"{kind}{size}")
        tiny.save_tiny_sd(folders[kind, size], kind=kind, seed=0, sample_size=size)
      return folders[kind, size]

    for name in names:
      batch, steps = WORKLOADS[name]
      a = argparse.Namespace(batch=args.batch or batch, steps=args.steps or steps,
                             repeats=args.repeats, remat=args.remat,
                             scan_layers=args.scan_layers)
      b = a.batch
      print(f"== {name}: batch {b}, {a.steps} sampling steps, CFG on", flush=True)
      if name == "toy":
        jt, tt = bench_toy(a)
        print(f"toy sampling      jax {b / jt:8.2f} samples/s | diffusers torch {b / tt:8.2f} "
              f"samples/s | ratio {tt / jt:5.2f}x")
        rate = ddpo_epoch(a, "toy_ddpo")
        print(f"toy DDPO epoch (sample + reward + train)     jax {rate:8.2f} samples/s")
      elif name == "toy_dit":
        jt, tt, diff = bench_toy_dit(a)
        print(f"toy_dit sampling  jax {b / jt:8.2f} samples/s | diffusers torch {b / tt:8.2f} "
              f"samples/s | ratio {tt / jt:5.2f}x | max |image diff| {diff:.1e}")
        rate = ddpo_epoch(a, "toy_ddpo_dit", **{"backbone.scan_layers": a.scan_layers})
        print(f"toy DiT DDPO epoch (flow SDE, a = 0.7)       jax {rate:8.2f} samples/s")
      elif name == "tiny_sd":
        d = folder("sd", 16)
        jt, tt = bench_tiny_sd(a, d)
        print(f"tiny_sd sampling  jax {b / jt:8.2f} samples/s | diffusers torch {b / tt:8.2f} "
              f"samples/s | ratio {tt / jt:5.2f}x")
        rate = ddpo_epoch(a, "ddpo_sdxl", **{"backbone.path": d, "backbone.kind": "sd",
                                             "backbone.dtype": "float32",
                                             "backbone.remat": False})
        print(f"tiny_sd DDPO epoch (sample + reward + train) jax {rate:8.2f} samples/s")
      elif name in ("sd64", "sdxl64"):
        kind = name.removesuffix("64")
        print(f"{name} sampling (DDIM eta 1, CFG 5), ours vs diffusers "
              f"{'StableDiffusionPipeline' if kind == 'sd' else 'StableDiffusionXLPipeline'}")
        bench_sd64(a, folder(kind, 32), kind)
      else:
        bench_ddpo_trl(a, folder("sd", 32))


if __name__ == "__main__":
  main()
