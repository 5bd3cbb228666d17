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
  train.timestep_fraction  trained steps per sample = int(sample.num_steps x fraction), at
                         least 1, at most the number of stochastic (MDP) steps (DDPO)

The method's own section (``c.ddpo``, ``c.crd``, ``c.didr``, ``c.tdm``) comes from the method
registry (``train.methods``), which also checks it; DDPO's policy steps are in ``ddpo_config``.
"""

from __future__ import annotations

import math
import os
import re

import jax
import ml_collections

from didr_jax import rewards as rewards_lib
from didr_jax.errors import ConfigError, ConversionError, require
from didr_jax.exact import kinds as exact_kinds
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.pipelines import registry
from didr_jax.rewards import remote
from didr_jax.train import methods, optim

BACKBONES = ("toy_unet", "sd", "sdxl", "zimage", "toy_dit") + exact_kinds.KINDS


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
  # JAX's persistent compilation cache (didr_jax.main, evaluate): a rerun or resume loads the
  # compiled steps; "" = off; an explicit JAX_COMPILATION_CACHE_DIR environment variable wins
  c.compile_cache_dir = "~/.cache/didr_jax/xla"
  # On a CPU: how many JAX devices the command line splits the cores into, the batches sharded
  # over them as over accelerators (XLA:CPU fills the cores better so); 0 = one per core, or the
  # largest count that divides every batch size; 1 = one device. JAX_NUM_CPU_DEVICES or XLA_FLAGS'
  # --xla_force_host_platform_device_count, when set, win; accelerators are unaffected
  c.cpu_devices = 0

  c.backbone = ml_collections.ConfigDict()
  c.backbone.kind = "toy_unet"
  c.backbone.path = ""           # local diffusers folder or Orbax cache; "" = the shipped toy base
  c.backbone.dtype = "float32"   # compute dtype of the trainable network
  c.backbone.remat = False
  # Z-Image DiT (zimage, toy_dit): its main layers stacked and run by one lax.scan, so the
  # compiled programs hold one block instead of 30 (compile time and memory; same values)
  c.backbone.scan_layers = False
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
  c.sample.sde_type = "sde"      # flow policies: "sde" (Flow-GRPO) or "cps"; DDIM: "sde" only
  c.sample.deterministic_last_step = True  # last step ODE / eta 0, not part of the MDP
  c.sample.sde_window = (0, 0)   # (start, size): stochastic + trained steps; size 0 = all;
                                 # start -1 = random per sampling batch

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

  # fault handling (train/loop.py): optimizer steps with a non-finite loss, gradient norm or
  # update are skipped; this many skipped steps in a row stop the run (exit code 3)
  c.train.max_consecutive_nonfinite = 3

  # LoRA (models/lora.py): train low-rank adapters W + (alpha / rank) A B on the target layers
  # instead of all weights; only the adapters are optimised and checkpointed.
  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.targets = ()            # regexes over module paths; () = the attention projections

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  c.eval.num_steps = -1          # -1: same as sample.num_steps
  c.eval.eta = 0.0
  return c


def method_section(method: str) -> tuple[str, ml_collections.ConfigDict]:
  """(key, default section) of ``method``'s own config section (``c.ddpo``, ``c.didr``, ``c.tdm``
  for both TDM methods, ...), from the method registry."""
  key, make = methods.get(method).section
  return key, make()


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved ``config.json`` completed with the keys added to the library after it was
  written, at their defaults (so ``evaluate`` reads old run directories); saved values win."""
  full = base_config().to_dict()
  method = saved.get("method", "ddpo")
  if method in methods.names():
    key, section = method_section(method)
    full[key] = section.to_dict()

  def merge(into: dict, over: dict) -> dict:
    for k, v in over.items():
      into[k] = merge(dict(into[k]), v) if isinstance(v, dict) and isinstance(
          into.get(k), dict) else v
    return into
  saved = optim.upgrade(dict(saved))
  full["rewards"] = saved.pop("rewards", full["rewards"])  # a set of names, not defaults
  c = ml_collections.ConfigDict(merge(full, saved))
  c.mesh.axes = tuple(tuple(a) for a in c.mesh.axes)
  c.mesh.rules = tuple(tuple(r) for r in c.mesh.rules)
  return c


