"""CLIP text and vision towers (transformers' ``modeling_clip``) in Flax NNX.

Classes and attribute names follow transformers 5.23, so checkpoints convert by renaming alone:

- ``CLIPTextModel``: embeddings (token + position), pre-norm causal transformer encoder,
  ``final_layer_norm``. Saved *flat* by transformers >= 5.6 (``embeddings.*``); older
  checkpoints and the SD / SDXL ``text_encoder`` folders prefix ``text_model.``: both load.
- ``CLIPTextModelWithProjection``: ``text_model`` + ``text_projection`` (SDXL's second encoder).
- ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``: ViT with a class token,
  ``pre_layrnorm`` (sic, the HF spelling), ``post_layernorm``, ``visual_projection``.
- ``CLIPModel``: both towers, both projections and ``logit_scale`` (contrastive use).

Each encoder layer is pre-norm:  x = x + attn(ln1(x));  x = x + fc2(act(fc1(ln2(x)))).
Images are NHWC float pixels, already normalised by the caller: ``preprocess`` (settings
``ImagePrep``) is transformers' CLIPImageProcessor in float, differentiable and jit-able.
Parameters are float32; the ``dtype`` argument sets the compute dtype (float32 or bfloat16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.models import layers
from didr_jax.parallel import mesh as mesh_lib

Dtype = Any


# ---------------------------------------------------------------------------------------------
# configs


def _field_names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _check_common(name: str, cfg) -> None:
  layers.activation(cfg.hidden_act)  # raises ValueError naming the known activations
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"{name}: hidden_size {cfg.hidden_size} is not a multiple of "
                     f"num_attention_heads {cfg.num_attention_heads}")
  if cfg.attention_dropout:
    # Dropout only matters for training from scratch; inference and RL fine-tuning never use it.
    warnings.warn(f"{name}: attention_dropout={cfg.attention_dropout} is ignored (no dropout)")


def _sub_config(d: dict, key: str, model_types: tuple[str, ...]) -> dict:
  """The tower's dict of a transformers config.json (nested under ``key`` in CLIPModel
  configs; legacy ``<key>_dict`` entries override it, as transformers does)."""
  if key in d or f"{key}_dict" in d:
    sub = dict(d.get(key) or {})
    sub.update(d.get(f"{key}_dict") or {})
    return sub
  mt = d.get("model_type")
  if mt is not None and mt not in model_types:
    raise ValueError(f"config model_type {mt!r} is not a CLIP {key} (expected {model_types})")
  return d


def _square(name: str, field: str, v) -> int:
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      raise ValueError(f"{name}: non-square {field} {v} is not supported")
    v = v[0]
  return int(v)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers ``CLIPTextConfig`` (same field names and defaults, openai/clip-vit-base-patch32)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int | None = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407

  def __post_init__(self):
    _check_common("CLIPTextConfig", self)
    eos = self.eos_token_id
    if isinstance(eos, (list, tuple)):
      if len(eos) != 1:
        raise ValueError(f"CLIPTextConfig: several eos_token_id {eos} are not supported "
                         "(the pooled output needs one end-of-text token)")
      object.__setattr__(self, "eos_token_id", int(eos[0]))

  @classmethod
  def from_hf(cls, d: dict) -> "CLIPTextConfig":
    """From a transformers config.json dict (a CLIPTextConfig, or a CLIPConfig's text part)."""
    d = _sub_config(d, "text_config", ("clip_text_model",))
    return cls(**{k: v for k, v in d.items() if k in _field_names(cls)})


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers ``CLIPVisionConfig`` (same field names and defaults)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int | None = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0

  def __post_init__(self):
    _check_common("CLIPVisionConfig", self)
    size = _square("CLIPVisionConfig", "image_size", self.image_size)
    patch = _square("CLIPVisionConfig", "patch_size", self.patch_size)
    if size % patch:
      raise ValueError(f"CLIPVisionConfig: image_size {size} is not a multiple of "
                       f"patch_size {patch}")
    object.__setattr__(self, "image_size", size)
    object.__setattr__(self, "patch_size", patch)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf(cls, d: dict) -> "CLIPVisionConfig":
    """From a transformers config.json dict (a CLIPVisionConfig, or a CLIPConfig's vision part)."""
    d = _sub_config(d, "vision_config", ("clip_vision_model",))
    return cls(**{k: v for k, v in d.items() if k in _field_names(cls)})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers ``CLIPConfig``: both towers, the shared ``projection_dim`` and the initial
  ``logit_scale`` (log of the inverse temperature)."""
  text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, d: dict) -> "CLIPConfig":
    if d.get("model_type") not in (None, "clip"):
      raise ValueError(f"config model_type {d.get('model_type')!r} is not 'clip'")
    kw = {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if d.get(k) is not None}
    return cls(text_config=CLIPTextConfig.from_hf({"text_config": d.get("text_config") or {},
                                                   "text_config_dict": d.get("text_config_dict")}),
               vision_config=CLIPVisionConfig.from_hf(
                   {"vision_config": d.get("vision_config") or {},
                    "vision_config_dict": d.get("vision_config_dict")}),
               **kw)


# ---------------------------------------------------------------------------------------------
# outputs


class CLIPTextOutput(NamedTuple):
  """``hidden_states`` = (embedding output, output of layer 1, ..., output of layer L), before
  ``final_layer_norm`` (transformers' ``output_hidden_states``; SDXL reads ``[-2]``)."""
  last_hidden_state: jax.Array  # (B, T, D), after final_layer_norm
  pooler_output: jax.Array  # (B, D), last_hidden_state at the end-of-text token
  hidden_states: tuple[jax.Array, ...]


class CLIPTextProjectionOutput(NamedTuple):
  text_embeds: jax.Array  # (B, P) = text_projection(pooler_output)
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...]


class CLIPVisionOutput(NamedTuple):
  last_hidden_state: jax.Array  # (B, 1 + num_patches, D), class token first
  pooler_output: jax.Array  # (B, D) = post_layernorm(last_hidden_state[:, 0])
  hidden_states: tuple[jax.Array, ...]


class CLIPVisionProjectionOutput(NamedTuple):
  image_embeds: jax.Array  # (B, P) = visual_projection(pooler_output)
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...]


