"""Builds the toy world's shipped checkpoints (the command that regenerates the assets).

  python -m didr_jax.toy.pretrain --out=didr_jax/toy/assets [--stages=clip,unet,dit,onestep]

1. a CLIP BPE tokenizer whose words are the toy grammar's (``toy.tokenizer``);
2. the toy CLIP (``CLIPModel`` of our CLIP port, tiny) trained contrastively on rendered shapes
   and their prompts: the differentiable reward (scaled cosine similarity, PickScore's form) and
   the feature extractor of the toy fidelity metric;
3. the toy base: a pixel-space ``UNet2DConditionModel`` (32 x 32 x 3, no VAE) conditioned on the
   frozen toy-CLIP text tower, trained by denoising score matching (epsilon prediction, DDPM
   linear betas) with 10% prompt dropout for classifier-free guidance; EMA weights are shipped;
4. the toy DiT: a pixel-space ``ZImageTransformer2DModel`` (patch 2, 4 layers, width 64) with a
   2-layer ``Qwen3Model`` text encoder read as Z-Image reads it (chat template, hidden state -2)
   and a Qwen3-style tokenizer, both trained together by flow matching (velocity eps - x0,
   uniform sigma, shift 1) with 10% prompt dropout; EMA weights are shipped.

Shipped runs (2-core CPU, the flag defaults): CLIP 1500 steps x 64, UNet 3000 steps x 32 (about
40 minutes), DiT 4000 steps x 32 (48 minutes, final loss 0.075). ``--dit_init=FOLDER`` continues
the DiT stage from a toy_dit folder (e.g. ``--stages=dit --dit_init=didr_jax/toy/assets/toy_dit
--out=/tmp/longer --dit_steps=2500 --dit_lr=5e-4``), so a longer run can be done in pieces.

5. (``--stages=onestep``, not in the default stages) the one-step toy generator: the toy UNet
   read as a one-step generator at t = 399 (``train.one_step``, x0 clipped as the toy
   scheduler's ``clip_sample``), distilled from ``OUT/toy_unet`` by our own DI (the DIDR trainer
   at mode "di": no reward, reference CFG 3), written as a diffusers UNet folder
   ``OUT/toy_onestep`` (config.json + safetensors) holding the generator EMA in bfloat16, 2 MB
   (the start of ``configs/toy_didr.py``), also every ``--onestep_export_every`` steps. The
   shipped one: ``python -m didr_jax.toy.pretrain --stages=onestep --onestep_steps=400
   --unet_batch=32`` (``--out`` must hold ``toy_unet``), 50 min wall on the 2-core CPU shared
   with two training runs. Held-out: toy-CLIP 3.66, detector 0.071, shape accuracy 0.38, FD
   112.7 against the undistilled teacher's 1.94 / 0.011 / 0.22 / 109.1 (README, DIDR section).

6. (``--stages=tdm``, not in the default stages) the 4-step toy TDM student: the toy UNet
   distilled from ``OUT/toy_unet`` (teacher CFG 3) by our TDM trainer (``train/tdm.py``: the
   K = 4 deterministic student on the trailing DDIM grid 999, 749, 499, 249, an online fake
   score, 2 boundaries per iteration), written as a UNet component folder ``OUT/toy_tdm`` with
   the student EMA in bfloat16 (what ``configs/toy_tdmr1.py`` starts from). Command:
   ``python -m didr_jax.toy.pretrain --stages=tdm --out=didr_jax/toy/assets`` (160 iterations of
   32 rollouts; 31 min on one core).

Everything is written in diffusers / transformers formats (safetensors + config.json), so the
toy bases also load in PyTorch (``tests/test_toy_assets.py`` checks the DiT's outputs there).

The stages sit on top of the package's layers (``benchmarks/import_graph.py``): they drive the
trainers of ``train``; the toy world they train for (shapes, tokenizer, toy CLIP, detector,
fidelity) sits low and imports none of this module.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from didr_jax.convert import core
from didr_jax.diffusion import kernels
from didr_jax.diffusion.schedules import VPSchedule
from didr_jax.models import clip, qwen3, unet as unet_lib, zimage_dit
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.pipelines import zimage as zimage_pipe
from didr_jax.testing.configs import load_config
from didr_jax.toy import shapes, tokenizer as tok_lib
from didr_jax.train import (config as config_lib, didr as didr_lib, didr_config, loop,
                            prompts as prompts_lib, tdm as tdm_lib)

MAX_TOKENS = 12
IMAGE_SIZE = 32

CLIP_CONFIG = {
    "model_type": "clip", "projection_dim": 64, "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS,
                    "hidden_act": "quick_gelu", "projection_dim": 64},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 4,
                      "num_channels": 3, "hidden_act": "quick_gelu", "projection_dim": 64},
}

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "sample_size": IMAGE_SIZE, "in_channels": 3,
    "out_channels": 3, "layers_per_block": 1, "block_out_channels": [16, 32, 64],
    # attention only at 8 x 8 (and the mid block): at 16 x 16 it doubles the CPU cost
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 8,
}

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon",
    "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
    "timestep_spacing": "trailing",
}

# CLIP pixel normalisation (the toy CLIP sees images in [0, 1] mapped to [-1, 1]).
def clip_pixels(images: jax.Array) -> jax.Array:
  return images * 2.0 - 1.0


flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "assets"), "output folder")
flags.DEFINE_integer("clip_steps", 1500, "contrastive training steps of the toy CLIP")
flags.DEFINE_integer("unet_steps", 3000, "denoising training steps of the toy UNet")
flags.DEFINE_integer("dit_steps", 4000, "flow-matching training steps of the toy DiT")
flags.DEFINE_float("dit_lr", 1e-3, "peak learning rate of the toy DiT stage")
flags.DEFINE_string("dit_init", "", "a toy_dit folder to continue training from (its transformer, "
                    "text encoder and tokenizer) instead of a random init: long runs in pieces")
flags.DEFINE_list("stages", ["clip", "unet", "dit"],
                  "what to (re)build: clip, unet, dit, onestep")
flags.DEFINE_integer("onestep_steps", 400, "generator updates of the one-step DI stage")
flags.DEFINE_float("onestep_lr", 1e-4, "learning rate of the one-step generator and fake score")
flags.DEFINE_integer("onestep_export_every", 100, "also write the one-step generator every this "
                     "many steps (0: only at the end)")
flags.DEFINE_integer("tdm_steps", 160, "iterations of the 4-step TDM stage")
flags.DEFINE_float("tdm_lr", 1e-4, "learning rate of the TDM student (the fake score: 2x)")
flags.DEFINE_integer("tdm_export_every", 40, "also write the TDM student every this many "
                     "iterations (0: only at the end)")
flags.DEFINE_integer("batch", 64, "batch size of the CLIP stage")
flags.DEFINE_integer("unet_batch", 32, "batch size of the UNet and DiT stages")
flags.DEFINE_integer("seed", 0, "seed")
FLAGS = flags.FLAGS


def words() -> tuple[str, ...]:
  return tuple(sorted({w for p in shapes.all_prompts() for w in p.split()}))


def load_tokenizer(folder: str):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder)


def tokenize(tok, prompts) -> np.ndarray:
  return np.asarray(tok(list(prompts), padding="max_length", max_length=MAX_TOKENS,
                        truncation=True, return_tensors="np").input_ids, np.int32)


def _data(step: int, batch: int, seed: int):
  images, prompts = shapes.dataset(batch, seed=seed * 1_000_003 + step)
  return images.astype(np.float32) / 255.0, prompts


def train_clip(out: str, tok, steps: int, batch: int, seed: int) -> clip.CLIPModel:
  cfg = dict(CLIP_CONFIG)
  cfg["text_config"] = {**cfg["text_config"], "vocab_size": len(tok),
                        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                        "pad_token_id": tok.pad_token_id}
  model = clip.CLIPModel(clip.CLIPConfig.from_hf(cfg), rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(model, optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, 1e-3, min(100, steps // 10 + 1), steps + 1, 1e-5), weight_decay=1e-4), wrt=nnx.Param)

  @nnx.jit
  def step_fn(model, opt, ids, pixels):
    def loss_fn(model):
      out = model(ids, clip_pixels(pixels))
      # identical prompts in a batch are positives of each other
      same = (ids[:, None, :] == ids[None, :, :]).all(-1).astype(jnp.float32)
      target = same / same.sum(-1, keepdims=True)
      l_i = optax.softmax_cross_entropy(out.logits_per_image, target).mean()
      l_t = optax.softmax_cross_entropy(out.logits_per_text, target).mean()
      return 0.5 * (l_i + l_t)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  t0 = time.time()
  for s in range(steps):
    images, prompts = _data(s, batch, seed)
    loss = step_fn(model, opt, jnp.asarray(tokenize(tok, prompts)), jnp.asarray(images))
    if s % 100 == 0 or s == steps - 1:
      print(f"clip step {s}/{steps} loss {float(loss):.4f} ({time.time() - t0:.0f} s)", flush=True)
  clip.save_clip(model, os.path.join(out, "toy_clip"))
  tok.save_pretrained(os.path.join(out, "toy_clip"))
  return model


def fit(model: nnx.Module, loss_fn, batch_fn, *, steps: int, lr: float, seed: int,
        name: str, ema_decay: float = 0.999) -> list[float]:
  """Trains every ``nnx.Param`` of ``model`` with AdamW (warmup-cosine schedule, gradient norm
  clipped to 1) on ``loss_fn(model, batch, rng)`` with ``batch = batch_fn(step)``, then loads
  the EMA of the weights into ``model`` (what is shipped). Returns the loss per step."""
  ema = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), steps + 1,
                                         lr / 20), weight_decay=1e-4)), wrt=nnx.Param)

  @nnx.jit
  def step_fn(model, opt, ema, batch, rng):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch, rng)
    opt.update(model, grads)
    new = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return loss, jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, new)

  t0 = time.time()
  rng = jax.random.key(seed)
  losses = []
  for s in range(steps):
    loss, ema = step_fn(model, opt, ema, batch_fn(s), jax.random.fold_in(rng, s))
    losses.append(float(loss))
    if s % 100 == 0 or s == steps - 1:
      print(f"{name} step {s}/{steps} loss {np.mean(losses[-100:]):.4f} "
            f"({time.time() - t0:.0f} s)", flush=True)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, ema)
  nnx.update(model, state)
  return losses


def _drop(rng, cond, uncond, p: float = 0.1):
  """Replaces each row of the pytree ``cond`` by ``uncond``'s with probability ``p`` (prompt
  dropout for classifier-free guidance)."""
  b = jax.tree.leaves(cond)[0].shape[0]
  keep = jax.random.uniform(rng, (b,)) >= p
  return jax.tree.map(lambda c, u: jnp.where(keep.reshape((b,) + (1,) * (c.ndim - 1)), c, u),
                      cond, uncond)


def train_unet(out: str, tok, text_model, steps: int, batch: int, seed: int):
  folder = os.path.join(out, "toy_unet")
  sched = VPSchedule.from_diffusers(SCHEDULER_CONFIG)
  model = unet_lib.UNet2DConditionModel(UNET_CONFIG, rngs=nnx.Rngs(seed + 1))
  encode = nnx.jit(lambda text_model, ids: text_model(ids).last_hidden_state)
  empty_ctx = encode(text_model, jnp.asarray(tokenize(tok, [""])))

  def batch_fn(s):
    images, prompts = _data(s, batch, seed + 7)
    return encode(text_model, jnp.asarray(tokenize(tok, prompts))), jnp.asarray(images) * 2 - 1

  def loss_fn(model, batch, rng):
    ctx, x0 = batch
    k_t, k_e, k_d = jax.random.split(rng, 3)
    t = kernels.sample_vp_timesteps(k_t, (x0.shape[0],), sched.num_train_timesteps)
    eps = jax.random.normal(k_e, x0.shape)
    x_t = kernels.q_sample(x0, eps, *kernels.vp_alpha_sigma(sched, t))
    ctx = _drop(k_d, ctx, jnp.broadcast_to(empty_ctx, ctx.shape))
    return jnp.mean((model(x_t, t, ctx) - eps) ** 2)

  fit(model, loss_fn, batch_fn, steps=steps, lr=2e-3, seed=seed + 2, name="unet")
  save_pipeline(folder, model, text_model, tok)
  return model


# ---------------------------------------------------------------------------------------------
# the toy DiT: a tiny Z-Image in pixel space

DIT_CAPTION_LENGTH = 32  # caption tokens (the longest templated toy prompt has 15)

QWEN_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "rope_theta": 10000.0, "max_position_embeddings": 64, "rms_norm_eps": 1e-6}

# Patch 2: diffusers' ZImagePipeline calls its transformer with patch size 2, and a patch-4 toy
# (width 96) drew shapes as scattered 4 x 4 blocks that the detector rarely recognised.
DIT_CONFIG = {
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
    "in_channels": 3, "dim": 64, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 4,
    "n_kv_heads": 4, "cap_feat_dim": QWEN_CONFIG["hidden_size"], "axes_dims": [4, 6, 6],
    "axes_lens": [64, 32, 32], "rope_theta": 256.0, "qk_norm": True, "norm_eps": 1e-5,
    "t_scale": 1000.0,
}

FLOW_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                         "num_train_timesteps": 1000, "shift": 1.0,
                         "use_dynamic_shifting": False}


class _DiTWithText(nnx.Module):
  """The toy DiT and its Qwen3 text encoder, trained together (the encoder is frozen later):
  random (``seed``) or loaded from a toy_dit folder ``init``."""

  def __init__(self, tok, seed: int, init: str = ""):
    if init:
      self.text_encoder = qwen3.load_qwen3(os.path.join(init, "text_encoder"))
      self.transformer = zimage_dit.load_zimage_transformer(os.path.join(init, "transformer"))
      return
    cfg = qwen3.Qwen3Config.from_hf({**QWEN_CONFIG, "vocab_size": len(tok),
                                     "pad_token_id": tok.pad_token_id})
    self.text_encoder = qwen3.Qwen3Model(cfg, rngs=nnx.Rngs(seed))
    self.transformer = zimage_dit.ZImageTransformer(
        zimage_dit.ZImageConfig.from_diffusers(DIT_CONFIG), rngs=nnx.Rngs(seed + 1))


def train_dit(out: str, steps: int, batch: int, seed: int, *, lr: float = 1e-3, init: str = ""):
  """Flow matching (x_sig = (1 - sig) x0 + sig eps, target v = eps - x0, sig ~ U[0, 1)) of the
  DiT jointly with its text encoder, captions encoded as Z-Image does (chat template, hidden
  state -2), 10% prompt dropout to the empty prompt. ``init``: a toy_dit folder to continue
  from (the tokenizer is rebuilt from the grammar, so it must be that folder's)."""
  folder = os.path.join(out, "toy_dit")
  tok = tok_lib.qwen_tokenizer(words() + ("user", "assistant"))
  if init and tok.get_vocab() != load_tokenizer(os.path.join(init, "tokenizer")).get_vocab():
    raise ValueError(f"--dit_init={init}: its tokenizer is not the toy grammar's")
  model = _DiTWithText(tok, seed + 11, init)

  def ids(prompts):
    return tuple(jnp.asarray(a) for a in qwen3.tokenize_prompts_zimage(
        tok, prompts, max_length=DIT_CAPTION_LENGTH, bucket=DIT_CAPTION_LENGTH))

  empty = ids([""])

  def batch_fn(s):
    images, prompts = _data(s, batch, seed + 17)
    return ids(prompts), jnp.asarray(images) * 2 - 1

  def loss_fn(model, batch, rng):
    (tokens, mask), x0 = batch
    k_t, k_e, k_d = jax.random.split(rng, 3)
    tokens, mask = _drop(k_d, (tokens, mask),
                         tuple(jnp.broadcast_to(e, tokens.shape) for e in empty))
    h = model.text_encoder(tokens, mask, hidden_state_index=-2)
    caption = zimage_pipe.Caption(h * mask[..., None], mask)
    sig = kernels.sample_flow_sigmas(k_t, (x0.shape[0],))
    eps = jax.random.normal(k_e, x0.shape)
    x_t = kernels.q_sample(x0, eps, *kernels.flow_alpha_sigma(sig))
    v = zimage_pipe.dit_velocity(model.transformer, x_t, sig, caption)
    return jnp.mean((v - (eps - x0)) ** 2)

  fit(model, loss_fn, batch_fn, steps=steps, lr=lr, seed=seed + 12, name="dit")
  save_dit_pipeline(folder, model.transformer, model.text_encoder, tok)
  return model


def save_dit_pipeline(folder: str, transformer, text_encoder, tok) -> None:
  """A diffusers-layout pixel-space ``ZImagePipeline`` folder: no VAE, Qwen3 text encoder."""
  for sub in ("text_encoder", "scheduler"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  index = {"_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0",
           "transformer": ["diffusers", "ZImageTransformer2DModel"],
           "text_encoder": ["transformers", "Qwen3Model"],
           "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": [None, None],
           "resolution": IMAGE_SIZE, "caption_length": DIT_CAPTION_LENGTH}
  _write_json(os.path.join(folder, "model_index.json"), index)
  zimage_dit.save_zimage_transformer(transformer, os.path.join(folder, "transformer"))
  _write_json(os.path.join(folder, "text_encoder", "config.json"), text_encoder.config.to_hf())
  core.save_safetensors(qwen3.export_qwen3(text_encoder),
                        os.path.join(folder, "text_encoder", "model.safetensors"))
  tok.save_pretrained(os.path.join(folder, "tokenizer"))
  _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), FLOW_SCHEDULER_CONFIG)


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def save_pipeline(folder: str, unet, text_model, tok, unet_config: dict | None = None) -> None:
  """A diffusers-layout pixel-space pipeline folder: no VAE, toy-CLIP text encoder."""
  for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.36.0",
           "unet": ["diffusers", "UNet2DConditionModel"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", "DDIMScheduler"], "vae": [None, None],
           "safety_checker": [None, None], "feature_extractor": [None, None],
           "requires_safety_checker": False}
  _write_json(os.path.join(folder, "model_index.json"), index)
  _write_json(os.path.join(folder, "unet", "config.json"), unet_config or UNET_CONFIG)
  core.save_safetensors(unet_lib.export_unet(unet),
                        os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
  clip.save_clip(text_model, os.path.join(folder, "text_encoder"))
  tok.save_pretrained(os.path.join(folder, "tokenizer"))
  _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)


