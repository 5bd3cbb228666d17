"""The Z-Image backbone bundle: Qwen3 prompt encoding, the S3-DiT velocity with CFG, the flow
sampler (Euler / Flow-GRPO SDE), VAE decoding; loading, Orbax cache and diffusers export.

Mirrors ``pipelines.sd`` (same public API and Backbone protocol, ``family = "flow"``). The
conventions of diffusers' ``ZImagePipeline`` that this file reproduces:

- Prompt p -> Qwen3 chat ``[{"role": "user", "content": p}]`` with the generation prompt,
  hidden state -2 of the real tokens (``models.qwen3.encode_prompts_zimage``); negative prompt
  "" when none is given. Captions are ``Caption(embeds (B, L, D), mask (B, L))`` padded to a
  static length L: ``encode`` (the trainers' entry) always pads to ``caption_length`` so batches
  of an epoch concatenate; ``sample`` pads to the next multiple of 32 (``max_sequence_length``
  caps the tokens, as in diffusers).
- Sigma grid: ``flow.zimage_sigmas`` (base linspace(1, 1/n, n), the scheduler's shift, mu from
  image_seq_len = (h_lat / 2)(w_lat / 2)).
- The transformer sees t = (1000 - 1000 sig) / 1000 and predicts x0 - eps; the velocity the flow
  samplers consume is its negation, v = eps - x0 = dx/dsig (``dit_velocity``).
- **Guidance scales are standard CFG w everywhere in didr_jax** (docs/methods.md §0; 1 = off):
  v = v_uncond + w (v_cond - v_uncond). diffusers' ZImagePipeline writes
  pred = cond + g (cond - uncond), i.e. its ``guidance_scale`` g is our w - 1 (g = 0 <-> w = 1).
  ``cfg_normalization`` / ``cfg_truncation`` (``sample`` only) are diffusers' options
  (``diffusion.guidance.guided_output``).
- Latents are NHWC, normalised as (z - shift_factor) * scaling_factor; images (x + 1) / 2
  clipped to [0, 1]. A folder whose ``model_index.json`` has ``"vae": [null, null]`` is a
  pixel-space DiT (the toy base): latents are images in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.diffusion import ddim, flow, guidance, kernels
from didr_jax.models import layers, qwen3, vae as vae_lib, zimage_dit
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.pipelines.base import (PipelineBase, cached_tree, copy_configs, decode_images,
                                     has_vae, load_components, write_component)

DEFAULT_CAPTION_LENGTH = 256  # tokens per caption in training batches (encode / negative)
MAX_SEQUENCE_LENGTH = 512     # diffusers' max_sequence_length: prompts are truncated there
SAMPLE_BUCKET = 32            # sample(): captions padded to a multiple of this (the DiT's own)


class Caption(NamedTuple):
  """Prompt conditioning of the DiT: Qwen3 features (B, L, D), zero where ``mask`` (B, L) is
  False; sample b's caption is ``embeds[b][mask[b]]``."""
  embeds: jax.Array
  mask: jax.Array


def fit_caption(c: Caption, batch: int, length: int) -> Caption:
  """Broadcasts a caption batch to ``batch`` rows (a batch of 1 is shared) and right-pads it
  with masked positions to ``length`` tokens (the DiT ignores masked positions)."""
  e, m = c
  if e.shape[0] != batch:
    e = jnp.broadcast_to(e, (batch,) + e.shape[1:])
    m = jnp.broadcast_to(m, (batch,) + m.shape[1:])
  pad = length - e.shape[1]
  if pad < 0:
    raise ValueError(f"caption has {e.shape[1]} tokens, more than {length}")
  if pad:
    e = jnp.pad(e, ((0, 0), (0, pad), (0, 0)))
    m = jnp.pad(m, ((0, 0), (0, pad)))
  return Caption(e, m)


def dit_velocity(transformer: nnx.Module, x: jax.Array, sig: jax.Array,
                 caption: Caption) -> jax.Array:
  """v = eps - x0 (float32) at flow sigma ``sig`` (B,): -transformer(x, t, caption) with
  t = ``flow.zimage_model_time(sig)`` = (1000 - 1000 sig) / 1000."""
  out = transformer(x, flow.zimage_model_time(sig), caption.embeds, caption.mask)
  return -out.astype(jnp.float32)


