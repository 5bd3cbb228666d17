"""The SD 1.x / 2.x / SDXL backbone bundle: tokenize, encode prompts, denoise, decode.

A bundle is loaded from a local diffusers pipeline folder (converted on the fly) or from the
Orbax cache that ``python -m didr_jax.convert`` writes beside the configs. The model-calling
pieces are pure functions of (module, inputs) so trainers can split / merge parameters and jit
whole trajectories; ``SDPipeline.sample`` is the jitted text-to-image path.

Conventions follow diffusers' pipelines: SD uses the text encoder's last hidden state; SDXL
concatenates both encoders' penultimate hidden states, takes the pooled projection of the
second, and conditions on time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w);
an empty negative prompt is all zeros when ``force_zeros_for_empty_prompt``.
Latents are NHWC here; the ``.npy`` latents that users bring from diffusers are NCHW.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.diffusion import ddim, guidance, kernels, param
from didr_jax.diffusion.schedules import VPSchedule
from didr_jax.models import clip, layers, unet as unet_lib, vae as vae_lib
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.pipelines.base import (PipelineBase, components, copy_configs, decode_images,
                                     load_components, pipeline_kind, read_index,
                                     write_component)

_LOADERS = {"unet": unet_lib.load_unet, "vae": vae_lib.load_vae, "text_encoder": clip.load_clip}
_ABSTRACT = {"unet": unet_lib.abstract_unet, "vae": vae_lib.abstract_vae,
             "text_encoder": clip.abstract_clip}


def _component_fns(dtype, remat: bool, unet_param_dtype=jnp.float32):
  """(loaders, abstract builders) by component name for ``base.load_components``; remat and
  ``unet_param_dtype`` apply to the trainable UNet only (the others keep float32 parameters)."""
  def opts(name):
    if name != "unet":
      return {"dtype": dtype}
    return {"dtype": dtype, "param_dtype": unet_param_dtype, **({"remat": True} if remat else {})}
  names = ("unet", "vae", "text_encoder", "text_encoder_2")
  loaders = {n: (lambda f, shardings, n=n: _LOADERS[n.removesuffix("_2")](
      f, shardings=shardings, **opts(n))) for n in names}
  abstract = {n: (lambda f, n=n: _ABSTRACT[n.removesuffix("_2")](f, **opts(n))) for n in names}
  return loaders, abstract


class Cond(NamedTuple):
  """Prompt conditioning of the UNet: context (B, T, D); pooled (B, P) and time_ids (B, 6) for
  SDXL (None otherwise)."""
  context: jax.Array
  pooled: jax.Array | None = None
  time_ids: jax.Array | None = None


def unet_apply(unet: nnx.Module, x: jax.Array, t: jax.Array, cond: Cond) -> jax.Array:
  """One UNet call on NHWC latents."""
  return unet(x, t, cond.context, text_embeds=cond.pooled, time_ids=cond.time_ids)


def concat_cond(a: Cond, b: Cond) -> Cond:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def guided_unet(unet: nnx.Module, x: jax.Array, t: jax.Array, cond: Cond, uncond: Cond | None,
                scale: float | jax.Array) -> jax.Array:
  """Classifier-free guided output; cond and uncond share one batched call."""
  if uncond is None:
    return unet_apply(unet, x, t, cond)
  t = jnp.broadcast_to(t, (x.shape[0],))
  uncond = jax.tree.map(lambda u: jnp.broadcast_to(u, (x.shape[0],) + u.shape[1:]), uncond)
  out = unet_apply(unet, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   concat_cond(uncond, cond))
  out_uncond, out_cond = jnp.split(out, 2)
  return guidance.cfg(out_uncond, out_cond, scale)


def _check_vp_sde_type(sde_type: str) -> None:
  if sde_type != "sde":
    raise ValueError(f"sde_type {sde_type!r}: DDIM (VP) policies have one step type, 'sde'")


@dataclasses.dataclass
class SDPipeline(PipelineBase):
  unet: nnx.Module
  vae: nnx.Module | None
  text_encoders: list[nnx.Module]
  tokenizers: list[Any]
  schedule: VPSchedule
  kind: str  # "sd" or "sdxl"
  force_zeros_for_empty_prompt: bool = False
  folder: str | None = None
  resolution: int = 64  # default image size in pixels (the UNet's sample_size x VAE factor)

  family = "vp"
  denoise = staticmethod(guided_unet)   # (model, x, t, cond, uncond, scale) -> output
  decode = staticmethod(lambda vae, latents: decode_images(vae, latents))

  # ------------------------------------------------------------- the trainers' backbone API

  @property
  def model(self) -> nnx.Module:
    """The trainable denoiser."""
    return self.unet

  def latent_shape(self, batch: int, height: int | None = None, width: int | None = None):
    h, w = height or self.size, width or self.size
    return (batch, h // self.vae_scale, w // self.vae_scale, self.latent_channels)

  def negative(self, batch: int) -> "Cond":
    return self.encode_negative(batch, self.size, self.size)

  def rollout(self, denoise_fn, x_init, *, num_steps: int, eta, rng,
              sde_type: str = "sde") -> ddim.SampleOutput:
    """The policy's trajectory: DDIM with per-step log-probabilities, one scan; ``eta`` a
    scalar or a (num_steps,) per-step vector. DDIM has one step type ("sde"): its eta step
    already keeps the marginal's coefficients (what CPS adds to flow models)."""
    _check_vp_sde_type(sde_type)
    return ddim.ddim_sample(denoise_fn, x_init, self.schedule, num_steps, eta=eta, rng=rng)

  def log_prob(self, output, x_t, x_next, t, t_next, *, eta, sde_type: str = "sde"):
    """(log p(x_next | x_t), mean, std) of a stored DDIM transition under ``output``."""
    _check_vp_sde_type(sde_type)
    mean, std, _ = ddim.ddim_mean_std(output, x_t, t, t_next, self.schedule, eta)
    return ddim.gaussian_log_prob(x_next, mean, std), mean, std

  def kl_std(self, t, t_next, *, eta, sde_type: str = "sde"):
    """The scale of the KL to the reference at this step: the DDIM step std
    (``ddim.ddim_std``)."""
    _check_vp_sde_type(sde_type)
    return ddim.ddim_std(t, t_next, self.schedule, eta)

  def training_pair(self, rng, x0):
    """(x_t, t, target) of the denoising loss at a uniform random training timestep."""
    k_t, k_e = jax.random.split(rng)
    t = kernels.sample_vp_timesteps(k_t, (x0.shape[0],), self.schedule.num_train_timesteps)
    eps = jax.random.normal(k_e, x0.shape, x0.dtype)
    alpha, sigma = kernels.vp_alpha_sigma(self.schedule, t)
    target = param.x0_eps_to_output(x0, eps, alpha, sigma, self.schedule.prediction_type)
    return kernels.q_sample(x0, eps, alpha, sigma), t, target

  @property
  def prediction_type(self) -> str:
    """What the UNet outputs ("epsilon", "v_prediction" or "sample"; ``diffusion.param``)."""
    return self.schedule.prediction_type

  def train_times(self, rng, shape, *, t_max: float = 1.0, shift: float = 1.0):
    """Random training times: integer t ~ U{0, ..., int(t_max T)} (``sample_vp_timesteps``;
    ``shift`` is a flow-sigma option and is not used here)."""
    del shift
    return kernels.sample_vp_timesteps(rng, shape, self.schedule.num_train_timesteps,
                                       t_max=t_max)

  def alpha_sigma(self, t):
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) of x_t = alpha x0 + sigma eps."""
    return kernels.vp_alpha_sigma(self.schedule, t)

  # ---------------------------------------------------------------------------- loading

  @classmethod
  def from_pretrained(cls, path: str, *, dtype=jnp.float32, mesh=None,
                      rules=mesh_lib.DEFAULT_RULES, resolution: int | None = None,
                      remat: bool = False, unet_param_dtype=jnp.float32) -> "SDPipeline":
    """Loads a diffusers pipeline folder, or one that holds our Orbax cache (see ``save``).

    ``dtype`` is the compute dtype; parameters are float32 (a full fine-tune's master weights)
    except the UNet's under ``unet_param_dtype`` (a LoRA run keeps its frozen base in the
    compute dtype: the same values the layers compute with, half the memory in bfloat16)."""
    index = read_index(path)
    kind = pipeline_kind(path, index)
    if kind not in ("sd", "sdxl"):
      raise core.ConversionError(f"{path}: a {kind!r} pipeline, not SD / SDXL")
    names, tok_names = components(kind, index)
    te_names = [n for n in names if n.startswith("text_encoder")]
    loaders, abstract = _component_fns(dtype, remat, unet_param_dtype)
    modules = load_components(path, names, loaders=loaders, abstract=abstract, mesh=mesh,
                              rules=rules)
    from transformers import AutoTokenizer
    tokenizers = [AutoTokenizer.from_pretrained(os.path.join(path, n)) for n in tok_names]
    sched = core.read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    vae = modules.get("vae")
    scale = 1 if vae is None else vae.config.downsample_factor
    sample_size = core.read_json(os.path.join(path, "unet", "config.json")).get("sample_size", 64)
    return cls(unet=modules["unet"], vae=modules.get("vae"),
               text_encoders=[modules[n] for n in te_names], tokenizers=tokenizers,
               schedule=VPSchedule.from_diffusers(sched), kind=kind,
               force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                           kind == "sdxl")),
               folder=path, resolution=resolution or int(sample_size) * scale)

  def modules(self) -> dict[str, nnx.Module]:
    out = {"unet": self.unet} if self.vae is None else {"unet": self.unet, "vae": self.vae}
    for i, te in enumerate(self.text_encoders):
      out["text_encoder" + ("" if i == 0 else f"_{i + 1}")] = te
    return out

  def export_diffusers(self, dst: str) -> None:
    """Writes a diffusers-format folder (configs + safetensors) that diffusers can load. The
    text encoders are written in the classic transformers layout (every key under
    ``text_model.`` / ``text_projection.``), which transformers 4.x and 5.x both read; the flat
    layout transformers >= 5.6 writes for CLIPTextModel is ignored by 4.x."""
    copy_configs(self.folder, dst)
    exporters = {"unet": (unet_lib.export_unet, "diffusion_pytorch_model"),
                 "vae": (vae_lib.export_vae, "diffusion_pytorch_model"),
                 "text_encoder": (_export_clip_classic, "model"),
                 "text_encoder_2": (_export_clip_classic, "model")}
    for name, module in self.modules().items():
      fn, stem = exporters[name]
      write_component(dst, name, stem, fn(module))

  # ---------------------------------------------------------------------------- prompts

  def tokenize(self, prompts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
                           truncation=True, return_tensors="np").input_ids, np.int32)
            for tok in self.tokenizers]

  def count_truncated(self, prompts, max_tokens=None):
    """Prompts longer than a tokenizer's ``model_max_length`` (77 for SD / SDXL), counting
    the begin / end tokens."""
    limit = max_tokens or min(tok.model_max_length for tok in self.tokenizers)
    lengths = [max(len(ids) for ids in col) for col in zip(*(
        tok(list(prompts), truncation=False, verbose=False).input_ids
        for tok in self.tokenizers))] or [0]
    return sum(n > limit for n in lengths), limit, max(lengths)

  def encode(self, prompts: Sequence[str], height: int | None = None,
             width: int | None = None) -> Cond:
    return _encode(self.text_encoders, self.tokenize(prompts), self.kind, height or self.size,
                   width or self.size)

  def encode_negative(self, batch: int, height: int, width: int) -> Cond:
    if self.force_zeros_for_empty_prompt:
      c = self.encode([""], height, width)
      return Cond(jnp.zeros((batch,) + c.context.shape[1:], c.context.dtype),
                  None if c.pooled is None else jnp.zeros((batch,) + c.pooled.shape[1:]),
                  None if c.time_ids is None else jnp.repeat(c.time_ids, batch, axis=0))
    return self.encode([""] * batch, height, width)

  @property
  def latent_channels(self) -> int:
    return self.unet.config.in_channels

  # ---------------------------------------------------------------------------- sampling

  def sample(self, prompts: Sequence[str], *, num_steps: int = 50, guidance_scale: float = 7.5,
             eta: float = 0.0, height: int | None = None, width: int | None = None,
             latents: np.ndarray | jax.Array | None = None, seed: int = 0,
             negative_prompts: Sequence[str] | None = None):
    """Text to image. ``latents`` are NHWC initial noise (drawn from ``seed`` when None).
    Returns (images (B, H, W, 3) float in [0, 1], ddim.SampleOutput)."""
    height, width = height or self.size, width or self.size
    b = len(prompts)
    cond = self.encode(prompts, height, width)
    uncond = None
    if guidance_scale != 1.0:
      uncond = (self.encode(negative_prompts, height, width) if negative_prompts is not None
                else self.encode_negative(b, height, width))
    shape = (b, height // self.vae_scale, width // self.vae_scale, self.latent_channels)
    if latents is None:
      latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape != shape:
      raise ValueError(f"initial latents have shape {latents.shape}, expected NHWC {shape}")
    mesh = self.mesh()
    cond, uncond, latents = self.shard_batch((cond, uncond, latents), b, mesh)
    return _sample(self.unet, self.vae, cond, uncond, latents, jax.random.key(seed + 1),
                   self.schedule, num_steps, float(guidance_scale), float(eta), mesh=mesh)


def _export_clip_classic(text_encoder: nnx.Module) -> dict[str, np.ndarray]:
  """``clip.export_clip`` with CLIPTextModel's flat keys moved under ``text_model.``."""
  return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
          for k, v in clip.export_clip(text_encoder).items()}


