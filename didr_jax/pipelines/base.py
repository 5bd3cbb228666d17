"""The backbone API every trainer uses (SD/SDXL: ``sd.SDPipeline``; Z-Image: ``zimage``).

Trainers never touch model internals: they split ``model`` into graph + params, and call the
pure functions below inside their jitted steps. Conditioning objects are pytrees whose leaves
have the batch as leading axis (so trainers can concatenate, shuffle and shard them).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.convert import core, orbax_io
from didr_jax.models import vae as vae_lib
from didr_jax.parallel import mesh as mesh_lib

PARAMS_DIR = "orbax_params"  # the Orbax cache of a converted folder, beside its configs


class Backbone(Protocol):
  family: str              # "vp" (DDIM policy) or "flow" (Flow-GRPO SDE policy)
  model: Any               # the trainable denoiser (an nnx.Module)

  def encode(self, prompts: Sequence[str]) -> Any:
    """Prompt conditioning for a batch (a pytree, batch-leading leaves)."""

  def negative(self, batch: int) -> Any:
    """The unconditional (negative-prompt) conditioning for CFG."""

  def latent_shape(self, batch: int) -> tuple[int, ...]:
    """NHWC shape of the initial noise for ``batch`` samples."""

  def frozen(self) -> Any:
    """Frozen modules ``decode`` needs, passed into jitted functions as arguments."""

  @staticmethod
  def denoise(model, x: jax.Array, t: jax.Array, cond: Any, uncond: Any | None,
              scale) -> jax.Array:
    """The (CFG-guided when ``uncond`` is given) model output the sampler consumes."""

  @staticmethod
  def decode(frozen, latents: jax.Array) -> jax.Array:
    """Latents -> images (B, H, W, 3) in [0, 1]."""

  def rollout(self, denoise_fn, x_init: jax.Array, *, num_steps: int, eta, rng,
              sde_type: str = "sde"):
    """A ``diffusion.ddim.SampleOutput`` trajectory with per-step log-probabilities; ``eta`` a
    scalar or a (num_steps,) per-step noise level (0: a deterministic step, log-prob 0)."""

  def log_prob(self, output, x_t, x_next, t, t_next, *, eta, sde_type: str = "sde"):
    """(log p(x_next | x_t), mean, std) of one stored transition under ``output``."""

  def kl_std(self, t, t_next, *, eta, sde_type: str = "sde"):
    """The scale s of the KL penalty ||mu - mu_ref||^2 / (2 s^2) at this step."""

  def training_pair(self, rng: jax.Array, x0: jax.Array):
    """(x_t, t, target) for a denoising / flow-matching loss on clean latents ``x0``."""

  prediction_type: str     # what ``denoise`` outputs, a ``diffusion.param`` type ("flow": v)

  def train_times(self, rng: jax.Array, shape, *, t_max: float = 1.0, shift: float = 1.0):
    """Random training times of the family (VP: integer t; flow: sigma, shifted by ``shift``)."""

  def alpha_sigma(self, t) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) of the forward kernel x_t = alpha_t x0 + sigma_t eps."""


class PipelineBase:
  """What the pipeline classes share: the frozen VAE (None in pixel space), image sizes, and
  the Orbax cache. Subclasses are dataclasses with ``vae``, ``folder`` and ``resolution``
  fields and a ``modules()`` dict of every component with weights."""

  vae: Any
  folder: str | None
  resolution: int

  def frozen(self):
    """Frozen modules the pure ``decode`` needs (passed into jitted functions as arguments)."""
    return self.vae

  @property
  def size(self) -> int:
    """The default image size in pixels."""
    return self.resolution

  @property
  def vae_scale(self) -> int:
    return 1 if self.vae is None else self.vae.config.downsample_factor

  def mesh(self):
    """The mesh the denoiser's parameters live on (None off a mesh): the samplers take it as a
    static argument and trace under ``layers.activation_sharding`` on it."""
    return mesh_lib.params_mesh(self.model)

  @staticmethod
  def shard_batch(tree: Any, batch: int, mesh) -> Any:
    """``tree``'s batch-leading arrays laid out over the batch axes of ``mesh`` (``mesh()``: the
    one the model's parameters live on), so that a sampling call splits its batch over the
    devices instead of running it whole on each; unchanged off a mesh, on one device or when
    the batch does not divide."""
    if mesh is None or mesh.size == 1:
      return tree
    return mesh_lib.shard_batch(tree, batch, mesh)

  def count_truncated(self, prompts: Sequence[str], max_tokens: int | None = None
                      ) -> tuple[int, int, int]:
    """(how many ``prompts`` are longer than the text encoder reads, that limit in tokens, the
    longest prompt's tokens); ``max_tokens`` overrides the pipeline's training limit."""
    raise NotImplementedError

  def warn_long_prompts(self, prompts: Sequence[str], what: str = "prompts",
                        max_tokens: int | None = None) -> int:
    """Prints one warning line when some ``prompts`` will be truncated; returns their count."""
    n, limit, longest = self.count_truncated(list(prompts), max_tokens)
    if n:
      print(f"warning: {n} of {len(prompts)} {what} are longer than the {limit} tokens the text "
            f"encoder reads (longest: {longest} tokens); they are truncated to {limit}",
            file=sys.stderr, flush=True)
    return n

  def save(self, dst: str) -> None:
    """Copies the folder's configs and tokenizers to ``dst`` and writes all parameters as an
    Orbax checkpoint there; ``from_pretrained(dst)`` then skips conversion."""
    copy_configs(self.folder, dst)
    orbax_io.save_modules(os.path.join(dst, PARAMS_DIR), self.modules())


