"""diffusers ``AutoencoderKL`` (the SD / SDXL / Flux / Z-Image VAE) in Flax NNX, channels-last.

Structure (parameter names follow diffusers, so checkpoints convert by renaming alone)::

  encoder: conv_in -> down_blocks[i] (resnets..., downsamplers[0] except the last)
           -> mid_block (resnet, [attention, resnet]) -> conv_norm_out -> SiLU -> conv_out
  quant_conv (1x1, optional) -> moments = (mean, logvar)
  post_quant_conv (1x1, optional) -> decoder: conv_in -> mid_block
           -> up_blocks[i] (layers_per_block + 1 resnets, upsamplers[0] except the last)
           -> conv_norm_out -> SiLU -> conv_out

Images are (B, H, W, C) in [-1, 1]; latents are (B, H / f, W / f, latent_channels) with
f = 2 ** (len(block_out_channels) - 1). Pipelines hand the denoiser *normalised* latents
(see ``encode_to_latents`` / ``decode_latents``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from didr_jax.convert import core
from didr_jax.models import blocks, layers
from didr_jax.parallel import mesh as mesh_lib

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers ``AutoencoderKL`` config.json that change the computation.

  ``latents_mean`` / ``latents_std`` (per-channel statistics some SDXL-family VAEs publish) are
  kept so the latent normalisation of ``encode_to_latents`` can honour them.
  ``force_upcast`` is advisory: the pipelines run such VAEs in float32.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (_DOWN,)
  up_block_types: tuple[str, ...] = (_UP,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = "silu"
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side: 2 ** (number of blocks - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, cfg: dict) -> "VAEConfig":
    """Reads a diffusers config dict (unknown keys such as ``sample_size`` are ignored)."""
    defaults = cls()
    get = lambda k: cfg[k] if cfg.get(k) is not None else getattr(defaults, k)
    for key, allowed in (("down_block_types", _DOWN), ("up_block_types", _UP)):
      for i, t in enumerate(get(key)):
        if t != allowed:
          raise ValueError(f"VAE config {key}[{i}] = {t!r} is not supported "
                           f"(only {allowed!r})")
    n = len(get("block_out_channels"))
    for key in ("down_block_types", "up_block_types"):
      if len(get(key)) != n:
        raise ValueError(f"VAE config {key} has {len(get(key))} entries but "
                         f"block_out_channels has {n}")
    layers.activation(get("act_fn"))  # fails early, naming the known activations
    opt = lambda k: None if cfg.get(k) is None else cfg[k]
    tup = lambda v: None if v is None else tuple(float(x) for x in v)
    return cls(
        in_channels=int(get("in_channels")), out_channels=int(get("out_channels")),
        down_block_types=tuple(get("down_block_types")),
        up_block_types=tuple(get("up_block_types")),
        block_out_channels=tuple(int(c) for c in get("block_out_channels")),
        layers_per_block=int(get("layers_per_block")),
        latent_channels=int(get("latent_channels")),
        norm_num_groups=int(get("norm_num_groups")), act_fn=str(get("act_fn")),
        scaling_factor=float(get("scaling_factor")),
        shift_factor=None if opt("shift_factor") is None else float(cfg["shift_factor"]),
        latents_mean=tup(opt("latents_mean")), latents_std=tup(opt("latents_std")),
        use_quant_conv=bool(get("use_quant_conv")),
        use_post_quant_conv=bool(get("use_post_quant_conv")),
        mid_block_add_attention=bool(get("mid_block_add_attention")),
        force_upcast=bool(get("force_upcast")))


class DownEncoderBlock2D(nnx.Module):
  """``num_layers`` resnets, then an optional stride-2 conv (right/bottom zero padding)."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
               act_fn: str, add_downsample: bool, rngs: nnx.Rngs, dtype: Any = None):
    self.resnets = nnx.List([
        blocks.ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                             temb_channels=None, groups=groups, eps=1e-6, non_linearity=act_fn,
                             rngs=rngs, dtype=dtype) for i in range(num_layers)])
    self.downsamplers = (nnx.List([blocks.Downsample2D(out_channels, padding=0, rngs=rngs,
                                                       dtype=dtype)])
                         if add_downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """``num_layers`` resnets, then an optional nearest x2 upsample + conv."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
               act_fn: str, add_upsample: bool, rngs: nnx.Rngs, dtype: Any = None):
    self.resnets = nnx.List([
        blocks.ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                             temb_channels=None, groups=groups, eps=1e-6, non_linearity=act_fn,
                             rngs=rngs, dtype=dtype) for i in range(num_layers)])
    self.upsamplers = (nnx.List([blocks.Upsample2D(out_channels, rngs=rngs, dtype=dtype)])
                       if add_upsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNetMidBlock2D(nnx.Module):
  """resnet, then (attention, resnet): single-head self-attention over all H*W positions with
  its own GroupNorm and a residual connection (diffusers' ``UNetMidBlock2D`` without temb)."""

  def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool,
               rngs: nnx.Rngs, dtype: Any = None):
    res = lambda: blocks.ResnetBlock2D(channels, channels, temb_channels=None, groups=groups,
                                       eps=1e-6, non_linearity=act_fn, rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([res(), res()])
    # heads = channels // attention_head_dim with attention_head_dim = channels: one head.
    self.attentions = nnx.List(
        [blocks.Attention(channels, heads=1, dim_head=channels, bias=True,
                          norm_num_groups=groups, eps=1e-6, residual_connection=True,
                          rngs=rngs, dtype=dtype)] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for i, resnet in enumerate(self.resnets[1:]):
      if len(self.attentions):
        x = self.attentions[i](x)
      x = resnet(x)
    return x


class Encoder(nnx.Module):
  """Image (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent_channels)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = None, remat: bool = False):
    ch = cfg.block_out_channels
    g = cfg.norm_num_groups
    self.remat = remat
    self.conv_in = layers.Conv2d(cfg.in_channels, ch[0], 3, 1, 1, rngs=rngs, dtype=dtype)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(ch[max(i - 1, 0)], c, num_layers=cfg.layers_per_block, groups=g,
                           act_fn=cfg.act_fn, add_downsample=i < len(ch) - 1, rngs=rngs,
                           dtype=dtype) for i, c in enumerate(ch)])
    self.mid_block = UNetMidBlock2D(ch[-1], groups=g, act_fn=cfg.act_fn,
                                    add_attention=cfg.mid_block_add_attention, rngs=rngs,
                                    dtype=dtype)
    self.conv_norm_out = layers.GroupNorm(g, ch[-1], eps=1e-6, rngs=rngs, dtype=dtype)
    self.conv_out = layers.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, 1, 1, rngs=rngs,
                                  dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = layers.remat_call(block, x, remat=self.remat)
    x = layers.remat_call(self.mid_block, x, remat=self.remat)
    # The output activation is always SiLU, whatever act_fn the resnets use.
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = None, remat: bool = False):
    rev = tuple(reversed(cfg.block_out_channels))
    g = cfg.norm_num_groups
    self.remat = remat
    self.conv_in = layers.Conv2d(cfg.latent_channels, rev[0], 3, 1, 1, rngs=rngs, dtype=dtype)
    self.mid_block = UNetMidBlock2D(rev[0], groups=g, act_fn=cfg.act_fn,
                                    add_attention=cfg.mid_block_add_attention, rngs=rngs,
                                    dtype=dtype)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(rev[max(i - 1, 0)], c, num_layers=cfg.layers_per_block + 1, groups=g,
                         act_fn=cfg.act_fn, add_upsample=i < len(rev) - 1, rngs=rngs,
                         dtype=dtype) for i, c in enumerate(rev)])
    self.conv_norm_out = layers.GroupNorm(g, rev[-1], eps=1e-6, rngs=rngs, dtype=dtype)
    self.conv_out = layers.Conv2d(rev[-1], cfg.out_channels, 3, 1, 1, rngs=rngs, dtype=dtype)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.conv_in(z)
    x = layers.remat_call(self.mid_block, x, remat=self.remat)
    for block in self.up_blocks:
      x = layers.remat_call(block, x, remat=self.remat)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised VAE: a diagonal Gaussian posterior q(z | x) = N(mean, exp(logvar)).

  ``dtype`` is the compute dtype (parameters stay float32 unless loaded otherwise);
  ``remat`` rematerialises each down / mid / up block in the backward pass.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = None,
               remat: bool = False):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs, dtype=dtype, remat=remat)
    self.decoder = Decoder(config, rngs=rngs, dtype=dtype, remat=remat)
    lc = config.latent_channels
    self.quant_conv = (layers.Conv2d(2 * lc, 2 * lc, 1, 1, 0, rngs=rngs, dtype=dtype)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (layers.Conv2d(lc, lc, 1, 1, 0, rngs=rngs, dtype=dtype)
                            if config.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images (B, H, W, C) -> (mean, logvar), each (B, H/f, W/f, latent_channels).

    logvar is clipped to [-30, 20] like diffusers' ``DiagonalGaussianDistribution``.
    """
    h = self.encoder(x)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw (unnormalised) latents (B, h, w, latent_channels) -> images (B, h*f, w*f, C)."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Reconstruction: decode(sample or mode of q(z | x))."""
    mean, logvar = self.encode(x)
    z = mean if rng is None else _sample(mean, logvar, rng)
    return self.decode(z)


def _sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


def _latent_stats(cfg: VAEConfig, dtype) -> tuple[Any, Any]:
  """(shift, std) of the latent normalisation z_n = (z - shift) * scaling_factor / std.

  diffusers pipelines use per-channel ``latents_mean`` / ``latents_std`` when the config has
  both (SDXL pipelines), else ``shift_factor`` (Flux, Z-Image, SD3) with std = 1, else 0 / 1
  (SD 1.x / 2.x / SDXL: z_n = z * scaling_factor).
  """
  if cfg.latents_mean is not None and cfg.latents_std is not None:
    return jnp.asarray(cfg.latents_mean, dtype), jnp.asarray(cfg.latents_std, dtype)
  return (cfg.shift_factor or 0.0), 1.0


def encode_to_latents(vae: AutoencoderKL, images: jax.Array,
                      rng: jax.Array | None = None) -> jax.Array:
  """Images (B, H, W, C) in [-1, 1] -> the normalised latents the denoiser works on (NHWC).

  z = mean + exp(logvar / 2) * eps when ``rng`` is given (``latent_dist.sample()``), else the
  mode z = mean; then z_n = (z - shift_factor) * scaling_factor (shift 0 when unset).
  """
  mean, logvar = vae.encode(images)
  z = mean if rng is None else _sample(mean, logvar, rng)
  shift, std = _latent_stats(vae.config, z.dtype)
  return (z - shift) * vae.config.scaling_factor / std


def decode_latents(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
  """Normalised latents (B, h, w, C) -> images (B, h*f, w*f, C), roughly in [-1, 1].

  The inverse of ``encode_to_latents``: z = latents / scaling_factor + shift_factor, then
  ``vae.decode(z)`` (the images are not clipped; pipelines map them to [0, 1] by (x + 1) / 2).
  """
  shift, std = _latent_stats(vae.config, latents.dtype)
  return vae.decode(latents * std / vae.config.scaling_factor + shift)


# ---------------------------------------------------------------------------------------------
# checkpoint conversion

# Old diffusers checkpoints (saved before the attention rename) name the mid-block attention
# projections query / key / value / proj_attn; diffusers still loads them, so do we.
_LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out": "proj_attn"}


def vae_torch_keys(path: core.Path) -> list[str]:
  """Candidate PyTorch keys of a parameter path: the current name, then the legacy one."""
  key = core.default_torch_key(path)
  if "attentions" not in path:
    return [key]
  legacy = [str(p) for p in path[:-1]]
  for i, p in enumerate(legacy):
    if p in _LEGACY_ATTN:
      legacy = legacy[:i] + [_LEGACY_ATTN[p]] + (legacy[i + 2:] if p == "to_out"
                                                   else legacy[i + 1:])
      break
  else:
    return [key]
  return [key, ".".join(legacy + [core.default_torch_key(path[-1:])])]


def _abstract_vae(config: VAEConfig, dtype: Any, param_dtype: Any, remat: bool) -> AutoencoderKL:
  """A shape-only model whose parameters have ``param_dtype`` (what the loader casts to)."""
  abstract = layers.abstract_module(lambda rngs: AutoencoderKL(config, rngs=rngs, dtype=dtype,
                                                               remat=remat))
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), state)
  return nnx.merge(graphdef, state)


def abstract_vae(folder: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 remat: bool = False) -> AutoencoderKL:
  """The shape-only model of a diffusers AutoencoderKL folder (for restoring an Orbax cache)."""
  config = VAEConfig.from_diffusers(core.read_json(os.path.join(folder, "config.json")))
  return _abstract_vae(config, dtype, param_dtype, remat)


def load_vae(folder: str, *, dtype: Any = None,
             shardings: Mesh | Callable[[core.Path, nnx.Variable], Any] | None = None,
             param_dtype: Any = jnp.float32, remat: bool = False) -> AutoencoderKL:
  """Loads a diffusers AutoencoderKL component folder (config.json + safetensors weights).

  ``dtype`` is the compute (activation) dtype, None meaning that of the inputs, as for every
  other model of the package; ``param_dtype`` the parameter dtype. ``shardings`` is a Mesh (parameters placed by their logical axes with the
  default rules) or a function (path, variable) -> Sharding; None puts them on the default
  device. Every tensor must be used and every parameter found (clear error otherwise).
  """
  config = VAEConfig.from_diffusers(core.read_json(os.path.join(folder, "config.json")))
  tensors = core.open_weights(folder, prefer=("diffusion_pytorch_model",))
  if isinstance(shardings, Mesh):
    mesh = shardings
    shardings = lambda path, var: mesh_lib.param_sharding(var, mesh, mesh_lib.DEFAULT_RULES)
  abstract = _abstract_vae(config, dtype, param_dtype, remat)
  return core.load_torch_weights(abstract, tensors, key_fn=vae_torch_keys, shardings=shardings,
                                 source=folder)


def export_vae(model: AutoencoderKL, dtype: Any = None) -> dict[str, np.ndarray]:
  """Torch-layout tensors keyed like diffusers' ``AutoencoderKL.state_dict()``."""
  return core.export_torch_weights(model, key_fn=vae_torch_keys, dtype=dtype)


def config_to_diffusers(config: VAEConfig) -> dict:
  """The diffusers config.json dict of ``config`` (for writing an exported component folder)."""
  d = dataclasses.asdict(config)
  d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
  return {"_class_name": "AutoencoderKL", **d}


def save_vae(model: AutoencoderKL, folder: str, dtype: Any = None) -> None:
  """Writes a diffusers component folder (config.json + diffusion_pytorch_model.safetensors)
  that ``AutoencoderKL.from_pretrained`` and ``load_vae`` read."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_to_diffusers(model.config), f, indent=2)
  core.save_safetensors(export_vae(model, dtype),
                        os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                        metadata={"format": "pt"})
