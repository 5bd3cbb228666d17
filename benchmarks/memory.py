"""Per-device memory of the DDPO update and sampler at real sizes, without weights.

  python benchmarks/memory.py [--models=sdxl,zimage] [--fsdp=1,2,4,8]
                              [--dtypes=bfloat16,float32] [--modes=full,lora]
                              [--what=update,sampler] [--batch=8] [--compile=all|none]
                              [--topology=v5e:2x4] [--out=PATH]

For each (model, mode, dtype, fsdp) it builds the project's own DDPO trainer
(``train.loop.make_trainer`` -> ``train.ddpo.DDPOTrainer``) on an 8-device CPU mesh
``data x fsdp`` (``jax_num_cpu_devices`` = 8; data = 8 / fsdp, tensor 1) around a backbone whose
parameters are ``jax.ShapeDtypeStruct``s: nothing is allocated, no weight file is read. It
prints

- the state bytes per device **from the shardings** (exact, no compilation): the trainable
  parameters, the optimizer state (AdamW mu, nu, count; the clip has none), their sum, the frozen
  arrays the programs also take (a LoRA run's base weights; Z-Image's KL reference copy; the
  sampler's VAE), and the ratio of the state to the same run at fsdp 1 (ideal 1 / fsdp);
- for each program (``--what``: the trainer's jitted ``_update`` and ``_sample``), XLA's
  ``lower(...).compile().memory_analysis()`` per device: argument, output, alias (donated),
  temp (activations and scratch) and generated-code bytes, peak = argument + output - alias +
  temp, and the seconds spent tracing + lowering and compiling;
- a last line per model naming where the state does not shrink about 1 / fsdp: the biggest
  replicated leaves and why (logical axes mapped to no mesh axis, a dimension the fsdp axis
  does not divide, or LoRA adapters of a kernel whose axis they follow is not sharded).

How the abstract backbone is made (the smallest honest stand-in for a loaded pipeline):
the model configs below are written to a temporary folder and the pipeline's own abstract
builders (``pipelines.sd._component_fns`` / ``pipelines.zimage._component_fns``: the shape-only
modules an Orbax restore fills, with the same dtype, parameter dtype and remat as
``from_pretrained``) build the denoiser and the VAE; each parameter gets the sharding the
loaders give it (``parallel.mesh.param_sharding`` with ``config.mesh.rules`` + ``DEFAULT_RULES``).
The pipeline dataclass (``SDPipeline`` / ``ZImagePipeline``) is then built around them without
text encoders or tokenizers: prompts are encoded outside both programs, so the conditioning is
an abstract input of the shapes the encoders produce (SDXL: CLIP-L + bigG context (B, 77, 2048),
pooled (B, 1280), time ids (B, 6); Z-Image: Qwen3 features (B, 256, 2560) + mask).
The trainer is the unchanged ``DDPOTrainer``, with two things done outside it that its eager
``init_state`` and constructor would do on real arrays:
  * the state is built as ``init_state`` lays it out ({step, params, opt, ema}) with
    ``jax.eval_shape(trainer.tx.init, params)``; shardings follow what the eager code gives:
    loaded parameters keep their loader sharding, LoRA adapters the sharding of the kernel
    they adapt (``models.lora``), ``zeros_like`` optimizer moments inherit their parameter's
    sharding, and every leaf not on the whole mesh (the step / Adam counts) is replicated by
    ``common.on_mesh``
    (``tests/test_memory_bench.py`` checks this against ``init_state`` on concrete arrays);
  * ``ddpo.kl_beta`` is 0 while the trainer is constructed (its ``jnp.copy`` of the reference
    parameters needs arrays) and set back before lowering; the reference copy is passed to the
    update as an abstract argument with the parameters' shardings.
The update's batch is laid out by the trainer's own ``_prepare_impl`` (under ``eval_shape``)
from an epoch whose trajectory shapes come from the backbone's ``rollout``.

What the programs are: the configs ``configs/ddpo_sdxl.py`` / ``configs/ddpo_zimage.py``
(remat on, CFG in training, SDXL 50 sampling steps, Z-Image 10 with KL 0.04 and its 30 main
layers scanned: ``backbone.scan_layers``, ``--set backbone.scan_layers=False`` unrolls them) at
the models' 1024 px, with ``train.batch_size`` = ``sample.batch_size`` = ``--batch`` (global,
8 default: 1 sample per device, 2 with CFG), ``train.grad_accum`` = ``--grad_accum`` (1) and
``--train_steps`` (1) trained steps per sample. The update runs one network call per (micro-
batch, trained step) in a rolled loop (``common.accumulate``); every call's activations die
before the next, so a longer loop changes neither the compile time nor the memory (only the
gradient accumulator, one parameter-sized buffer, spans the loop). ``--what=sampler``
is the whole rollout (one ``lax.scan`` over the steps) plus the VAE decode.

Model configs. Written here from the public diffusers configs (no file in the repository holds
them): ``stabilityai/stable-diffusion-xl-base-1.0`` unet/config.json, vae/config.json and the
DDIM-relevant keys of scheduler/scheduler_config.json; ``Tongyi-MAI/Z-Image-Turbo``
transformer (``ZImageConfig``'s defaults are the 6B config: dim 3840, 30 layers, 2 + 2 refiner
layers, 30 heads, caption features 2560), its 16-channel Flux-type VAE (no quant convs), and the
flow scheduler (shift 3). ``tiny_sdxl`` / ``tiny_zimage`` are the small test models of
``didr_jax.testing`` (the test runs them).

Dtypes. ``--dtypes`` is ``config.backbone.dtype``. The SD loaders keep float32 parameters
whatever it is (it is the compute dtype; float32 master weights for a full fine-tune), so the
SDXL full state is the same in both; a LoRA run stores the UNet's frozen base in it (LoRA
adapters are float32 in every run). Z-Image's loader stores parameters in that dtype (and
AdamW's moments follow the parameters' dtype).

Numbers are the compiled memory analysis of the SPMD-partitioned program of one device:
XLA:CPU's by default; with ``--topology`` (an 8-chip TPU topology name such as v5e:2x4,
v6e:2x4, v4:2x2x2, v5p:2x2x2) the TPU compiler's, compiling ahead of time for chips libtpu
describes without any TPU attached (``pip install 'libtpu==0.0.42.*'``, the version jax[tpu]
0.10.2 pins; run with ``JAX_PLATFORMS=cpu``). The models then take their accelerator forms
(``layers.platform`` follows the mesh's devices): the Pallas TPU flash attention and lax's
convolution gradient, bfloat16 computed as such (XLA:CPU computes bfloat16 dots in float32 and
keeps a float32 copy of every weight live across the sampling loop). A TPU compile of the
SDXL sampler takes about 11 minutes and 15 GB of host memory on this project's 2-core CPU, the
(scanned) Z-Image sampler and update 2 to 4 minutes.
On the CPU back end the models' attention runs in cache-sized query
blocks (``layers.blocked_attention``: at most 2^20 score elements live per block, nothing of
size T x T kept for the backward); on TPUs it is the Pallas flash kernel
(``layers.flash_attention``: no score tensor in HBM either); on GPUs
``jax.nn.dot_product_attention``, whose XLA form materialises the (B, heads, T, T) scores
(Z-Image at 1024 px: 4608 tokens with its caption) unless cuDNN's fused kernel is chosen. The
state and argument bytes do not depend on the back end. The
programs are traced as the trainer traces them, under ``layers.activation_sharding``: every
model block keeps its hidden state batch-sharded (without it, XLA gathered the batch of half the
UNet's and all the VAE decoder's convolutions onto every device under fsdp).

Compile time on this project's 2-core CPU: see README "Memory at real sizes"; ``--compile=none``
prints the sharding-derived table alone (seconds), and the flags select the compiled subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

NUM_DEVICES = 8

# --------------------------------------------------------------------------------- configs

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}
# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
SDXL_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# its scheduler_config.json, the keys DDIM reads (the trainer samples with DDIM)
SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": False,
}
# Tongyi-MAI/Z-Image-Turbo transformer/config.json (the 6B S3-DiT)
ZIMAGE_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
    "in_channels": 16, "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30,
    "n_kv_heads": 30, "norm_eps": 1e-05, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
# its vae/config.json (the 16-channel Flux-type AutoencoderKL)
ZIMAGE_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
    "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}
ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

# The tiny test models (didr_jax/testing/tiny.py, tiny_zimage.py): what the test compiles.
TINY_SDXL_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
    "attention_head_dim": [2, 4], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2], "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [16, 32],
    "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8, "sample_size": 16,
}
TINY_ZIMAGE_TRANSFORMER = {
    "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 32, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32,
    "axes_dims": [4, 6, 6], "axes_lens": [1024, 64, 64],
}
TINY_ZIMAGE_VAE = {**TINY_VAE, "latent_channels": 16, "scaling_factor": 0.3611,
                   "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  family: str              # "sdxl" | "zimage"
  config: str              # configs/<config>.py: the DDPO config of this backbone
  denoiser: dict           # diffusers config of the UNet / transformer
  vae: dict
  scheduler: dict
  resolution: int          # pixels
  text_tokens: int         # caption tokens in training batches (SDXL: 77; Z-Image: 256)
  num_steps: int | None = None   # sampling steps; None: the config's


MODELS = {
    "sdxl": ModelSpec("sdxl", "ddpo_sdxl", SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER, 1024, 77),
    "zimage": ModelSpec("zimage", "ddpo_zimage", ZIMAGE_TRANSFORMER, ZIMAGE_VAE,
                        ZIMAGE_SCHEDULER, 1024, 256),
    "tiny_sdxl": ModelSpec("sdxl", "ddpo_sdxl", TINY_SDXL_UNET, TINY_VAE, SDXL_SCHEDULER, 32,
                           16, num_steps=4),
    "tiny_zimage": ModelSpec("zimage", "ddpo_zimage", TINY_ZIMAGE_TRANSFORMER, TINY_ZIMAGE_VAE,
                             ZIMAGE_SCHEDULER, 32, 32, num_steps=4),
}


# --------------------------------------------------------------------------------- helpers

def _jax():
  import jax
  return jax


def sds(shape, dtype, sharding=None):
  jax = _jax()
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def shard_bytes(x) -> int:
  """Bytes of one device's shard of an abstract array (its whole size when unsharded)."""
  import numpy as np
  shape = x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
  return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def global_bytes(x) -> int:
  import numpy as np
  return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
  return sum(shard_bytes(x) for x in _jax().tree.leaves(tree))