def write_component(dst: str, name: str, stem: str, tensors: Mapping[str, Any]) -> None:
  """Writes ``dst/name/stem.safetensors`` (a diffusers / transformers component file)."""
  os.makedirs(os.path.join(dst, name), exist_ok=True)
  core.save_safetensors(tensors, os.path.join(dst, name, f"{stem}.safetensors"),
                        metadata={"format": "pt"})


def has_vae(index: Mapping[str, Any]) -> bool:
  """False for a pixel-space pipeline (the toy bases): ``"vae": [null, null]`` or none."""
  return bool(index.get("vae")) and index["vae"][0] is not None


# ------------------------------------------------------------------ a folder's model_index.json

_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}
_SUPPORTED = sorted(_SD_CLASSES | {"ZImagePipeline"})


def read_index(path: str) -> dict:
  """``model_index.json`` of a pipeline folder, with a message that says what is wrong."""
  if not os.path.isdir(path):
    raise core.ConversionError(f"{path!r} is not a folder" if not os.path.exists(path) else
                               f"{path!r} is a file; expected a pipeline folder")
  if not os.path.exists(os.path.join(path, "model_index.json")):
    what = "is empty" if not os.listdir(path) else "has no model_index.json"
    raise core.ConversionError(
        f"{path!r} {what}: expected a diffusers pipeline folder (model_index.json, unet/ or "
        "transformer/, text_encoder/, ...) or one written by python -m didr_jax.convert")
  return core.read_json(os.path.join(path, "model_index.json"))


def pipeline_kind(path: str, index: Mapping[str, Any]) -> str:
  """"sd", "sdxl" or "zimage" from a folder's ``model_index.json``."""
  cls = index.get("_class_name", "")
  if cls in _SD_CLASSES:
    xl = cls == "StableDiffusionXLPipeline"
    if xl != bool((index.get("text_encoder_2") or [None])[0]):
      raise core.ConversionError(
          f"{path}: model_index.json names a {cls} but "
          f"{'lists no' if xl else 'lists a'} text_encoder_2 (SDXL has two text encoders, SD "
          "one); the class and the components must agree")
    return "sdxl" if xl else "sd"
  if cls == "ZImagePipeline":
    return "zimage"
  raise core.ConversionError(f"{path}: unsupported pipeline class {cls!r}; supported: "
                             f"{_SUPPORTED}")


def components(kind: str, index: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """(components with weights, tokenizer folders) of a pipeline of ``kind``."""
  vae = ["vae"] if has_vae(index) else []
  if kind == "zimage":
    return ["transformer"] + vae + ["text_encoder"], ["tokenizer"]
  te = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
  tok = ["tokenizer"] + (["tokenizer_2"] if kind == "sdxl" else [])
  return ["unet"] + vae + te, tok


def cached_tree(path: str) -> dict | None:
  """The parameter tree (names -> array metadata, nothing read) of the Orbax cache of the
  pipeline folder ``path``; None when it has none."""
  cache = os.path.join(path, PARAMS_DIR)
  return orbax_io.tree_metadata(cache) if os.path.isdir(cache) else None


def load_components(path: str, names: Sequence[str], *,
                    loaders: Mapping[str, Callable], abstract: Mapping[str, Callable],
                    mesh=None, rules=None) -> dict[str, nnx.Module]:
  """The named components of a pipeline folder, from its Orbax cache when it has one (written
  by ``save``), else converted from the component folders' safetensors.

  ``loaders[name](folder, shardings)`` converts; ``abstract[name](folder)`` gives the abstract
  module the cache restores into; parameters are placed by ``mesh`` and the logical ``rules``.
  """
  sharding_fn = (None if mesh is None else
                 lambda v: mesh_lib.param_sharding(v, mesh, rules or mesh_lib.DEFAULT_RULES))
  cache = os.path.join(path, PARAMS_DIR)
  if os.path.isdir(cache):
    return orbax_io.restore_modules(
        cache, {n: abstract[n](os.path.join(path, n)) for n in names}, sharding_fn)
  path_fn = None if sharding_fn is None else (lambda p, v: sharding_fn(v))
  return {n: loaders[n](os.path.join(path, n), path_fn) for n in names}


def decode_images(vae: nnx.Module | None, latents: jax.Array) -> jax.Array:
  """Latents -> images in [0, 1] (pixel-space backbones pass ``vae=None``)."""
  x = latents if vae is None else vae_lib.decode_latents(vae, latents)
  return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def copy_configs(src: str | None, dst: str) -> None:
  """Copies everything but weights (configs, tokenizers, scheduler) from src to dst."""
  if src is None:
    raise ValueError("this pipeline was not loaded from a folder; nothing to copy configs from")
  if os.path.abspath(src) == os.path.abspath(dst):
    return
  skip = (".safetensors", ".bin", ".index.json", ".ckpt", ".pt")
  for root, dirs, files in os.walk(src):
    dirs[:] = [d for d in dirs if d != PARAMS_DIR and not d.startswith("_")]
    rel = os.path.relpath(root, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for f in files:
      if not f.endswith(skip):
        shutil.copy2(os.path.join(root, f), os.path.join(dst, rel, f))
