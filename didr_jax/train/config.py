"""The config schema every method shares, and its validation.

Config files in ``configs/`` start from ``base_config()`` and fill in the method's section; the
returned ConfigDict is locked, so ``--config.x=y`` with an unknown key fails at parse time.
``validate`` then rejects inconsistent settings before anything is compiled, naming the key.

Batch semantics (stated once, logged at start):
  sample.batch_size      prompts x images sampled per device-batch call (global, all hosts)
  sample.num_batches     sampling calls per epoch -> samples per epoch = batch_size * num_batches
  sample.group_size      images per prompt inside a batch (1 = independent prompts)
  train.batch_size       samples per micro-batch of the update (global)
  train.grad_accum       micro-batches accumulated into one optimizer step
  train.timestep_fraction  fraction of the denoising steps trained on per sample (DDPO)
  -> optimizer steps per inner epoch = samples_per_epoch / (train.batch_size * train.grad_accum)
"""

from __future__ import annotations

import jax
import ml_collections

METHODS = ("ddpo", "didr")
BACKBONES = ("toy_unet", "sd", "sdxl", "zimage", "toy_dit")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "ddpo"
  c.seed = 0
  c.num_epochs = 10
  c.checkpoint_every = 1        # epochs
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.eval_every = 5              # epochs (0 = only before the first and after the last epoch)
  c.log_images = 16

  c.backbone = ml_collections.ConfigDict()
  c.backbone.kind = "toy_unet"
  c.backbone.path = ""           # local diffusers folder or Orbax cache; "" = the shipped toy base
  c.backbone.dtype = "float32"   # compute dtype of the trainable network
  c.backbone.remat = False
  c.backbone.resolution = 0      # image size in pixels; 0 = the model folder's default

  c.rewards = ml_collections.ConfigDict({"toy_detector": 1.0})

  c.prompts = ml_collections.ConfigDict()
  c.prompts.train = "toy:train"
  c.prompts.eval = "toy:heldout"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.mesh.rules = ()              # extra (logical, mesh axis) rules, prepended to the defaults

  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 20
  c.sample.guidance_scale = 3.0
  c.sample.eta = 1.0             # DDIM eta (VP) / SDE noise level a (flow)
  c.sample.batch_size = 32
  c.sample.num_batches = 2
  c.sample.group_size = 1

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16
  c.train.grad_accum = 1
  c.train.num_inner_epochs = 1
  c.train.timestep_fraction = 1.0
  c.train.learning_rate = 1e-4
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.weight_decay = 1e-4
  c.train.max_grad_norm = 1.0
  c.train.cfg = True             # use CFG inside the policy (as sampled) while training

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  c.eval.num_steps = -1          # -1: same as sample.num_steps
  c.eval.eta = 0.0
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


class ConfigError(ValueError):
  pass


def _require(cond: bool, key: str, why: str):
  if not cond:
    raise ConfigError(f"config.{key}: {why}")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> dict:
  """Checks the config; returns derived batch figures for logging."""
  num_devices = num_devices or jax.device_count()
  _require(c.method in METHODS, "method", f"{c.method!r} is not one of {METHODS}")
  _require(c.backbone.kind in BACKBONES, "backbone.kind",
           f"{c.backbone.kind!r} is not one of {BACKBONES}")
  _require(c.backbone.dtype in ("float32", "bfloat16"), "backbone.dtype",
           "must be float32 or bfloat16")
  _require(c.backbone.resolution >= 0, "backbone.resolution",
           f"must be >= 0 (0 = the model's default), got {c.backbone.resolution}")
  _require(len(c.rewards) > 0, "rewards", "name at least one reward")
  s, t = c.sample, c.train
  for key, v in (("sample.num_steps", s.num_steps), ("sample.batch_size", s.batch_size),
                 ("sample.num_batches", s.num_batches), ("sample.group_size", s.group_size),
                 ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                 ("train.num_inner_epochs", t.num_inner_epochs), ("num_epochs", c.num_epochs)):
    _require(int(v) >= 1, key, f"must be >= 1, got {v}")
  _require(s.batch_size % s.group_size == 0, "sample.batch_size",
           f"{s.batch_size} is not a multiple of sample.group_size={s.group_size}")
  _require(s.batch_size % num_devices == 0, "sample.batch_size",
           f"{s.batch_size} is not divisible by the {num_devices} devices")
  _require(t.batch_size % num_devices == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by the {num_devices} devices")
  per_epoch = s.batch_size * s.num_batches
  per_step = t.batch_size * t.grad_accum
  _require(per_epoch % per_step == 0, "train.batch_size",
           f"samples per epoch ({s.batch_size} x {s.num_batches} = {per_epoch}) must be a multiple "
           f"of train.batch_size x train.grad_accum = {per_step}")
  _require(0.0 < t.timestep_fraction <= 1.0, "train.timestep_fraction", "must be in (0, 1]")
  _require(c.eval.num_samples >= 0, "eval.num_samples", "must be >= 0 (0 = no evaluation)")
  _require(c.eval.num_samples % c.eval.batch_size == 0, "eval.num_samples",
           f"{c.eval.num_samples} is not a multiple of eval.batch_size={c.eval.batch_size}")
  _require(c.eval.batch_size % num_devices == 0, "eval.batch_size",
           f"{c.eval.batch_size} is not divisible by the {num_devices} devices")
  if c.method == "didr":
    from didr_jax.train.didr_config import validate_didr_section
    _require("didr" in c, "didr", "method 'didr' needs the didr section (didr_config.didr_section)")
    validate_didr_section(c.didr)
  train_steps = max(1, int(round(s.num_steps * t.timestep_fraction)))
  return {
      "devices": num_devices,
      "processes": jax.process_count(),
      "samples_per_epoch": per_epoch,
      "samples_per_optimizer_step": per_step,
      "optimizer_steps_per_epoch": per_epoch // per_step * t.num_inner_epochs,
      "timesteps_trained_per_sample": train_steps,
  }