def train_onestep(out: str, steps: int, batch: int, seed: int, *, lr: float = 1e-4,
                  export_every: int = 0) -> str:
  """Distils ``OUT/toy_onestep`` from ``OUT/toy_unet`` with DI (see the module docstring):
  each step 2 fake-score DSM updates and one generator update on ``batch`` training prompts;
  the generator EMA (decay 0.99) is written in bfloat16. Returns the folder."""
  c = config_lib.base_config()
  c.method, c.seed = "didr", seed
  c.backbone.path = os.path.join(out, "toy_unet")
  c.rewards = {"toy_clip": 1.0}
  c.sample.batch_size = c.train.batch_size = batch
  c.train.learning_rate, c.train.weight_decay = lr, 0.0
  c.didr = didr_config.didr_section()
  c.didr.mode, c.didr.ref_cfg, c.didr.fake_updates, c.didr.ema_decay = "di", 3.0, 2, 0.99
  c = config_lib.finalize(c)
  config_lib.validate(c, num_devices=1)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  pipe = loop.build_backbone(c, mesh)
  trainer = didr_lib.DIDRTrainer(c, pipe, mesh)
  step_fn = lambda state, prompts, rng: trainer.train_step(state, prompts, rng)[:2]
  return _distil(trainer, step_fn, c.backbone.path, os.path.join(out, "toy_onestep"), "onestep",
                 steps, batch, seed, export_every)