def real_base(method: str, kind: str, rewards: dict, *, num_epochs: int, eval_every: int,
              checkpoint_every: int = 5) -> ml_collections.ConfigDict:
  """``base_config()`` set up for a real backbone (the head every ``configs/<method>_sdxl.py``
  and ``_zimage.py`` shares): ``method`` on ``kind`` ("sdxl" | "zimage"), the folder left empty
  (required: a local diffusers folder or our Orbax cache), bfloat16 with remat (Z-Image's layers
  scanned), the toy prompt lists as placeholders for the user's prompt files, and the run
  length."""
  c = base_config()
  c.method = method
  c.backbone.kind = kind
  c.backbone.path = ""            # required: a local diffusers folder or our Orbax cache
  c.backbone.dtype = "bfloat16"
  c.backbone.remat = True
  c.backbone.scan_layers = kind == "zimage"
  c.rewards = dict(rewards)
  c.prompts.train = "toy:train"   # replace with a prompt file for real runs
  c.prompts.eval = "toy:heldout"
  c.num_epochs, c.checkpoint_every, c.eval_every = num_epochs, checkpoint_every, eval_every
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


FLOW_KINDS = ("zimage", "toy_dit") + exact_kinds.FLOW_KINDS


def _non_finite(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted keys of every NaN / inf number in the config (tuples included)."""
  out = []
  for k, v in c.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out += _non_finite(v, key + ".")
    elif isinstance(v, (list, tuple)):
      flat = list(v)
      while any(isinstance(x, (list, tuple)) for x in flat):
        flat = [y for x in flat for y in (x if isinstance(x, (list, tuple)) else [x])]
      if any(isinstance(x, float) and not math.isfinite(x) for x in flat):
        out.append(key)
    elif isinstance(v, float) and not math.isfinite(v):
      out.append(key)
  return out


def _check_numbers(c: ml_collections.ConfigDict) -> None:
  """Ranges of the numeric settings whose invalid values would otherwise fail late (a division
  by zero after an epoch) or silently (a NaN learning rate trains to NaN)."""
  bad = _non_finite(c)
  if bad:
    raise ConfigError(f"config.{bad[0]}: must be a finite number, got "
                      f"{_get(c, bad[0])!r}")
  t, s, e = c.train, c.sample, c.eval
  require(c.seed >= 0, "seed", f"must be >= 0 (NumPy seeds the prompt order), got {c.seed}")
  require(c.checkpoint_every >= 1, "checkpoint_every",
          f"must be >= 1 (epochs between checkpoints), got {c.checkpoint_every}")
  require(c.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {c.keep_checkpoints}")
  require(c.eval_every >= 0, "eval_every",
          f"must be >= 0 (0 = only before the first and after the last epoch), got {c.eval_every}")
  require(c.log_images >= 0, "log_images", f"must be >= 0, got {c.log_images}")
  require(c.get("cpu_devices", 0) >= 0, "cpu_devices",
          f"must be >= 0 (0 = one per core as the batch sizes allow), got {c.cpu_devices}")
  optim.check(t)
  require(s.eta >= 0, "sample.eta",
          f"must be >= 0 (DDIM eta / flow SDE noise level), got {s.eta}")
  require(e.eta >= 0, "eval.eta", f"must be >= 0, got {e.eta}")
  require(e.num_steps == -1 or e.num_steps >= 1, "eval.num_steps",
          f"must be >= 1, or -1 for sample.num_steps; got {e.num_steps}")
  require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")


def _get(c, dotted: str):
  for k in dotted.split("."):
    c = c[k]
  return c


def _check_rewards(c: ml_collections.ConfigDict) -> None:
  """Every reward name registered, every weight a finite number, at least one non-zero."""
  known = rewards_lib.names()
  require(len(c.rewards) > 0, "rewards", f"name at least one reward of {known}")
  for name, w in c.rewards.items():
    require(name in known, f"rewards.{name}",
            f"unknown reward {name!r}; registered rewards: {', '.join(known)}")
    require(isinstance(w, (int, float)) and not isinstance(w, bool), f"rewards.{name}",
            f"the weight must be a number, got {w!r}")
    require(math.isfinite(w), f"rewards.{name}", f"the weight must be finite, got {w}")
  require(any(w != 0 for w in c.rewards.values()), "rewards", "every weight is 0")
  if c.rewards.get("remote", 0):  # its URL and options (DIDR_REWARD_URL), before any model loads
    try:
      remote.resolve_options(None)
    except rewards_lib.RewardError as e:
      raise ConfigError(f"config.rewards.remote: {e}") from None


TOY_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "toy", "assets")


def backbone_folder(c: ml_collections.ConfigDict) -> str:
  """The model folder a config loads: ``backbone.path``, or the shipped toy base for the toy
  kinds ("" when a real backbone has no path)."""
  if c.backbone.kind in ("toy_unet", "toy_dit") and not c.backbone.path:
    return os.path.join(TOY_ASSETS, c.backbone.kind)
  return c.backbone.path


def _check_backbone_folder(c: ml_collections.ConfigDict) -> None:
  """The model folder exists, is a supported pipeline of the configured kind, and every
  weight file is complete (safetensors headers and sizes, the Orbax cache's metadata): read
  from headers only, nothing is loaded."""
  path = backbone_folder(c)
  if not path:
    return  # the loop says that a real backbone needs a folder
  try:
    found = registry.check_folder(path)
  except ConversionError as e:
    raise ConfigError(f"config.backbone.path: {e}") from None
  expected = {"toy_unet": "sd", "toy_dit": "zimage"}.get(c.backbone.kind, c.backbone.kind)
  require(found == expected, "backbone.kind",
          f"{c.backbone.kind!r}, but {path} holds a {found!r} pipeline")


def _check_prompts(c: ml_collections.ConfigDict, training: bool) -> None:
  from didr_jax.train import prompts
  keys = (("train",) if training else ()) + (("eval",) if c.eval.num_samples > 0 else ())
  for key in keys:
    try:
      prompts.load_prompts(c.prompts[key])
    except prompts.PromptError as e:
      raise ConfigError(f"config.prompts.{key}: {e}") from None


def device_batches(c: ml_collections.ConfigDict) -> dict[str, int]:
  """The batch sizes a run splits over its devices, by config key (the evaluation batch only
  when the run evaluates)."""
  out = {"sample.batch_size": int(c.sample.batch_size),
         "train.batch_size": int(c.train.batch_size)}
  if c.eval.num_samples > 0:
    out["eval.batch_size"] = int(c.eval.batch_size)
  return out


def cpu_devices(c: ml_collections.ConfigDict) -> int:
  """The CPU device count ``config.cpu_devices`` asks for (``mesh.cpu_device_count``: 0 = one
  per core as far as every batch of ``device_batches`` and the mesh axes allow)."""
  return mesh_lib.cpu_device_count(int(c.get("cpu_devices", 0)), device_batches(c).values(),
                                   tuple(tuple(a) for a in c.mesh.axes))


def _check_section_keys(got: ml_collections.ConfigDict, name: str,
                        default: ml_collections.ConfigDict) -> None:
  """Every key of a method's section is one its default section has, or a per-network optimizer
  override (``optim``: ``<network>_<key>``); a renamed key names its new name."""
  for key in got.keys():
    if key in default or any(key.endswith("_" + k) for k in optim.KEYS):
      continue
    hint = optim.renamed(f"{name}.{key}")
    raise ConfigError(hint or f"config.{name}.{key}: not a key of the {name} section")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None, *,
             training: bool = True) -> dict:
  """Checks the config and the files it names (model folder headers, prompt files; the
  training prompts only when ``training``), before anything is loaded or compiled; returns
  derived batch figures for logging."""
  num_devices = num_devices or jax.device_count()
  method = methods.get(c.method)
  section = method.section[0]
  require(section in c, section, f"method {c.method!r} needs the {section} section "
          f"({method.section[1].__module__}.{method.section[1].__name__})")
  _check_section_keys(c[section], section, method.section[1]())
  require(c.backbone.kind in BACKBONES, "backbone.kind",
          f"{c.backbone.kind!r} is not one of {BACKBONES}")
  require(c.backbone.dtype in ("float32", "bfloat16"), "backbone.dtype",
          "must be float32 or bfloat16")
  require(isinstance(c.backbone.scan_layers, bool), "backbone.scan_layers",
          "must be True or False")
  require(not c.backbone.scan_layers or c.backbone.kind in FLOW_KINDS, "backbone.scan_layers",
          f"only the Z-Image DiT ({', '.join(FLOW_KINDS)}) stacks its layers, not "
          f"{c.backbone.kind!r}")
  require(c.backbone.resolution >= 0, "backbone.resolution",
          f"must be >= 0 (0 = the model's default), got {c.backbone.resolution}")
  _check_numbers(c)
  _check_rewards(c)
  s, t = c.sample, c.train
  for key, v in (("sample.num_steps", s.num_steps), ("sample.batch_size", s.batch_size),
                 ("sample.num_batches", s.num_batches), ("sample.group_size", s.group_size),
                 ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                 ("train.num_inner_epochs", t.num_inner_epochs), ("num_epochs", c.num_epochs)):
    require(int(v) >= 1, key, f"must be >= 1, got {v}")
  require(s.batch_size % s.group_size == 0, "sample.batch_size",
          f"{s.batch_size} is not a multiple of sample.group_size={s.group_size}")
  for key, b in device_batches(c).items():
    require(b % num_devices == 0, key, f"{b} is not divisible by the {num_devices} devices")
  per_epoch = s.batch_size * s.num_batches
  per_step = t.batch_size * t.grad_accum
  require(per_epoch % per_step == 0, "train.batch_size",
          f"samples per epoch ({s.batch_size} x {s.num_batches} = {per_epoch}) must be a multiple "
          f"of train.batch_size x train.grad_accum = {per_step}")
  require(0.0 < t.timestep_fraction <= 1.0, "train.timestep_fraction", "must be in (0, 1]")
  require(c.eval.num_samples >= 0, "eval.num_samples", "must be >= 0 (0 = no evaluation)")
  require(c.eval.num_samples % c.eval.batch_size == 0, "eval.num_samples",
          f"{c.eval.num_samples} is not a multiple of eval.batch_size={c.eval.batch_size}")
  require(int(t.max_consecutive_nonfinite) >= 1, "train.max_consecutive_nonfinite",
          f"must be >= 1, got {t.max_consecutive_nonfinite}")
  if c.lora.enabled:
    # Every trained network of a method (policy; generator, fake score, surrogate) is a set of
    # adapters on the one frozen base, which is also the reference: a distilled generator
    # cannot be that base.
    generator = c[section].get("generator_path")
    require(not generator, "lora.enabled",
            f"LoRA adapters share the reference's frozen base weights, so the generator "
            f"starts from the reference: set config.{section}.generator_path=\"\" or train "
            f"full weights (config.{section}.generator_path={generator!r})")
    require(int(c.lora.rank) >= 1, "lora.rank", f"must be >= 1, got {c.lora.rank}")
    require(float(c.lora.alpha) > 0, "lora.alpha", f"must be > 0, got {c.lora.alpha}")
    for pattern in c.lora.targets:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ConfigError(f"config.lora.targets: {pattern!r} is not a regular expression: "
                          f"{e}") from None
  extra = method.validate(c, "flow" if c.backbone.kind in FLOW_KINDS else "vp")
  _check_prompts(c, training)
  _check_backbone_folder(c)
  info = {
      "devices": num_devices,
      "processes": jax.process_count(),
      "samples_per_epoch": per_epoch,
      "samples_per_optimizer_step": per_step,
      "optimizer_steps_per_epoch": per_epoch // per_step * t.num_inner_epochs,
  }
  info.update(extra)
  return info