def guided_velocity(transformer: nnx.Module, x: jax.Array, t: jax.Array, cond: Caption,
                    uncond: Caption | None, scale, *, normalization: float = 0.0,
                    truncation: float | None = None) -> jax.Array:
  """The sampler's velocity at flow sigma ``t``: v_uncond + scale (v_cond - v_uncond) (standard
  CFG, float32; cond and uncond run as one batched call), or v_cond when ``uncond`` is None.
  ``uncond`` may have batch 1 and a different caption length; ``normalization`` and
  ``truncation`` are diffusers' cfg_normalization / cfg_truncation (``guidance.guided``)."""
  def model_fn(x, t, caption):
    return dit_velocity(transformer, x, t, caption)

  if uncond is not None:
    length = max(cond.embeds.shape[1], uncond.embeds.shape[1])
    cond = fit_caption(cond, x.shape[0], length)
    uncond = fit_caption(uncond, x.shape[0], length)
  return guidance.guided(model_fn, cond, uncond, scale, normalization=normalization,
                         truncation=truncation)(x, jnp.broadcast_to(t, (x.shape[0],)))


def image_seq_len(latent_shape: Sequence[int]) -> int:
  """(h_lat // 2) (w_lat // 2) of NHWC latents: the token count diffusers' ZImagePipeline feeds
  ``calculate_shift`` (a fixed 2, whatever the patch size)."""
  return (latent_shape[1] // 2) * (latent_shape[2] // 2)


def _abstract_transformer(folder: str, dtype, remat: bool,
                          scan_layers: bool) -> zimage_dit.ZImageTransformer:
  config = zimage_dit.ZImageConfig.from_diffusers(core.read_json(os.path.join(folder,
                                                                              "config.json")))
  return layers.abstract_module(lambda rngs: zimage_dit.ZImageTransformer(
      config, rngs=rngs, remat=remat, scan_layers=scan_layers, dtype=dtype, param_dtype=dtype))


def _abstract_qwen3(folder: str, dtype) -> qwen3.Qwen3Model:
  config = qwen3.Qwen3Config.from_hf(core.read_json(os.path.join(folder, "config.json")))
  return layers.abstract_module(lambda rngs: qwen3.Qwen3Model(config, rngs=rngs, dtype=dtype,
                                                              param_dtype=dtype))


def _component_fns(dtype, remat: bool, scan_layers: bool = False):
  """(loaders, abstract builders) by component name for ``base.load_components``; remat and
  scan_layers apply to the trainable transformer only."""
  loaders = {
      "transformer": lambda f, shardings: zimage_dit.load_zimage_transformer(
          f, dtype=dtype, shardings=shardings, remat=remat, scan_layers=scan_layers),
      "vae": lambda f, shardings: vae_lib.load_vae(f, dtype=dtype, shardings=shardings),
      "text_encoder": lambda f, shardings: qwen3.load_qwen3(f, dtype=dtype,
                                                            shardings=shardings)}
  abstract = {"transformer": lambda f: _abstract_transformer(f, dtype, remat, scan_layers),
              "vae": lambda f: vae_lib.abstract_vae(f, dtype=dtype),
              "text_encoder": lambda f: _abstract_qwen3(f, dtype)}
  return loaders, abstract


def _cached_scan_layers(path: str) -> bool | None:
  """Whether the Orbax cache of ``path`` holds the transformer's layers stacked (None: the
  folder has no cache, or none with a transformer)."""
  tree = cached_tree(path)
  trunk = (tree or {}).get("transformer", {}).get("layers")
  if not isinstance(trunk, Mapping):
    return None
  return not any(str(k).isdigit() for k in trunk)


@dataclasses.dataclass
class ZImagePipeline(PipelineBase):
  transformer: nnx.Module
  vae: nnx.Module | None
  text_encoder: nnx.Module
  tokenizer: Any
  scheduler: flow.FlowMatchConfig
  folder: str | None = None
  resolution: int = 1024        # default image size in pixels
  caption_length: int = DEFAULT_CAPTION_LENGTH
  max_sequence_length: int = MAX_SEQUENCE_LENGTH
  text_encoder_prefix: str = ""  # "model." when the folder holds a Qwen3ForCausalLM

  family = "flow"
  kind = "zimage"
  denoise = staticmethod(guided_velocity)  # (model, x, sig, cond, uncond, scale) -> v
  decode = staticmethod(lambda vae, latents: decode_images(vae, latents))

  # ------------------------------------------------------------- the trainers' backbone API

  @property
  def model(self) -> nnx.Module:
    """The trainable denoiser."""
    return self.transformer

  @property
  def latent_channels(self) -> int:
    return self.transformer.config.in_channels

  def latent_shape(self, batch: int, height: int | None = None, width: int | None = None):
    """NHWC latent shape; height / width must be multiples of 2 x the VAE factor (diffusers'
    rule: the DiT patchifies the latents by 2)."""
    h, w = height or self.size, width or self.size
    m = 2 * self.vae_scale
    if h % m or w % m:
      raise ValueError(f"height {h} and width {w} must be multiples of {m} (2 x the VAE factor)")
    return (batch, h // self.vae_scale, w // self.vae_scale, self.latent_channels)

  def encode(self, prompts: Sequence[str]) -> Caption:
    """Training-batch conditioning: captions padded to exactly ``caption_length`` tokens
    (longer prompts are truncated there), so every batch has the same static shape."""
    return self.encode_text(prompts, max_length=self.caption_length,
                            bucket=self.caption_length)

  def negative(self, batch: int) -> Caption:
    """The empty-prompt conditioning (diffusers' default negative prompt), ``caption_length``."""
    return self.encode([""] * batch)

  def sigmas(self, num_steps: int, latent_shape: Sequence[int]) -> np.ndarray:
    """The (num_steps + 1,) float32 sigma grid (terminal 0 included) for these latents."""
    return flow.zimage_sigmas(self.scheduler, num_steps, image_seq_len(latent_shape))[0]

  def rollout(self, denoise_fn, x_init, *, num_steps: int, eta, rng, noise=None,
              return_outputs: bool = False, sde_type: str = "sde") -> ddim.SampleOutput:
    """The policy's trajectory: ``sde_type`` steps ("sde": Flow-GRPO, "cps") with noise level
    ``eta`` (a scalar or a (num_steps,) per-step vector; 0: Euler ODE step, log-prob 0) and
    per-step log-probabilities, one scan. ``noise`` (num_steps, B, ...) overrides ``rng``."""
    return flow.flow_sample(denoise_fn, x_init, self.sigmas(num_steps, x_init.shape), a=eta,
                            sde_type=sde_type, rng=rng, noise=noise,
                            return_outputs=return_outputs)

  def log_prob(self, output, x_t, x_next, t, t_next, *, eta, sde_type: str = "sde"):
    """(log p(x_next | x_t), mean, std) of a stored transition sig=t -> sig'=t_next under
    velocity ``output``. The cap of sig = 1 (the largest grid sigma below 1) is t_next, which
    is what ``rollout`` used: Z-Image grids start at exactly 1."""
    mean, std = flow.step_mean_std(output, x_t, t, t_next, eta, sde_type)
    return ddim.gaussian_log_prob(x_next, mean, std), mean, std

  def kl_std(self, t, t_next, *, eta, sde_type: str = "sde"):
    """The scale of the KL to the reference at this step (``flow.step_kl_std``)."""
    return flow.step_kl_std(t, t_next, eta, sde_type)

  def training_pair(self, rng, x0):
    """(x_sig, sig, v) of the flow-matching loss: sig = shift u / (1 + (shift - 1) u),
    u ~ U[0, 1) (the scheduler's static shift), x_sig = (1 - sig) x0 + sig eps, v = eps - x0."""
    k_t, k_e = jax.random.split(rng)
    shift = 1.0 if self.scheduler.use_dynamic_shifting else self.scheduler.shift
    sig = kernels.sample_flow_sigmas(k_t, (x0.shape[0],), shift=shift)
    eps = jax.random.normal(k_e, x0.shape, x0.dtype)
    x_t = kernels.q_sample(x0, eps, *kernels.flow_alpha_sigma(sig))
    return x_t, sig, eps - x0

  prediction_type = "flow"  # the DiT outputs v = eps - x0 (``dit_velocity``)

  def train_times(self, rng, shape, *, t_max: float = 1.0, shift: float = 1.0):
    """Random flow sigmas sig = shift u / (1 + (shift - 1) u), u ~ U[0, t_max)
    (``kernels.sample_flow_sigmas``)."""
    return kernels.sample_flow_sigmas(rng, shape, t_max=t_max, shift=shift)

  def alpha_sigma(self, t):
    """(1 - sig, sig) of x_sig = (1 - sig) x0 + sig eps."""
    return kernels.flow_alpha_sigma(t)

  # ---------------------------------------------------------------------------- loading

  @classmethod
  def from_pretrained(cls, path: str, *, dtype=jnp.float32, mesh=None,
                      rules=mesh_lib.DEFAULT_RULES, resolution: int | None = None,
                      remat: bool = False, scan_layers: bool = False,
                      caption_length: int | None = None) -> "ZImagePipeline":
    """Loads a diffusers ZImagePipeline folder, or one that holds our Orbax cache (``save``).

    ``dtype`` is the parameter and compute dtype of the transformer and text encoder and the
    compute dtype of the VAE (its parameters stay float32); ``remat`` applies to the
    transformer, and ``scan_layers`` (its main layers stacked and run by one ``lax.scan``: the
    programs hold one block instead of ``n_layers``; ``zimage_dit.ZImageTransformer``). A cache
    written in the other layer form is restored as written and restacked. The default
    ``resolution`` is the VAE config's ``sample_size`` (else ``model_index.json``'s optional
    ``resolution``, else 1024); ``caption_length`` (training captions, tokens) defaults to
    ``model_index.json``'s optional ``caption_length``, else ``DEFAULT_CAPTION_LENGTH``."""
    index = core.read_json(os.path.join(path, "model_index.json"))
    with_vae = has_vae(index)
    names = ["transformer"] + (["vae"] if with_vae else []) + ["text_encoder"]
    stored = _cached_scan_layers(path)  # the layer form of an Orbax cache (None: no cache)
    loaders, abstract = _component_fns(dtype, remat, scan_layers if stored is None else stored)
    modules = load_components(path, names, loaders=loaders, abstract=abstract, mesh=mesh,
                              rules=rules)
    if stored is not None and stored != scan_layers:
      transformer = zimage_dit.restack_layers(modules["transformer"], scan_layers)
      modules["transformer"] = (transformer if mesh is None else
                                mesh_lib.shard_module(transformer, mesh, rules))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    sched = flow.FlowMatchConfig.from_diffusers(
        core.read_json(os.path.join(path, "scheduler", "scheduler_config.json")))
    if resolution is None:
      vae_cfg = (core.read_json(os.path.join(path, "vae", "config.json")) if with_vae else {})
      resolution = int(vae_cfg.get("sample_size") or index.get("resolution") or 1024)
    te_class = (index.get("text_encoder") or [None, None])[1]
    return cls(transformer=modules["transformer"], vae=modules.get("vae"),
               text_encoder=modules["text_encoder"], tokenizer=tokenizer, scheduler=sched,
               folder=path, resolution=resolution,
               caption_length=int(caption_length or index.get("caption_length")
                                  or DEFAULT_CAPTION_LENGTH),
               text_encoder_prefix="model." if te_class == "Qwen3ForCausalLM" else "")

  def modules(self) -> dict[str, nnx.Module]:
    out = {"transformer": self.transformer, "text_encoder": self.text_encoder}
    if self.vae is not None:
      out["vae"] = self.vae
    return out

  def export_diffusers(self, dst: str) -> None:
    """Writes a diffusers-format folder (configs + safetensors) that diffusers' ZImagePipeline
    loads; weights keep their dtype."""
    copy_configs(self.folder, dst)
    tensors = {
        ("transformer", "diffusion_pytorch_model"):
            lambda: zimage_dit.export_zimage_transformer(self.transformer),
        ("text_encoder", "model"):
            lambda: qwen3.export_qwen3(self.text_encoder, prefix=self.text_encoder_prefix),
    }
    if self.vae is not None:
      tensors[("vae", "diffusion_pytorch_model")] = lambda: vae_lib.export_vae(self.vae)
    for (name, stem), fn in tensors.items():
      write_component(dst, name, stem, fn())

  # ---------------------------------------------------------------------------- prompts

  def count_truncated(self, prompts, max_tokens=None):
    """Prompts whose chat-template tokens exceed ``caption_length`` (training; ``max_tokens``
    overrides it, e.g. ``max_sequence_length`` for ``sample``)."""
    limit = max_tokens or self.caption_length
    _, mask = qwen3.tokenize_prompts_zimage(self.tokenizer, list(prompts), max_length=10**9,
                                            bucket=1)
    lengths = mask.sum(axis=1)
    return int((lengths > limit).sum()), limit, int(lengths.max(initial=0))

  def encode_text(self, prompts: Sequence[str], *, max_length: int | None = None,
                  bucket: int | Sequence[int] = SAMPLE_BUCKET) -> Caption:
    """Z-Image prompt features: at most ``max_length`` (default ``max_sequence_length``)
    tokens, right-padded to a static bucket length (``qwen3.tokenize_prompts_zimage``)."""
    embeds, mask = qwen3.encode_prompts_zimage(
        self.text_encoder, self.tokenizer, list(prompts),
        max_length=max_length or self.max_sequence_length, bucket=bucket)
    return Caption(embeds, mask)

  # ---------------------------------------------------------------------------- sampling

  def sample(self, prompts: Sequence[str], *, num_steps: int = 50, guidance_scale: float = 5.0,
             eta: float = 0.0, height: int | None = None, width: int | None = None,
             latents: np.ndarray | jax.Array | None = None, seed: int = 0,
             negative_prompts: Sequence[str] | None = None, cfg_normalization: float = 0.0,
             cfg_truncation: float = 1.0):
    """Text to image. ``guidance_scale`` is the standard CFG w (diffusers' ZImagePipeline
    guidance_scale + 1; 1 disables CFG); ``eta`` the SDE noise level (0: Euler, diffusers'
    sampler). ``latents`` are NHWC initial noise (drawn from ``seed`` when None).
    Returns (images (B, H, W, 3) float in [0, 1], ddim.SampleOutput over flow sigmas)."""
    height, width = height or self.size, width or self.size
    b = len(prompts)
    shape = self.latent_shape(b, height, width)
    cond = self.encode_text(prompts)
    uncond = None
    if guidance_scale != 1.0:
      negs = list(negative_prompts) if negative_prompts is not None else [""] * b
      if len(negs) != b:
        raise ValueError(f"{len(negs)} negative prompts for {b} prompts")
      uncond = self.encode_text(negs)
    if latents is None:
      latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape != shape:
      raise ValueError(f"initial latents have shape {latents.shape}, expected NHWC {shape}")
    mesh = self.mesh()
    cond, uncond, latents = self.shard_batch((cond, uncond, latents), b, mesh)
    return _sample(self.transformer, self.vae, cond, uncond, latents, jax.random.key(seed + 1),
                   jnp.asarray(self.sigmas(num_steps, shape)), float(guidance_scale), float(eta),
                   normalization=float(cfg_normalization), truncation=float(cfg_truncation),
                   mesh=mesh)


@functools.partial(jax.jit, static_argnames=("normalization", "truncation", "mesh"))
def _sample(transformer, vae, cond, uncond, latents, rng, sigmas, guidance_scale, eta, *,
            normalization, truncation, mesh):
  """As ``sd._sample``: modules as pytrees, ``mesh`` (static) for the blocks' batch sharding."""
  def denoise(x, sig):
    return guided_velocity(transformer, x, sig, cond, uncond, guidance_scale,
                           normalization=normalization, truncation=truncation)

  with layers.activation_sharding(mesh):
    traj = flow.flow_sample(denoise, latents, sigmas, a=eta, rng=rng)
    return decode_images(vae, traj.sample), traj