def _distil(trainer, step_fn, teacher: str, dst: str, name: str, steps: int, batch: int,
            seed: int, export_every: int) -> str:
  """The loop of the distillation stages: ``steps`` calls of ``step_fn(state, prompts, rng)``
  -> (state, metrics) on ``batch`` training prompts from the trainer's initial state, a log
  line every 50 steps, the generator's EMA written to ``dst`` (``_write_unet_component``) every
  ``export_every`` steps (0: only at the end; an interrupted stage keeps its latest) and at the
  end. Returns ``dst``."""
  state = trainer.init_state()
  stream = prompts_lib.PromptStream(prompts_lib.load_prompts("toy:train"), seed=seed)

  def export():
    trainer.guard.flush()
    _write_unet_component(trainer, trainer.policy_params(state), teacher, dst)

  t0 = time.time()
  for step in range(steps):
    state, m = step_fn(state, stream.next(batch), jax.random.fold_in(jax.random.key(seed), step))
    if step % 50 == 0 or step == steps - 1:
      print(f"{name} {step}: generator_loss {float(m['generator_loss']):.4f} fake_loss "
            f"{float(m['fake_loss']):.4f} ({time.time() - t0:.0f}s)", flush=True)
    if export_every and (step + 1) % export_every == 0 and step + 1 < steps:
      export()
      print(f"{name} {step + 1}: wrote {dst}", flush=True)
  export()
  return dst