class CLIPOutput(NamedTuple):
  logits_per_image: jax.Array  # (B_img, B_txt) = exp(logit_scale) cos(image, text)
  logits_per_text: jax.Array  # its transpose
  text_embeds: jax.Array  # L2-normalised projected text features
  image_embeds: jax.Array  # L2-normalised projected image features
  text_model_output: CLIPTextOutput
  vision_model_output: CLIPVisionOutput


# ---------------------------------------------------------------------------------------------
# encoder


class CLIPAttention(nnx.Module):
  """softmax(q k^T / sqrt(head_dim) + mask) v over ``num_heads`` heads, then ``out_proj``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype: Dtype = None):
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.k_proj = layers.Dense(d, d, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
    self.v_proj = layers.Dense(d, d, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
    self.q_proj = layers.Dense(d, d, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
    self.out_proj = layers.Dense(d, d, rngs=rngs, dtype=dtype, axes=("heads", "embed"))

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    q, k, v = (layers.split_heads(p(x), self.num_heads)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    o = layers.attention(q, k, v, mask=mask)  # default scale is head_dim ** -0.5, as CLIP's
    return self.out_proj(layers.merge_heads(o).astype(x.dtype))


class CLIPMLP(nnx.Module):
  """fc2(act(fc1(x)))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.act = layers.activation(cfg.hidden_act)
    self.fc1 = layers.Dense(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype,
                            axes=("embed", "mlp"))
    self.fc2 = layers.Dense(cfg.intermediate_size, cfg.hidden_size, rngs=rngs, dtype=dtype,
                            axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm block: x + attn(layer_norm1(x)), then + mlp(layer_norm2(.))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.self_attn = CLIPAttention(cfg, rngs=rngs, dtype=dtype)
    self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs,
                                        dtype=dtype)
    self.mlp = CLIPMLP(cfg, rngs=rngs, dtype=dtype)
    self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs,
                                        dtype=dtype)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  """A stack of ``CLIPEncoderLayer``; returns (last output, (input, output of each layer))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    hidden = [x]
    for layer in self.layers:
      x = layer(x, mask)
      hidden.append(x)
    return x, tuple(hidden)


# ---------------------------------------------------------------------------------------------
# text tower


class CLIPTextEmbeddings(nnx.Module):
  """token_embedding(ids) + position_embedding(position_ids or arange(T))."""

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.token_embedding = layers.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype)
    self.position_embedding = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                           rngs=rngs, dtype=dtype)

  def __call__(self, input_ids: jax.Array, position_ids: jax.Array | None = None) -> jax.Array:
    t = input_ids.shape[-1]
    if t > self.position_embedding.num_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                       f"{self.position_embedding.num_embeddings}")
    if position_ids is None:
      position_ids = jnp.arange(t)[None]
    return self.token_embedding(input_ids) + self.position_embedding(position_ids)


def _text_key(path) -> list[str]:
  # transformers >= 5.6 saves CLIPTextModel flat; older ones and SD folders under "text_model.".
  key = core.default_torch_key(path)
  return [key, "text_model." + key]


class CLIPTextModel(nnx.Module):
  """CLIP's text transformer (no projection).

  Attention is causal, combined with the optional padding ``attention_mask`` (B, T) (1 = keep).
  Query positions whose every key is masked (left padding) give unspecified values; CLIP's
  tokenizers pad on the right, where every query still sees itself and its prefix.
  ``pooler_output`` is the final-normed hidden state at the end-of-text token: the position of
  the largest id when ``eos_token_id == 2`` (configs older than transformers PR #24773, where
  EOT is the largest id of the vocabulary), else the first position equal to ``eos_token_id``.
  """

  torch_key = staticmethod(_text_key)

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.config = config
    self.embeddings = CLIPTextEmbeddings(config, rngs=rngs, dtype=dtype)
    self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype)
    self.final_layer_norm = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                             rngs=rngs, dtype=dtype)

  def eos_positions(self, input_ids: jax.Array) -> jax.Array:
    """(B,) index of the end-of-text token of each sequence (argmax keeps the first hit)."""
    if self.config.eos_token_id is None:
      raise ValueError("CLIPTextModel: config.eos_token_id is None, the pooled output needs it")
    if self.config.eos_token_id == 2:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> CLIPTextOutput:
    t = input_ids.shape[-1]
    x = self.embeddings(input_ids, position_ids)
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]  # (1, 1, Tq, Tk)
    if attention_mask is not None:
      mask = mask & attention_mask.astype(jnp.bool_)[:, None, None, :]
    x, hidden = self.encoder(x, mask)
    last = self.final_layer_norm(x)
    pooled = jnp.take_along_axis(last, self.eos_positions(input_ids)[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last, pooled, hidden)


class CLIPTextModelWithProjection(nnx.Module):
  """``text_model`` + bias-free ``text_projection``: text_embeds = W pooler_output."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None):
    if config.projection_dim is None:
      raise ValueError("CLIPTextModelWithProjection needs config.projection_dim")
    self.config = config
    self.text_model = CLIPTextModel(config, rngs=rngs, dtype=dtype)
    self.text_projection = layers.Dense(config.hidden_size, config.projection_dim,
                                        use_bias=False, rngs=rngs, dtype=dtype,
                                        axes=("embed", None))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> CLIPTextProjectionOutput:
    out = self.text_model(input_ids, attention_mask, position_ids)
    return CLIPTextProjectionOutput(self.text_projection(out.pooler_output), *out)