TOPOLOGY = ""  # --topology: compile for these TPU chips instead of the CPU devices


def target_devices():
  """The 8 devices programs are compiled for: the CPU's, or with ``TOPOLOGY`` (e.g. "v5e:2x4")
  the chips of that TPU topology, described by libtpu without any TPU attached (ahead-of-time
  compilation: the TPU compiler's own memory analysis)."""
  jax = _jax()
  if TOPOLOGY:
    from jax.experimental import topologies
    try:
      devices = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu").devices
    except Exception as e:  # no libtpu, or a name it does not know
      raise SystemExit(f"--topology={TOPOLOGY}: {str(e).splitlines()[0][:300]} (needs libtpu: "
                       "pip install 'libtpu==0.0.42.*', the version jax[tpu] pins)") from None
    if len(devices) != NUM_DEVICES:
      raise SystemExit(f"--topology={TOPOLOGY} has {len(devices)} chips, not {NUM_DEVICES}")
    return list(devices)
  devices = jax.devices()[:NUM_DEVICES]
  if len(devices) < NUM_DEVICES:
    raise SystemExit(f"needs {NUM_DEVICES} devices, JAX has {len(jax.devices())} (set "
                     "jax_num_cpu_devices before JAX initialises)")
  return devices


def make_mesh(fsdp: int):
  from didr_jax.parallel import mesh as mesh_lib
  devices = target_devices()
  return mesh_lib.make_mesh((("data", -1), ("fsdp", fsdp), ("tensor", 1)), devices=devices)