@functools.partial(jax.jit, static_argnames=("kind", "height", "width"))
def _encode_jit(text_encoders, ids, kind, height, width):
  if kind == "sd":
    return Cond(text_encoders[0](ids[0]).last_hidden_state)
  hidden, pooled = [], None
  for te, i in zip(text_encoders, ids):
    out = te(i)
    hidden.append(out.hidden_states[-2])
    if getattr(out, "text_embeds", None) is not None:
      pooled = out.text_embeds
  b = ids[0].shape[0]
  time_ids = jnp.broadcast_to(jnp.asarray([height, width, 0, 0, height, width], jnp.float32),
                              (b, 6))
  return Cond(jnp.concatenate(hidden, axis=-1), pooled, time_ids)


def _encode(text_encoders, ids, kind, height, width) -> Cond:
  return _encode_jit(text_encoders, [jnp.asarray(i) for i in ids], kind, height, width)


@functools.partial(jax.jit, static_argnames=("num_steps", "mesh"))
def _sample(unet, vae, cond, uncond, latents, rng, schedule, num_steps, guidance_scale, eta, *,
            mesh):
  """Modules go in as pytrees (``nnx.jit`` would also return all their variables); ``mesh``
  (static) is the parameters' mesh, whose batch sharding the blocks keep."""
  def denoise(x, t):
    return guided_unet(unet, x, t, cond, uncond, guidance_scale)

  with layers.activation_sharding(mesh):
    traj = ddim.ddim_sample(denoise, latents, schedule, num_steps, eta=eta, rng=rng)
    images = decode_images(vae, traj.sample)
  return images, traj