# ---------------------------------------------------------------------------------------------
# vision tower


class CLIPVisionEmbeddings(nnx.Module):
  """[class_embedding; patch_embedding(pixels) flattened row-major] + position_embedding."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.dtype = dtype
    self.image_size = cfg.image_size
    d = cfg.hidden_size
    with nnx.use_eager_sharding(False):
      # transformers' init: N(0, 1 / hidden_size)
      self.class_embedding = nnx.Param(
          jax.random.normal(rngs.params(), (d,), jnp.float32) * d ** -0.5,
          sharding_names=("embed",))
    self.patch_embedding = layers.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size,
                                         0, use_bias=False, rngs=rngs, dtype=dtype)
    self.position_embedding = layers.Embed(cfg.num_patches + 1, d, rngs=rngs, dtype=dtype)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    b, h, w, _ = pixel_values.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"input image size {h}x{w} does not match the model's "
                       f"{self.image_size}x{self.image_size} (position interpolation is not "
                       "supported)")
    patches = self.patch_embedding(pixel_values)  # (B, H/p, W/p, D)
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                           (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


def _vision_key(path) -> list[str]:
  key = core.default_torch_key(path)
  return [key, "vision_model." + key]


class CLIPVisionModel(nnx.Module):
  """CLIP's ViT (no projection): pre_layrnorm -> encoder -> post_layernorm on the class token."""

  torch_key = staticmethod(_vision_key)

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.config = config
    d = config.hidden_size
    self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs, dtype=dtype)
    self.pre_layrnorm = layers.LayerNorm(d, eps=config.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype)
    self.post_layernorm = layers.LayerNorm(d, eps=config.layer_norm_eps, rngs=rngs, dtype=dtype)

  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    """``pixel_values``: (B, H, W, C) normalised pixels (NHWC)."""
    x = self.pre_layrnorm(self.embeddings(pixel_values))
    last, hidden = self.encoder(x)
    return CLIPVisionOutput(last, self.post_layernorm(last[:, 0]), hidden)