def place(module, mesh, rules):
  """The abstract ``module`` with every parameter's ShapeDtypeStruct carrying the sharding
  the loaders give it (``load_components``: ``mesh_lib.param_sharding`` with ``rules``)."""
  from flax import nnx
  from didr_jax.parallel import mesh as mesh_lib
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def put(var):
    value = var.get_value()
    return var.replace(sds(value.shape, value.dtype, mesh_lib.param_sharding(var, mesh, rules)))
  params = _jax().tree.map(put, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, params, rest)


def logical_axes(module) -> dict[str, tuple]:
  """Dotted parameter path -> logical axis names (for the replicated-leaf report)."""
  from flax import nnx
  from didr_jax.parallel import mesh as mesh_lib
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    out[".".join(str(p) for p in path)] = mesh_lib.variable_axes(var)
  return out


def abstract_backbone(spec: ModelSpec, dtype_name: str, remat: bool, mesh, rules,
                      unet_param_dtype=None, scan_layers: bool = False):
  """The pipeline of ``spec`` with shape-only, sharded denoiser and VAE (no text encoders); the
  SD UNet's parameters in ``unet_param_dtype`` (None: float32; ``train.loop.unet_param_dtype``
  of the run's config is what ``build_backbone`` loads); the Z-Image DiT's layers stacked with
  ``scan_layers``."""
  import jax.numpy as jnp
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  with tempfile.TemporaryDirectory() as folder:
    sub = "unet" if spec.family == "sdxl" else "transformer"
    for name, cfg in ((sub, spec.denoiser), ("vae", spec.vae)):
      os.makedirs(os.path.join(folder, name))
      with open(os.path.join(folder, name, "config.json"), "w") as f:
        json.dump(cfg, f)
    if spec.family == "sdxl":
      from didr_jax.diffusion.schedules import VPSchedule
      from didr_jax.pipelines import sd
      _, abstract = sd._component_fns(dtype, remat, unet_param_dtype or jnp.float32)
      unet = place(abstract["unet"](os.path.join(folder, "unet")), mesh, rules)
      vae = place(abstract["vae"](os.path.join(folder, "vae")), mesh, rules)
      return sd.SDPipeline(unet=unet, vae=vae, text_encoders=[], tokenizers=[],
                           schedule=VPSchedule.from_diffusers(spec.scheduler), kind="sdxl",
                           force_zeros_for_empty_prompt=True, folder=None,
                           resolution=spec.resolution)
    from didr_jax.diffusion import flow
    from didr_jax.pipelines import zimage
    _, abstract = zimage._component_fns(dtype, remat, scan_layers)
    transformer = place(abstract["transformer"](os.path.join(folder, "transformer")), mesh,
                        rules)
    vae = place(abstract["vae"](os.path.join(folder, "vae")), mesh, rules)
    return zimage.ZImagePipeline(
        transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
        scheduler=flow.FlowMatchConfig.from_diffusers(spec.scheduler), folder=None,
        resolution=spec.resolution, caption_length=spec.text_tokens)