def _write_unet_component(trainer, params, teacher: str, dst: str) -> str:
  """Writes only the UNet ``params`` (a diffusers component folder: config.json + safetensors,
  bfloat16); the rest of the pipeline is the teacher's (``one_step.load_generator`` reads either
  layout). Returns ``dst``."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  os.makedirs(dst, exist_ok=True)
  _write_json(os.path.join(dst, "config.json"),
              core.read_json(os.path.join(teacher, "unet", "config.json")))
  core.save_safetensors(unet_lib.export_unet(trainer.net.bind(params)),
                        os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  return dst


def train_tdm(out: str, steps: int, batch: int, seed: int, *, lr: float = 1e-4,
              export_every: int = 0) -> str:
  """Distils ``OUT/toy_tdm`` from ``OUT/toy_unet`` with TDM (see the module docstring): each
  iteration one rollout of ``batch`` training prompts and, at 2 of its 4 boundaries, a fake-score
  and a student update; the student EMA (decay 0.99) is written in bfloat16. Returns the
  folder."""
  c = load_config("toy_tdm", **{
      "seed": seed, "backbone.path": os.path.join(out, "toy_unet"),
      "sample.batch_size": batch, "train.batch_size": batch, "tdm.generator_learning_rate": lr,
      "tdm.fake_learning_rate": 2 * lr, "tdm.ema_decay": 0.99})
  config_lib.validate(c, num_devices=1)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  pipe = loop.build_backbone(c, mesh)
  trainer = tdm_lib.TDMTrainer(c, pipe, mesh)
  step_fn = lambda state, prompts, rng: trainer.train_step(state, prompts, rng, None)[:2]
  return _distil(trainer, step_fn, c.backbone.path, os.path.join(out, "toy_tdm"), "tdm", steps,
                 batch, seed, export_every)


def main(argv):
  del argv
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  unknown = set(FLAGS.stages) - {"clip", "unet", "dit", "onestep", "tdm"}
  if unknown:
    raise app.UsageError(f"--stages: unknown stage(s) {sorted(unknown)}")
  tok_dir = os.path.join(out, "toy_clip")
  if "clip" in FLAGS.stages:
    tok_lib.write_clip_tokenizer(tok_dir, words(), max_length=MAX_TOKENS)
    tok = load_tokenizer(tok_dir)
    model = train_clip(out, tok, FLAGS.clip_steps, FLAGS.batch, FLAGS.seed)
  elif "unet" in FLAGS.stages:
    model = clip.load_clip(tok_dir, clip.CLIPModel)
    tok = load_tokenizer(tok_dir)
  if "unet" in FLAGS.stages:
    train_unet(out, tok, model.text_model, FLAGS.unet_steps, FLAGS.unet_batch, FLAGS.seed)
  if "dit" in FLAGS.stages:
    train_dit(out, FLAGS.dit_steps, FLAGS.unet_batch, FLAGS.seed, lr=FLAGS.dit_lr,
              init=FLAGS.dit_init)
  if "onestep" in FLAGS.stages:
    train_onestep(out, FLAGS.onestep_steps, FLAGS.unet_batch, FLAGS.seed, lr=FLAGS.onestep_lr,
                  export_every=FLAGS.onestep_export_every)
  if "tdm" in FLAGS.stages:
    train_tdm(out, FLAGS.tdm_steps, FLAGS.unet_batch, FLAGS.seed, lr=FLAGS.tdm_lr,
              export_every=FLAGS.tdm_export_every)
  print(f"wrote {', '.join(FLAGS.stages)} to {out}", flush=True)


if __name__ == "__main__":
  app.run(main)