class CLIPVisionModelWithProjection(nnx.Module):
  """``vision_model`` + bias-free ``visual_projection``: image_embeds = W pooler_output."""

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype = None):
    if config.projection_dim is None:
      raise ValueError("CLIPVisionModelWithProjection needs config.projection_dim")
    self.config = config
    self.vision_model = CLIPVisionModel(config, rngs=rngs, dtype=dtype)
    self.visual_projection = layers.Dense(config.hidden_size, config.projection_dim,
                                          use_bias=False, rngs=rngs, dtype=dtype,
                                          axes=("embed", None))

  def __call__(self, pixel_values: jax.Array) -> CLIPVisionProjectionOutput:
    out = self.vision_model(pixel_values)
    return CLIPVisionProjectionOutput(self.visual_projection(out.pooler_output), *out)


# ---------------------------------------------------------------------------------------------
# both towers


def l2_normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
  """x / ||x||_2 over the last axis (in float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class CLIPModel(nnx.Module):
  """Contrastive CLIP: logits_per_text = exp(logit_scale) * norm(text_feat) @ norm(image_feat)^T."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.config = config
    tc, vc = config.text_config, config.vision_config
    self.text_model = CLIPTextModel(tc, rngs=rngs, dtype=dtype)
    self.vision_model = CLIPVisionModel(vc, rngs=rngs, dtype=dtype)
    self.visual_projection = layers.Dense(vc.hidden_size, config.projection_dim, use_bias=False,
                                          rngs=rngs, dtype=dtype, axes=("embed", None))
    self.text_projection = layers.Dense(tc.hidden_size, config.projection_dim, use_bias=False,
                                        rngs=rngs, dtype=dtype, axes=("embed", None))
    with nnx.use_eager_sharding(False):
      self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32),
                                   sharding_names=())

  def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                        position_ids: jax.Array | None = None) -> jax.Array:
    """(B, projection_dim) un-normalised projected text features."""
    return self.text_projection(
        self.text_model(input_ids, attention_mask, position_ids).pooler_output)

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    """(B, projection_dim) un-normalised projected image features; pixels NHWC."""
    return self.visual_projection(self.vision_model(pixel_values).pooler_output)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
               attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> CLIPOutput:
    t_out = self.text_model(input_ids, attention_mask, position_ids)
    v_out = self.vision_model(pixel_values)
    text = l2_normalize(self.text_projection(t_out.pooler_output))
    image = l2_normalize(self.visual_projection(v_out.pooler_output))
    logits_per_text = jnp.exp(self.logit_scale[...]) * text @ image.T
    return CLIPOutput(logits_per_text.T, logits_per_text, text, image, t_out, v_out)


# ---------------------------------------------------------------------------------------------
# checkpoints

CLIP_CLASSES = {c.__name__: c for c in (CLIPTextModel, CLIPTextModelWithProjection,
                                        CLIPVisionModel, CLIPVisionModelWithProjection,
                                        CLIPModel)}