def abstract_cond(spec: ModelSpec, batch: int, dtype, sharding_fn: Callable | None = None):
  """The prompt conditioning the text encoders would give ``batch`` prompts (abstract)."""
  import jax.numpy as jnp
  put = (lambda shape, dt: sds(shape, dt, None if sharding_fn is None else
                               sharding_fn(len(shape), batch)))
  if spec.family == "sdxl":
    from didr_jax.pipelines.sd import Cond
    d = spec.denoiser
    pooled = d["projection_class_embeddings_input_dim"] - 6 * d["addition_time_embed_dim"]
    return Cond(put((batch, spec.text_tokens, d["cross_attention_dim"]), dtype),
                put((batch, pooled), dtype), put((batch, 6), jnp.float32))
  from didr_jax.pipelines.zimage import Caption
  return Caption(put((batch, spec.text_tokens, spec.denoiser["cap_feat_dim"]), dtype),
                 put((batch, spec.text_tokens), jnp.bool_))


def build_config(spec: ModelSpec, *, mode: str, dtype: str, fsdp: int, batch: int,
                 grad_accum: int, train_steps: int, overrides: dict | None = None):
  """``configs/<spec.config>.py`` with this run's mesh, dtype, LoRA, batch and trained steps
  (and ``overrides``, dotted keys, last)."""
  from didr_jax.testing.configs import load_config
  base = load_config(spec.config)
  steps = spec.num_steps or base.sample.num_steps
  mdp = steps - int(bool(base.sample.deterministic_last_step))
  if not 1 <= train_steps <= mdp:
    raise SystemExit(f"--train_steps must be in [1, {mdp}]")
  return load_config(spec.config, **{
      "backbone.dtype": dtype, "lora.enabled": mode == "lora",
      "mesh.axes": (("data", -1), ("fsdp", fsdp), ("tensor", 1)),
      "sample.num_steps": steps, "sample.batch_size": batch,
      "sample.group_size": math.gcd(base.sample.group_size, batch),
      "train.batch_size": batch, "train.grad_accum": grad_accum,
      # int(num_steps x fraction) = train_steps (config.train_steps)
      "train.timestep_fraction": (train_steps + 0.5) / steps,
      "eval.num_samples": 0, **(overrides or {})})


# --------------------------------------------------------------------------------- the setup

@dataclasses.dataclass
class Setup:
  spec: ModelSpec
  config: Any
  mesh: Any
  rules: tuple
  backbone: Any
  trainer: Any
  state: Any          # abstract {step, params, opt, ema}
  ref_params: Any     # abstract KL reference (None without the KL term)
  axes: dict          # param path -> logical axes


def _on_mesh_sharding(x, mesh):
  """The sharding ``common.on_mesh`` leaves ``x`` with: its own if it is a NamedSharding over
  the whole mesh, else replicated."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  sh = getattr(x, "sharding", None)
  if isinstance(sh, NamedSharding) and set(sh.device_set) == set(mesh.devices.flat):
    return sh
  return NamedSharding(mesh, P())


def abstract_state(trainer, mesh):
  """``trainer.init_state()``'s layout and shardings, abstractly (see the module docstring)."""
  jax = _jax()
  import jax.numpy as jnp
  params = jax.tree.map(lambda s: sds(s.shape, s.dtype, _on_mesh_sharding(s, mesh)),
                        trainer.net.params)
  pdef = jax.tree.structure(params)
  opt = jax.eval_shape(trainer.tx.init, params)

  def place_opt(node):
    if jax.tree.structure(node) == pdef:  # a zeros_like(params) moment: the params' shardings
      return jax.tree.map(lambda o, p: sds(o.shape, o.dtype, p.sharding), node, params)
    return sds(node.shape, node.dtype, _on_mesh_sharding(None, mesh))
  opt = jax.tree.map(place_opt, opt, is_leaf=lambda n: jax.tree.structure(n) == pdef)
  step = sds((), jnp.int32, _on_mesh_sharding(None, mesh))
  return {"step": step, "params": {"policy": params}, "opt": {"policy": opt}, "ema": {}}


