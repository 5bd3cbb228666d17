"""A tiny random diffusers ``ZImagePipeline`` written to a local folder (nothing downloaded).

Components, all at toy width but of the real classes and layouts: a ``ZImageTransformer2DModel``
(patch 2, 16 latent channels), a ``Qwen3Model`` text encoder (Z-Image reads its hidden state -2),
a 16-channel ``AutoencoderKL`` without quant convs and with a shift factor (as the Flux / Z-Image
VAE), the ``FlowMatchEulerDiscreteScheduler`` config Z-Image ships (static shift 3), and an
offline byte-level tokenizer with a Qwen3-style chat template. Every weight is perturbed off its
initialisation (norm scales of 1, zero pad tokens) so parity tests can catch mistakes.
Requires the ``torch`` extra.
"""

from __future__ import annotations

from didr_jax.toy.tokenizer import qwen_tokenizer

VOCAB = 260  # 256 byte symbols + the chat special tokens
TEXT_HIDDEN = 32


def _perturb(module, seed: int, scale: float):
  """Adds N(0, scale^2) noise to every parameter (deterministic in ``seed``)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module


def tiny_qwen_tokenizer():
  """A byte-level BPE without merges (every UTF-8 byte is a token) with Qwen's chat special
  tokens and a Qwen3-style chat template (honouring ``enable_thinking``), built offline."""
  hf = qwen_tokenizer()
  if len(hf) > VOCAB:
    raise AssertionError(f"tokenizer has {len(hf)} tokens, more than VOCAB={VOCAB}")
  return hf


def save_tiny_zimage(folder: str, seed: int = 0, *, image_size: int = 32):
  """Saves a tiny random ``ZImagePipeline`` to ``folder`` (``save_pretrained``, safetensors)
  and returns the torch pipeline. The VAE downsamples by 2, so ``image_size`` pixels are
  ``image_size / 2`` latents and ``(image_size / 4)^2`` transformer tokens; its config's
  ``sample_size`` (= ``image_size``) is our pipeline's default resolution."""
  import torch
  import transformers
  from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline,
                         ZImageTransformer2DModel)

  torch.manual_seed(seed)
  text_encoder = _perturb(transformers.Qwen3Model(transformers.Qwen3Config(
      vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
      max_position_embeddings=1024)), seed + 1, 0.1).eval()
  # axes_lens[0] bounds caption positions: it must exceed the longest caption bucket + 1.
  transformer = _perturb(ZImageTransformer2DModel(
      all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=32, n_layers=2,
      n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_HIDDEN,
      axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64]), seed + 2, 0.1).eval()
  vae = _perturb(AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
      layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=image_size,
      scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
      use_post_quant_conv=False), seed + 3, 0.05).eval()
  scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                              use_dynamic_shifting=False)
  pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tiny_qwen_tokenizer(), transformer=transformer)
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe


def diffusers_pixel_sampler(folder: str):
  """diffusers' own ``ZImagePipeline`` on a VAE-less (pixel-space) Z-Image folder such as the
  toy DiT, as ``fn(prompts, noise NHWC, num_steps, guidance_scale) -> images NHWC in [0, 1]``
  with our conventions: ``guidance_scale`` is the standard CFG w (diffusers takes w - 1), and
  output_type "latent" returns the pixels (a VAE-less pipeline takes 8 x their size as its
  height and width)."""
  import numpy as np
  import torch
  from diffusers import ZImagePipeline
  pipe = ZImagePipeline.from_pretrained(folder, vae=None)
  pipe.set_progress_bar_config(disable=True)

  def sample(prompts, noise, num_steps: int, guidance_scale: float) -> np.ndarray:
    _, h, w, _ = noise.shape
    # a fresh list: diffusers' encode_prompt writes the chat template into the caller's list
    out = pipe(list(prompts), height=8 * h, width=8 * w, num_inference_steps=num_steps,
               guidance_scale=guidance_scale - 1.0, output_type="latent",
               latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2))).images
    return np.clip((out.numpy().transpose(0, 2, 3, 1) + 1) / 2, 0, 1)
  return sample