_TEXT = (CLIPTextModel, CLIPTextModelWithProjection)
_VISION = (CLIPVisionModel, CLIPVisionModelWithProjection)


def config_for(cls: type, d: dict):
  """The config ``cls`` needs, read from a transformers config.json dict."""
  if cls is CLIPModel:
    return CLIPConfig.from_hf(d)
  if cls not in _TEXT + _VISION:
    raise TypeError(f"{cls} is not a CLIP model class ({sorted(CLIP_CLASSES)})")
  cfg = (CLIPTextConfig if cls in _TEXT else CLIPVisionConfig).from_hf(d)
  if "text_config" in d and d.get("projection_dim") is not None:
    # a tower read out of a CLIPModel checkpoint: CLIPModel's projections use the top-level size
    cfg = dataclasses.replace(cfg, projection_dim=d["projection_dim"])
  return cfg


def _infer_class(d: dict, keys) -> type:
  for arch in d.get("architectures") or ():
    if arch in CLIP_CLASSES:
      return CLIP_CLASSES[arch]
  mt = d.get("model_type")
  if mt == "clip":
    return CLIPModel
  if mt == "clip_text_model":
    return CLIPTextModelWithProjection if "text_projection.weight" in keys else CLIPTextModel
  if mt == "clip_vision_model":
    return (CLIPVisionModelWithProjection if "visual_projection.weight" in keys
            else CLIPVisionModel)
  raise core.ConversionError(f"cannot tell the CLIP class from config (architectures="
                             f"{d.get('architectures')}, model_type={mt!r}); pass cls=")


def _ignore_fn(cls: type, d: dict) -> Callable[[str], bool]:
  """position_ids buffers always; and, when one tower is read from a full CLIPModel
  checkpoint, the other tower's tensors and logit_scale."""
  full = d.get("model_type") == "clip" or "CLIPModel" in (d.get("architectures") or ())
  own = {CLIPTextModel: ("text_model.",), CLIPVisionModel: ("vision_model.",),
         CLIPTextModelWithProjection: ("text_model.", "text_projection."),
         CLIPVisionModelWithProjection: ("vision_model.", "visual_projection.")}.get(cls)

  def ignore(k: str) -> bool:
    if k.endswith("position_ids"):
      return True
    return bool(full and own is not None and not k.startswith(own))
  return ignore


def _key_fn(model) -> Callable:
  return getattr(model, "torch_key", core.default_torch_key)


def abstract_clip(folder: str, cls: type | str | None = None, *,
                  dtype: Dtype = jnp.float32) -> nnx.Module:
  """The shape-only model of a CLIP folder (for restoring an Orbax cache); the class comes
  from ``cls`` or the config's ``architectures``."""
  d = core.read_json(os.path.join(folder, "config.json"))
  if cls is None:
    cls = _infer_class(d, ())
  elif isinstance(cls, str):
    cls = CLIP_CLASSES[cls]
  config = config_for(cls, d)
  return layers.abstract_module(lambda rngs: cls(config, rngs=rngs, dtype=dtype))


def load_clip(folder: str, cls: type | str | None = None, *, dtype: Dtype = jnp.float32,
              shardings: Callable | jax.sharding.Mesh | None = None) -> nnx.Module:
  """Loads a transformers CLIP folder (config.json + safetensors) into one of our classes.

  ``cls`` defaults to the config's ``architectures`` (or its model_type and the tensors).
  ``dtype`` is the compute dtype; parameters are always float32. ``shardings`` is a
  ``(path, var) -> Sharding`` function, or a Mesh (parameters then placed by their logical axes
  with ``parallel.mesh.DEFAULT_RULES``). The model is built abstractly (``nnx.eval_shape``):
  no random initialisation, every tensor streamed straight into its place.
  """
  d = core.read_json(os.path.join(folder, "config.json"))
  tensors = core.open_weights(folder, prefer=("model",))
  if cls is None:
    cls = _infer_class(d, set(tensors))
  elif isinstance(cls, str):
    cls = CLIP_CLASSES[cls]
  config = config_for(cls, d)
  abstract = layers.abstract_module(lambda rngs: cls(config, rngs=rngs, dtype=dtype))
  if isinstance(shardings, jax.sharding.Mesh):
    mesh = shardings
    shardings = lambda path, var: mesh_lib.param_sharding(var, mesh, mesh_lib.DEFAULT_RULES)
  return core.load_torch_weights(abstract, tensors, key_fn=_key_fn(abstract),
                                 shardings=shardings, ignore=_ignore_fn(cls, d),
                                 source=folder)


