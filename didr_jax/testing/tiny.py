"""Tiny random diffusers / transformers checkpoints written to local folders.

Tests and benchmarks use them as "real" checkpoint folders: nothing is downloaded, and the
PyTorch modules double as the parity reference. Requires the ``torch`` extra.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.models import clip, unet as unet_lib
from didr_jax.toy.tokenizer import write_clip_tokenizer


def _perturb(module, seed: int, scale: float = 0.05):
  """Adds noise to every parameter so zero/one-initialised layers are exercised by parity."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module


def randomize_torch(model, seed: int, logit_scale: float = 1.7):
  """Random weights everywhere (matrices ~ N(0, 1/fan_in), norm scales around 1, biases
  nonzero, CLIP's ``logit_scale`` set) so a parity test can fail; returns the model in eval
  mode."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        p.fill_(logit_scale)
      elif p.ndim >= 2:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def tiny_clip_text_config(vocab_size: int, *, hidden: int = 32, projection: int | None = None,
                          max_len: int = 16, act: str = "quick_gelu"):
  from transformers import CLIPTextConfig
  return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=max_len, hidden_act=act,
                        projection_dim=projection or hidden, bos_token_id=vocab_size - 2,
                        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=16, patch_size=4, hidden_act="quick_gelu")


def save_tiny_pickscore(folder: str, *, seed: int = 0, words: tuple[str, ...] = ()):
  """A tiny random transformers ``CLIPModel`` (PickScore's architecture, 16 px images) with a
  CLIP tokenizer in ``folder`` (the ``pickscore`` reward's folder); returns the torch model."""
  from transformers import CLIPConfig, CLIPModel
  vocab = write_clip_tokenizer(folder, words, max_length=16)
  cfg = CLIPConfig(text_config=tiny_clip_text_config(vocab, act="gelu").to_dict(),
                   vision_config=TINY_CLIP_VISION, projection_dim=24)
  model = randomize_torch(CLIPModel(cfg), seed, logit_scale=2.3)
  model.save_pretrained(folder)
  return model


def save_tiny_aesthetic(folder: str, *, seed: int = 0):
  """The ``aesthetic`` reward's files in ``folder``: ``clip/`` (a tiny random
  CLIPVisionModelWithProjection with ViT-L/14's 768-d projection) and ``mlp.safetensors``
  (the published MLP's layout, random). Returns (vision model, torch module whose ``layers``
  is the MLP as an nn.Sequential)."""
  import torch
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  vision = randomize_torch(CLIPVisionModelWithProjection(
      CLIPVisionConfig(**TINY_CLIP_VISION, projection_dim=768)), seed)
  vision.save_pretrained(os.path.join(folder, "clip"))
  head = torch.nn.Module()
  head.layers = torch.nn.Sequential(
      torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
      torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
      torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
  head = randomize_torch(head, seed + 1)
  core.save_safetensors({k: v.numpy() for k, v in head.state_dict().items()},
                        os.path.join(folder, "mlp.safetensors"))
  return vision, head


def save_tiny_sd(folder: str, *, kind: str = "sd", seed: int = 0, sample_size: int = 16,
                 prediction_type: str = "epsilon"):
  """Saves a tiny random ``StableDiffusionPipeline`` (kind="sd") or
  ``StableDiffusionXLPipeline`` (kind="sdxl") to ``folder`` and returns the torch pipeline."""
  import torch
  from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                         StableDiffusionXLPipeline, UNet2DConditionModel)
  from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

  torch.manual_seed(seed)
  tok_dir = os.path.join(folder, "_tokenizer_src")
  vocab = write_clip_tokenizer(tok_dir, max_length=16)
  tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
  vae = _perturb(AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
      layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=sample_size * 2),
      seed + 1)
  scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            prediction_type=prediction_type)
  if kind == "sd":
    te = _perturb(CLIPTextModel(tiny_clip_text_config(vocab, hidden=32)), seed + 2)
    unet = _perturb(UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8), seed + 3)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
  elif kind == "sdxl":
    te = _perturb(CLIPTextModel(tiny_clip_text_config(vocab, hidden=32, act="gelu")), seed + 2)
    te2 = _perturb(CLIPTextModelWithProjection(
        tiny_clip_text_config(vocab, hidden=32, projection=32, act="gelu")), seed + 4)
    unet = _perturb(UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8), seed + 3)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler)
  else:
    raise ValueError(f"kind must be 'sd' or 'sdxl', got {kind!r}")
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe


def initial_latents(batch: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
  """Standard-normal NCHW latents (diffusers' layout) from a NumPy seed."""
  return np.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype(
      np.float32)


def save_tiny_toy(folder: str, *, seed: int = 0, sample_size: int = 16) -> str:
  """A random pixel-space toy pipeline (no VAE, toy-grammar tokenizer) in the layout of the
  shipped toy base, small enough for trainer tests."""
  from didr_jax.toy import pretrain  # lazy: importing it defines its command line's absl flags
  tok_dir = os.path.join(folder, "_tok")
  vocab = write_clip_tokenizer(tok_dir, pretrain.words(), max_length=pretrain.MAX_TOKENS)
  tok = pretrain.load_tokenizer(tok_dir)
  text_cfg = clip.CLIPTextConfig.from_hf({
      "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
      "num_attention_heads": 2, "max_position_embeddings": pretrain.MAX_TOKENS,
      "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
      "pad_token_id": tok.pad_token_id})
  text_model = clip.CLIPTextModel(text_cfg, rngs=nnx.Rngs(seed))
  unet_cfg = {**pretrain.UNET_CONFIG, "sample_size": sample_size, "block_out_channels": [16, 32],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
              "attention_head_dim": 2}
  unet = unet_lib.UNet2DConditionModel(unet_cfg, rngs=nnx.Rngs(seed + 1))
  # random, non-zero output layers so the policy's samples depend on its parameters
  unet.conv_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed),
                                                      unet.conv_out.kernel.shape)
  pretrain.save_pipeline(folder, unet, text_model, tok, unet_config=unet_cfg)
  return folder