def make_setup(model: str, *, mode: str, dtype: str, fsdp: int, batch: int, grad_accum: int = 1,
               train_steps: int = 1, resolution: int = 0,
               overrides: dict | None = None) -> Setup:
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.train import loop
  spec = MODELS[model]
  if resolution:
    spec = dataclasses.replace(spec, resolution=resolution)
  c = build_config(spec, mode=mode, dtype=dtype, fsdp=fsdp, batch=batch,
                   grad_accum=grad_accum, train_steps=train_steps, overrides=overrides)
  mesh = make_mesh(fsdp)
  rules = tuple(c.mesh.rules) + mesh_lib.DEFAULT_RULES
  backbone = abstract_backbone(spec, dtype, bool(c.backbone.remat), mesh, rules,
                              loop.unet_param_dtype(c), bool(c.backbone.scan_layers))
  axes = logical_axes(backbone.model)
  kl_beta = float(c.ddpo.kl_beta)
  c.ddpo.kl_beta = 0.0     # the constructor copies concrete reference parameters
  trainer = loop.make_trainer(c, backbone, mesh)
  c.ddpo.kl_beta = kl_beta  # read when the loss is traced
  state = abstract_state(trainer, mesh)
  ref = state["params"]["policy"] if kl_beta > 0 else None
  return Setup(spec, c, mesh, rules, backbone, trainer, state, ref, axes)


def _key(mesh):
  jax = _jax()
  k = jax.eval_shape(lambda: jax.random.key(0))
  return sds(k.shape, k.dtype, _on_mesh_sharding(None, mesh))


def _batch_sharding_fn(mesh, rules):
  from didr_jax.parallel import mesh as mesh_lib
  return lambda ndim, batch: mesh_lib.batch_sharding(mesh, ndim, rules, batch)


def sampler_args(s: Setup):
  """Abstract arguments of ``trainer._sample`` for one sampling batch (``trainer.sample``)."""
  import jax.numpy as jnp
  c, mesh, bb = s.config, s.mesh, s.backbone
  b = c.sample.batch_size
  dtype = jnp.bfloat16 if c.backbone.dtype == "bfloat16" else jnp.float32
  shard = _batch_sharding_fn(mesh, s.rules)
  shape = bb.latent_shape(b)
  x_init = sds(shape, jnp.float32, shard(len(shape), b))
  cond = abstract_cond(s.spec, b, dtype, shard)
  rep = _on_mesh_sharding(None, mesh)
  uncond = (abstract_cond(s.spec, 1, dtype, lambda *_: rep)
            if c.sample.guidance_scale != 1.0 else None)
  args = (s.state["params"]["policy"], bb.frozen(), cond, uncond, x_init, _key(mesh),
          sds((), jnp.float32, rep), sds((c.sample.num_steps,), jnp.float32, rep))
  return args, {"num_steps": int(c.sample.num_steps)}


def update_args(s: Setup):
  """Abstract arguments of ``trainer._update`` for one optimizer step: the batch is what
  ``_prepare_impl`` lays out for an epoch of train.batch_size x grad_accum samples."""
  jax = _jax()
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from didr_jax.parallel import mesh as mesh_lib
  c, mesh, bb, tr = s.config, s.mesh, s.backbone, s.trainer
  dtype = jnp.bfloat16 if c.backbone.dtype == "bfloat16" else jnp.float32
  n = c.train.batch_size * c.train.grad_accum
  steps = int(c.sample.num_steps)
  lat = bb.latent_shape(n)
  traj = jax.eval_shape(
      lambda x, key, lv: bb.rollout(lambda x, t: x, x, num_steps=steps, eta=lv, rng=key,
                                    sde_type=c.sample.sde_type),
      sds(lat, jnp.float32), jax.eval_shape(lambda: jax.random.key(0)),
      sds((steps,), jnp.float32))
  f32 = jnp.float32
  data = {"latents": sds((n, steps + 1) + lat[1:], f32), "log_probs": sds((n, steps), f32),
          "levels": sds((n, steps), f32), "stochastic": sds((n, steps), jnp.bool_),
          "cond": abstract_cond(s.spec, n, dtype),
          "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
          "advantages": sds((n,), f32), "rewards": sds((n,), f32)}
  data = jax.tree.map(lambda x: sds(x.shape, x.dtype), data)
  epoch = jax.eval_shape(tr._prepare_impl, jax.eval_shape(lambda: jax.random.key(0)), data)

  def one_update(x):  # batches[u]: (grad_accum, train.batch_size, ...) with the batch sharded
    shape = x.shape[1:]
    spec = mesh_lib.logical_to_spec((None, "batch"), s.rules, mesh, shape)
    return sds(shape, x.dtype, NamedSharding(mesh, spec))
  batch = jax.tree.map(one_update, epoch)
  rep = _on_mesh_sharding(None, mesh)
  uncond = abstract_cond(s.spec, 1, dtype, lambda *_: rep) if c.train.cfg else None
  return (s.state, batch, uncond, s.ref_params, sds((), jnp.float32, rep), _key(mesh)), {}


# --------------------------------------------------------------------------------- measuring