def export_clip(model: nnx.Module, dtype: Any = None) -> dict[str, np.ndarray]:
  """Torch-layout numpy tensors keyed as transformers 5.23 saves ``model``'s class (flat
  ``embeddings.*`` for CLIPTextModel / CLIPVisionModel, prefixed inside the others)."""
  return core.export_torch_weights(model, key_fn=_key_fn(model), dtype=dtype)


def hf_config(model: nnx.Module) -> dict:
  """A transformers config.json dict for ``model`` (so an exported folder loads in both)."""
  name = type(model).__name__
  cfg = model.config
  if isinstance(cfg, CLIPConfig):
    d = {"model_type": "clip", "projection_dim": cfg.projection_dim,
         "logit_scale_init_value": cfg.logit_scale_init_value,
         "text_config": dataclasses.asdict(cfg.text_config),
         "vision_config": dataclasses.asdict(cfg.vision_config)}
  else:
    d = dataclasses.asdict(cfg)
    d["model_type"] = "clip_text_model" if isinstance(cfg, CLIPTextConfig) else "clip_vision_model"
  d["architectures"] = [name]
  return d


def save_clip(model: nnx.Module, folder: str) -> None:
  """Writes ``config.json`` + ``model.safetensors`` readable by ``load_clip`` and by
  transformers' ``from_pretrained``."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config(model), f, indent=2)
  core.save_safetensors(export_clip(model), os.path.join(folder, "model.safetensors"),
                        metadata={"format": "pt"})


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


# ---------------------------------------------------------------------------------------------
# image preprocessing (transformers' CLIPImageProcessor in float, differentiable)


@dataclasses.dataclass(frozen=True)
class ImagePrep:
  """Static preprocessing settings (hashable: safe as a jit static argument)."""
  size: int
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD
  method: str = "bicubic"

  @classmethod
  def from_folder(cls, size: int, *folders: str | None) -> "ImagePrep":
    """Mean, std and filter of the first ``preprocessor_config.json`` among ``folders``
    (transformers' CLIPImageProcessor keys); ``size`` is the vision tower's input size."""
    for folder in folders:
      path = os.path.join(folder or "", "preprocessor_config.json")
      if folder and os.path.exists(path):
        d = core.read_json(path)
        resample = d.get("resample", 3)
        if resample not in _RESAMPLE:
          raise ValueError(f"{path}: resample={resample} is not supported "
                           f"(known: {sorted(_RESAMPLE)} = {sorted(_RESAMPLE.values())})")
        return cls(size, tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(d.get("image_std", OPENAI_CLIP_STD)), _RESAMPLE[resample])
    return cls(size)


def preprocess(images: jax.Array, prep: ImagePrep) -> jax.Array:
  """(B, H, W, 3) in [0, 1] -> (B, n, n, 3) CLIP pixels, transformers' CLIPImageProcessor in
  float: the short side resized to n = ``prep.size`` (long side int(n * long / short);
  antialiased when shrinking; skipped when already n x n), the centred n x n crop (offsets
  floor((side - n) / 2)), then (x - mean) / std per channel. Differentiable; jit-able."""
  b, h, w, c = images.shape
  n = prep.size
  x = images.astype(jnp.float32)
  if (h, w) != (n, n):
    nh, nw = (n, int(n * w / h)) if h <= w else (int(n * h / w), n)
    x = jax.image.resize(x, (b, nh, nw, c), prep.method, antialias=True)
    top, left = (nh - n) // 2, (nw - n) // 2
    x = x[:, top:top + n, left:left + n]
  mean = jnp.asarray(prep.mean, jnp.float32)
  std = jnp.asarray(prep.std, jnp.float32)
  return (x - mean) / std