def state_report(s: Setup) -> dict:
  """Sharding-derived bytes per device of the state and of the frozen program arguments."""
  jax = _jax()
  params = s.state["params"]["policy"]
  opt = s.state["opt"]["policy"]
  frozen = jax.tree.leaves(s.trainer.net.rest)  # LoRA: the base weights; full: none
  frozen_b = sum(shard_bytes(x) for x in frozen if hasattr(x, "sharding"))
  ref_b = tree_bytes(s.ref_params) if s.ref_params is not None else 0
  vae_b = tree_bytes(_vae_leaves(s.backbone))
  return {
      "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
      "params_bytes": tree_bytes(params), "opt_bytes": tree_bytes(opt),
      "state_bytes": tree_bytes(params) + tree_bytes(opt) + tree_bytes(s.state["step"]),
      "state_global_bytes": sum(global_bytes(x) for x in jax.tree.leaves(s.state)),
      "frozen_base_bytes": frozen_b, "ref_bytes": ref_b, "vae_bytes": vae_b,
  }


def _vae_leaves(bb):
  from flax import nnx
  return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(bb.frozen()))]


def replicated_report(s: Setup, top: int = 5) -> dict:
  """The state leaves (parameters with their AdamW moments) that are not sharded, biggest
  first, with the reason; totals by reason."""
  jax = _jax()
  from didr_jax.parallel import mesh as mesh_lib
  params = s.state["params"]["policy"]
  fsdp = s.mesh.shape["fsdp"]
  lora = s.config.lora.enabled
  rows, by_reason = [], {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if shard_bytes(x) != global_bytes(x) or fsdp == 1:
      continue
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    axes = s.axes.get(name)
    if lora:
      why = "LoRA adapter of a kernel not sharded on the axis it follows"
    elif not axes:
      why = "no logical axes"
    else:
      spec = mesh_lib.logical_to_spec(axes, s.rules, s.mesh)
      if not any(spec):
        why = f"axes {tuple(axes)} map to no mesh axis"
      else:
        why = f"axes {tuple(axes)}: fsdp={fsdp} does not divide shape {tuple(x.shape)}"
    # the parameter plus its two AdamW moments (same shape and dtype)
    b = 3 * global_bytes(x)
    rows.append((b, name, why))
    key = why if not why.startswith("axes (") or "map to no" in why else "a dimension fsdp does not divide"
    by_reason[key] = by_reason.get(key, 0) + b
  rows.sort(reverse=True)
  return {"total_bytes": sum(r[0] for r in rows), "count": len(rows),
          "top": [{"name": n, "bytes": b, "why": w} for b, n, w in rows[:top]],
          "by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1]))}


def compile_program(s: Setup, what: str) -> dict:
  """Lowers and compiles the trainer's jitted ``what`` ("update" | "sampler") on abstract
  arguments; returns XLA's per-device memory analysis and the timings."""
  jax = _jax()
  fn, (args, kw) = ((s.trainer._update, update_args(s)) if what == "update"
                    else (s.trainer._sample, sampler_args(s)))
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = fn.lower(*args, **kw)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  m = compiled.memory_analysis()
  # wall seconds, and CPU seconds of this process (all threads): on a shared machine the wall
  # time says more about the other jobs than about XLA
  out = {"lower_s": t1 - t0, "compile_s": t2 - t1, "lower_cpu_s": c1 - c0,
         "compile_cpu_s": c2 - c1}
  for k in ("argument", "output", "alias", "temp", "generated_code"):
    out[k + "_bytes"] = int(getattr(m, f"{k}_size_in_bytes"))
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  if what == "update":  # does the new state keep the input state's shardings?
    changed = {}
    for i, o in zip(jax.tree.leaves(s.state), jax.tree.leaves(compiled.output_shardings[0])):
      if not o.is_equivalent_to(i.sharding, len(i.shape)):
        k = f"{i.sharding.spec} -> {getattr(o, 'spec', o)}"
        n, b = changed.get(k, (0, 0))
        changed[k] = (n + 1, b + global_bytes(i))
    out["state_layout_changed"] = sum(n for n, _ in changed.values())
    out["state_layout_changes"] = {k: {"leaves": n, "bytes": b} for k, (n, b) in
                                   sorted(changed.items(), key=lambda kv: -kv[1][1])}
  del compiled, lowered
  return out


# --------------------------------------------------------------------------------- table

def _gb(b) -> str:
  """Bytes as GiB (2 decimals) from 1 GiB up, else MiB."""
  if b is None:
    return "-"
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def fmt_row(r: dict) -> str:
  c = r.get("compiled") or {}
  ratio = r["ratio"]
  cols = [r["model"], r["mode"], r["dtype"], str(r["fsdp"]),
          r["what"] + "".join(f" {k}={v}" for k, v in (r.get("overrides") or {}).items()),
          f"{r['param_count'] / 1e6:.1f}M", _gb(r["params_bytes"]), _gb(r["opt_bytes"]),
          _gb(r["state_bytes"]),
          f"{ratio:.3f} ({1 / r['fsdp']:.3f})",
          _gb(r["frozen_bytes"]),
          _gb(c.get("argument_bytes")), _gb(c.get("output_bytes")), _gb(c.get("alias_bytes")),
          _gb(c.get("temp_bytes")), _gb(c.get("peak_bytes")),
          "-" if not c else (f"{c['lower_s']:.0f} + {c['compile_s']:.0f} "
                             f"(CPU {c['lower_cpu_s']:.0f} + {c['compile_cpu_s']:.0f})")]
  return "| " + " | ".join(cols) + " |"


HEADER = ("| model | mode | dtype | fsdp | program | trainable | params | opt | state | "
          "state vs fsdp 1 (ideal) | frozen | argument | output | alias | temp | peak | "
          "lower + compile s, wall (CPU) |\n"
          "|" + "---|" * 17)


def frozen_for(r: dict, what: str) -> int:
  """Frozen bytes a program takes: the LoRA base (both), the KL reference (update), the VAE
  (sampler)."""
  return r["frozen_base_bytes"] + (r["ref_bytes"] if what == "update" else r["vae_bytes"])


def run(models, modes, dtypes, fsdps, whats, *, batch: int, grad_accum: int, train_steps: int,
        compile_programs: bool, resolution: int = 0, overrides: dict | None = None, log=print, save: Callable | None = None) -> dict:
  """Every (model, mode, dtype, fsdp) x program; ``save(result)`` after each row."""
  jax = _jax()
  rows = []
  for model in models:
    for mode in modes:
      for dtype in dtypes:
        for fsdp in fsdps:
          t0 = time.perf_counter()
          s = make_setup(model, mode=mode, dtype=dtype, fsdp=fsdp, batch=batch,
                         grad_accum=grad_accum, train_steps=train_steps,
                         resolution=resolution, overrides=overrides)
          rep = state_report(s)
          repl = replicated_report(s)
          log(f"# {model} {mode} {dtype} fsdp={fsdp}: built in {time.perf_counter() - t0:.1f} s, "
              f"state {rep['state_bytes'] / 2**30:.3f} GiB/device of "
              f"{rep['state_global_bytes'] / 2**30:.3f} GiB; replicated "
              f"{repl['total_bytes'] / 2**20:.1f} MiB in {repl['count']} parameters")
          for what in whats:
            row = {"model": model, "mode": mode, "dtype": dtype, "fsdp": fsdp, "what": what,
                   "batch": batch, "resolution": s.spec.resolution,
                   "overrides": dict(overrides or {}),
                   **rep,
                   # at fsdp 1 every state leaf is whole on every device
                   "ratio": rep["state_bytes"] / rep["state_global_bytes"],
                   "frozen_bytes": frozen_for(rep, what), "replicated": repl, "compiled": None}
            if compile_programs:
              try:
                row["compiled"] = compile_program(s, what)
              except Exception as e:  # report and go on with the other programs
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"# {model} {mode} {dtype} fsdp={fsdp} {what}: {row['error']}")
              gc.collect()
            rows.append(row)
            log(fmt_row(row))
            if save is not None:
              save(summarize(rows))
          del s
          jax.clear_caches()
          gc.collect()
  return summarize(rows)


def summarize(rows) -> dict:
  return {"rows": rows, "notes": shrink_notes(rows), "layout_notes": layout_notes(rows)}


def layout_notes(rows) -> list[str]:
  """One line per compiled update whose new state comes out laid out differently."""
  out = []
  for r in rows:
    c = r.get("compiled") or {}
    if c.get("state_layout_changed"):
      parts = "; ".join(f"{k}: {v['leaves']} leaves, {v['bytes'] / 2**20:.1f} MiB"
                        for k, v in list(c.get("state_layout_changes", {}).items())[:3])
      out.append(f"- {r['model']} {r['mode']} {r['dtype']} fsdp={r['fsdp']}: the update returns "
                 f"{c['state_layout_changed']} state leaves with another sharding than they "
                 f"came in with ({parts})")
  return out


def shrink_notes(rows) -> list[str]:
  """One line per (model, mode, dtype): where the state does not shrink about 1 / fsdp (at
  the largest fsdp of the rows)."""
  out, seen = [], set()
  for r in rows:
    key = (r["model"], r["mode"], r["dtype"])
    if key in seen:
      continue
    seen.add(key)
    worst = max((x for x in rows if (x["model"], x["mode"], x["dtype"]) == key),
                key=lambda x: x["fsdp"])
    if worst["fsdp"] == 1:
      continue
    rp = worst["replicated"]
    top = ", ".join(f"{t['name']} ({t['bytes'] / 2**20:.1f} MiB: {t['why']})"
                    for t in rp["top"][:3])
    reasons = "; ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in rp["by_reason"].items())
    out.append(f"- {key[0]} {key[1]} {key[2]}: state at fsdp {worst['fsdp']} is "
               f"{worst['ratio']:.3f} of fsdp 1 (ideal {1 / worst['fsdp']:.3f}); replicated: "
               f"{rp['total_bytes'] / 2**20:.1f} MiB (parameter + AdamW moments) in "
               f"{rp['count']} parameters [{reasons}]; biggest: {top or 'none'}")
  return out


def render(result) -> str:
  md = "\n".join([HEADER] + [fmt_row(r) for r in result["rows"]])
  notes = "\n".join(result["notes"]) or "- the state shrinks 1 / fsdp everywhere"
  md += "\n\nWhere the state does not shrink 1 / fsdp:\n" + notes
  if result["layout_notes"]:
    md += ("\n\nUpdates whose output state is sharded differently from their input (jit has no "
           "out_shardings; XLA picks these):\n" + "\n".join(result["layout_notes"]))
  return md


def _csv(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="sdxl,zimage")
  ap.add_argument("--fsdp", default="1,2,4,8")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--modes", default="full,lora")
  ap.add_argument("--what", default="update,sampler")
  ap.add_argument("--batch", type=int, default=8,
                  help="train.batch_size = sample.batch_size (global; a multiple of 8)")
  ap.add_argument("--grad_accum", type=int, default=1)
  ap.add_argument("--train_steps", type=int, default=1,
                  help="trained steps per sample (network calls per micro-batch)")
  ap.add_argument("--resolution", type=int, default=0,
                  help="image size in pixels; 0: the model's (1024 for sdxl and zimage)")
  ap.add_argument("--compile", default="all", choices=("all", "none"),
                  help="none: only the sharding-derived state bytes")
  ap.add_argument("--set", action="append", default=[],
                  help="dotted.config.key=python literal, e.g. backbone.remat=False")
  ap.add_argument("--xla_O0", type=int, default=1,
                  help="1: compile with --xla_backend_optimization_level=0 (same bytes, faster)")
  ap.add_argument("--topology", default="",
                  help="compile for an 8-chip TPU topology (v5e:2x4, v6e:2x4, v4:2x2x2, "
                       "v5p:2x2x2) ahead of time on this host (needs libtpu); '': CPU devices")
  ap.add_argument("--out", default="", help="write PATH.json and PATH.md (after every row)")
  ap.add_argument("--merge", default="",
                  help="comma-separated JSON files of earlier runs: print (and --out) their "
                       "rows as one table; nothing is built")
  args = ap.parse_args(argv)

  def save(result):
    if args.out:
      meta = {"argv": sys.argv[1:] if argv is None else list(argv)}
      with open(args.out + ".json", "w") as f:
        json.dump({**meta, **result}, f, indent=1, default=str)
      with open(args.out + ".md", "w") as f:
        f.write(render(result) + "\n")

  if args.merge:
    rows = []
    for path in _csv(args.merge):
      with open(path) as f:
        rows += json.load(f)["rows"]
    for r in rows:
      r["ratio"] = r["state_bytes"] / r["state_global_bytes"]
    result = summarize(rows)
    print(render(result), flush=True)
    save(result)
    return result

  global TOPOLOGY
  TOPOLOGY = args.topology
  if (args.xla_O0 and not TOPOLOGY
      and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    # LLVM -O0: about half of XLA:CPU's compile time; buffer assignment (what memory_analysis
    # reports) happens before it, so the bytes are the same (checked on the tiny models)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()
  jax = _jax()
  try:
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
  except Exception:  # already initialised (imported by a test): its devices must do
    pass
  models = _csv(args.models)
  for m in models:
    if m not in MODELS:
      raise SystemExit(f"--models: unknown {m!r}; known: {sorted(MODELS)}")
  fsdps = [int(f) for f in _csv(args.fsdp)]
  if any(NUM_DEVICES % f for f in fsdps):
    raise SystemExit(f"--fsdp values must divide {NUM_DEVICES}")
  if args.batch % NUM_DEVICES:
    raise SystemExit(f"--batch must be a multiple of {NUM_DEVICES}")
  import ast
  overrides = {}
  for kv in args.set:
    k, v = kv.split("=", 1)
    overrides[k] = ast.literal_eval(v)
  whats = _csv(args.what)
  if set(whats) - {"update", "sampler"}:
    raise SystemExit("--what: update and/or sampler")
  where = (f"TPU {TOPOLOGY} ({target_devices()[0].device_kind}), compiled ahead of time"
           if TOPOLOGY else f"backend {jax.default_backend()}, {len(jax.devices())} devices")
  print(f"{where}, mesh data x fsdp "
        f"(tensor 1); batch {args.batch} (global), grad_accum {args.grad_accum}, "
        f"{args.train_steps} trained step(s) per sample", flush=True)
  log = lambda line: print(line, flush=True)
  log(HEADER)
  t0 = time.perf_counter()
  result = run(models, _csv(args.modes), _csv(args.dtypes), fsdps, whats, batch=args.batch,
               grad_accum=args.grad_accum, train_steps=args.train_steps,
               compile_programs=args.compile == "all", resolution=args.resolution,
               overrides=overrides, log=log,
               save=save)
  print("\n" + render(result), flush=True)
  print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)
  save(result)
  return result


if __name__ == "__main__":
  main()
