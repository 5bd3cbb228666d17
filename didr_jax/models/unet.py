"""diffusers' ``UNet2DConditionModel`` (SD 1.x, SD 2.x and SDXL configs) in Flax NNX.

Structure (all names are the diffusers module names, so checkpoints convert by renaming alone):

    emb   = time_embedding(sinusoid(t))                       (+ add_embedding([text_embeds,
                                                               sinusoid(time_ids)]) for SDXL)
    h     = conv_in(x);  skips = [h]
    down  : per block, ResnetBlock2D (+ Transformer2DModel) x layers, then a stride-2 conv;
            every intermediate state is pushed onto ``skips``
    mid   : resnet, (transformer, resnet) x 1
    up    : per block, (concat(h, skips.pop()) -> resnet (+ transformer)) x (layers + 1),
            then nearest x2 upsampling + conv
    out   = conv_out(act(conv_norm_out(h)))

A Transformer2DModel is  x + proj_out(blocks(proj_in(GroupNorm(x))))  where proj_in/proj_out are
1x1 convs (SD 1.x) or linears over tokens (``use_linear_projection``, SD 2.x / SDXL), and each
BasicTransformerBlock is  x += attn1(LN(x)); x += attn2(LN(x), text); x += ff(LN(x)),  with the
GEGLU feed-forward  ff(x) = W2 (a * gelu(g)),  (a, g) = split(W1 x).

Images are NHWC. ``dtype`` is the compute dtype (e.g. bfloat16); parameters are float32 unless
a loader is given another ``param_dtype``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.models import layers
from didr_jax.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from didr_jax.parallel import mesh as mesh_lib

Dtype = Any

# ---------------------------------------------------------------------------------------------
# config

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Keys of diffusers' config that we accept only at the given (default) value: anything else
# selects a feature this port does not implement.
_MUST_EQUAL: dict[str, Any] = {
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "time_embedding_type": "positional", "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "attention_type": "default",
    "dropout": 0.0,
}
# Keys that are valid but change nothing for the block types supported here (they only act on
# SimpleCrossAttn / ResnetDownsample / "text" addition-embedding variants), or are metadata.
_NO_EFFECT = {
    "sample_size", "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
    "addition_embed_type_num_heads", "mid_block_only_cross_attention",
}


def _per_block(value: Any, n: int, key: str, kind: type | tuple[type, ...] = int) -> tuple:
  """Broadcasts a scalar config entry to one value per down block (diffusers' rule)."""
  if isinstance(value, kind) or value is None:
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"UNet config: {key} has {len(value)} entries, expected one per block ({n})")
  return value


def _layer_counts(value: Any, num_layers: int, key: str) -> tuple[int, ...]:
  """Transformer depth per resnet of one block: an int (same for all) or a per-layer list."""
  if isinstance(value, int):
    return (value,) * num_layers
  value = tuple(int(v) for v in value)
  if len(value) != num_layers:
    raise ValueError(f"UNet config: {key} entry {list(value)} needs {num_layers} values")
  return value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """A normalised UNet2DConditionModel config: every per-block entry is a tuple.

  ``num_attention_heads`` holds the head *count* per block (diffusers' misnamed
  ``attention_head_dim`` when ``num_attention_heads`` is absent). ``down_transformer_layers[i]``
  / ``up_transformer_layers[i]`` give the transformer depth after each resnet of block i.
  """
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: tuple[int, ...] = (1280,) * 4
  down_transformer_layers: tuple[tuple[int, ...], ...] = ((1, 1),) * 4
  mid_transformer_layers: int = 1
  up_transformer_layers: tuple[tuple[int, ...], ...] = ((1, 1, 1),) * 4
  num_attention_heads: tuple[int, ...] = (8,) * 4
  use_linear_projection: bool = False
  only_cross_attention: tuple[bool, ...] = (False,) * 4
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def num_upsamplers(self) -> int:
    return len(self.block_out_channels) - 1

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], *, strict: bool = True) -> "UNetConfig":
    """Parses a diffusers ``config.json`` dict; unsupported settings raise ValueError naming
    the key. With ``strict`` an unknown key is an error as well (a newer diffusers feature we
    would otherwise silently ignore)."""
    c = {k: v for k, v in config.items() if not k.startswith("_")}
    for key, default in _MUST_EQUAL.items():
      if c.get(key, default) != default:
        raise ValueError(f"UNet config: {key}={c[key]!r} is not supported "
                         f"(only {default!r})")
    known = set(_MUST_EQUAL) | _NO_EFFECT | {f.name for f in dataclasses.fields(cls)} | {
        "attention_head_dim", "transformer_layers_per_block",
        "reverse_transformer_layers_per_block", "addition_embed_type"}
    known -= {"down_transformer_layers", "mid_transformer_layers", "up_transformer_layers"}
    unknown = sorted(set(c) - known)
    if strict and unknown:
      raise ValueError(f"UNet config: unknown keys {unknown} (pass strict=False to ignore)")

    down = tuple(c.get("down_block_types", cls.down_block_types))
    up = tuple(c.get("up_block_types", cls.up_block_types))
    mid = c.get("mid_block_type", cls.mid_block_type)
    for key, types, allowed in (("down_block_types", down, _DOWN_TYPES),
                                ("up_block_types", up, _UP_TYPES)):
      for t in types:
        if t not in allowed:
          raise ValueError(f"UNet config: {key} entry {t!r} is not supported ({allowed})")
    if mid not in _MID_TYPES:
      raise ValueError(f"UNet config: mid_block_type={mid!r} is not supported ({_MID_TYPES})")
    n = len(down)
    boc = tuple(int(v) for v in c.get("block_out_channels", cls.block_out_channels))
    if len(up) != n or len(boc) != n:
      raise ValueError(f"UNet config: down_block_types ({n}), up_block_types ({len(up)}) and "
                       f"block_out_channels ({len(boc)}) must have the same length")
    if c.get("norm_num_groups", 32) is None:
      raise ValueError("UNet config: norm_num_groups=None is not supported")
    add_type = c.get("addition_embed_type")
    if add_type not in (None, "text_time"):
      raise ValueError(f"UNet config: addition_embed_type={add_type!r} is not supported "
                       "(None or 'text_time')")
    if add_type == "text_time" and (c.get("addition_time_embed_dim") is None
                                    or c.get("projection_class_embeddings_input_dim") is None):
      raise ValueError("UNet config: addition_embed_type='text_time' needs "
                       "addition_time_embed_dim and projection_class_embeddings_input_dim")
    tst = c.get("resnet_time_scale_shift", "default")
    if tst not in ("default", "scale_shift"):
      raise ValueError(f"UNet config: resnet_time_scale_shift={tst!r} is not supported")

    layers_per_block = _per_block(c.get("layers_per_block", 2), n, "layers_per_block")
    # diffusers quirk: the config's `attention_head_dim` is really the number of heads unless
    # `num_attention_heads` is given (diffusers issue #2011).
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    heads = _per_block(heads, n, "num_attention_heads/attention_head_dim")
    only_cross = _per_block(c.get("only_cross_attention", False), n, "only_cross_attention",
                            bool)
    cross_dim = _per_block(c.get("cross_attention_dim", 1280), n, "cross_attention_dim")

    tlpb = c.get("transformer_layers_per_block", 1)
    tlpb = _per_block(tlpb, n, "transformer_layers_per_block")
    reverse = c.get("reverse_transformer_layers_per_block")
    if reverse is None:
      if any(not isinstance(v, int) for v in tlpb):
        raise ValueError("UNet config: a nested transformer_layers_per_block needs "
                         "reverse_transformer_layers_per_block")
      reverse = tuple(reversed(tlpb))
    else:
      reverse = _per_block(reverse, n, "reverse_transformer_layers_per_block")
    down_tl = tuple(_layer_counts(tlpb[i], layers_per_block[i], "transformer_layers_per_block")
                    for i in range(n))
    up_tl = tuple(_layer_counts(reverse[i], layers_per_block[n - 1 - i] + 1,
                                "reverse_transformer_layers_per_block") for i in range(n))
    mid_tl = tlpb[-1] if isinstance(tlpb[-1], int) else int(tlpb[-1][0])

    for i, b in enumerate(boc):
      if b % heads[i]:
        raise ValueError(f"UNet config: block_out_channels[{i}]={b} is not divisible by "
                         f"{heads[i]} attention heads")
    return cls(
        in_channels=int(c.get("in_channels", 4)),
        out_channels=int(c.get("out_channels", 4)),
        center_input_sample=bool(c.get("center_input_sample", False)),
        flip_sin_to_cos=bool(c.get("flip_sin_to_cos", True)),
        freq_shift=float(c.get("freq_shift", 0)),
        down_block_types=down, mid_block_type=mid, up_block_types=up,
        block_out_channels=boc, layers_per_block=tuple(int(v) for v in layers_per_block),
        downsample_padding=int(c.get("downsample_padding", 1)),
        mid_block_scale_factor=float(c.get("mid_block_scale_factor", 1.0)),
        act_fn=c.get("act_fn", "silu"),
        norm_num_groups=int(c.get("norm_num_groups", 32)),
        norm_eps=float(c.get("norm_eps", 1e-5)),
        cross_attention_dim=tuple(int(v) for v in cross_dim),
        down_transformer_layers=down_tl, mid_transformer_layers=int(mid_tl),
        up_transformer_layers=up_tl,
        num_attention_heads=tuple(int(v) for v in heads),
        use_linear_projection=bool(c.get("use_linear_projection", False)),
        only_cross_attention=tuple(bool(v) for v in only_cross),
        upcast_attention=bool(c.get("upcast_attention", False)),
        resnet_time_scale_shift=tst,
        addition_embed_type=add_type,
        addition_time_embed_dim=c.get("addition_time_embed_dim"),
        projection_class_embeddings_input_dim=c.get("projection_class_embeddings_input_dim"),
        time_embedding_dim=c.get("time_embedding_dim"),
        conv_in_kernel=int(c.get("conv_in_kernel", 3)),
        conv_out_kernel=int(c.get("conv_out_kernel", 3)),
    )


# ---------------------------------------------------------------------------------------------
# modules


class _Identity(nnx.Module):
  """Placeholder for torch's parameterless ``nn.Dropout`` so list indices match diffusers."""

  def __call__(self, x):
    return x


class TimestepEmbedding(nnx.Module):
  """linear_2(act(linear_1(x))): the MLP over sinusoidal (or SDXL's concatenated) embeddings."""

  def __init__(self, in_features: int, dim: int, *, act_fn: str = "silu", rngs: nnx.Rngs,
               dtype: Dtype = None):
    self.act = layers.activation(act_fn)
    self.linear_1 = layers.Dense(in_features, dim, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
    self.linear_2 = layers.Dense(dim, dim, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(self.act(self.linear_1(x)))


class GEGLU(nnx.Module):
  """a * gelu(g) with (a, g) = split(proj(x)) (exact, erf-based gelu)."""

  def __init__(self, dim: int, inner: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.proj = layers.Dense(dim, 2 * inner, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))

  def __call__(self, x: jax.Array) -> jax.Array:
    a, g = jnp.split(self.proj(x), 2, axis=-1)
    return a * jax.nn.gelu(g, approximate=False)


class FeedForward(nnx.Module):
  """net.2(GEGLU(x)) with the 4x hidden width of diffusers' default ``FeedForward``."""

  def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs, dtype: Dtype = None):
    inner = dim * mult
    self.net = nnx.List([GEGLU(dim, inner, rngs=rngs, dtype=dtype), _Identity(),
                         layers.Dense(inner, dim, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual.

  With ``only_cross_attention`` the first attention also attends to the text (diffusers then
  passes it the self-attention mask, which the UNet never sets: no mask there).
  """

  def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, *,
               only_cross_attention: bool = False, rngs: nnx.Rngs, dtype: Dtype = None,
               attention_impl: str | None = None):
    self.only_cross_attention = only_cross_attention
    kw = dict(heads=heads, dim_head=head_dim, bias=False, rngs=rngs, dtype=dtype,
              attention_impl=attention_impl)
    self.norm1 = layers.LayerNorm(dim, eps=1e-5, rngs=rngs, dtype=dtype)
    self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, **kw)
    self.norm2 = layers.LayerNorm(dim, eps=1e-5, rngs=rngs, dtype=dtype)
    self.attn2 = Attention(dim, cross_attention_dim, **kw)
    self.norm3 = layers.LayerNorm(dim, eps=1e-5, rngs=rngs, dtype=dtype)
    self.ff = FeedForward(dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, context: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
    x = x + self.attn2(self.norm2(x), context, mask)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """x + proj_out(blocks(proj_in(GroupNorm(x)))) over the H*W tokens of an NHWC image.

  proj_in / proj_out are 1x1 convs, or linears over tokens with ``use_linear_projection``
  (identical maps; only the checkpoint layout differs).
  """

  def __init__(self, channels: int, heads: int, cross_attention_dim: int, *, num_layers: int,
               norm_num_groups: int, use_linear_projection: bool,
               only_cross_attention: bool = False, rngs: nnx.Rngs, dtype: Dtype = None,
               attention_impl: str | None = None, remat: bool = False):
    self.remat = remat
    head_dim = channels // heads
    inner = heads * head_dim
    self.norm = layers.GroupNorm(norm_num_groups, channels, eps=1e-6, rngs=rngs, dtype=dtype)
    if use_linear_projection:
      self.proj_in = layers.Dense(channels, inner, rngs=rngs, dtype=dtype,
                                  axes=("conv_in", "conv_out"))
      self.proj_out = layers.Dense(inner, channels, rngs=rngs, dtype=dtype,
                                   axes=("conv_out", "conv_in"))
    else:
      self.proj_in = layers.Conv2d(channels, inner, 1, 1, 0, rngs=rngs, dtype=dtype)
      self.proj_out = layers.Conv2d(inner, channels, 1, 1, 0, rngs=rngs, dtype=dtype,
                                    axes=("conv_out", "conv_in"))
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim,
                              only_cross_attention=only_cross_attention, rngs=rngs, dtype=dtype,
                              attention_impl=attention_impl)
        for _ in range(num_layers)])

  def __call__(self, x: jax.Array, context: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    b, h, w, _ = x.shape
    # A 1x1 conv on NHWC and a linear on the flattened tokens are the same map, so the order
    # of flattening and projecting does not matter here (it does for diffusers' NCHW).
    t = self.proj_in(self.norm(x))
    t = t.reshape(b, h * w, t.shape[-1])
    for block in self.transformer_blocks:
      t = layers.remat_call(block, t, context, mask, remat=self.remat)
    t = self.proj_out(t.reshape(b, h, w, t.shape[-1]))
    return t + x


def _transformers(cfg: UNetConfig, i: int, channels: int, depths: Sequence[int],
                  only_cross: bool, **kw) -> nnx.List:
  return nnx.List([
      Transformer2DModel(channels, cfg.num_attention_heads[i], cfg.cross_attention_dim[i],
                         num_layers=d, norm_num_groups=cfg.norm_num_groups,
                         use_linear_projection=cfg.use_linear_projection,
                         only_cross_attention=only_cross, **kw) for d in depths])


class DownBlock2D(nnx.Module):
  """diffusers' DownBlock2D, or CrossAttnDownBlock2D when ``transformer_layers`` is given.

  Returns the output and every intermediate state (after each resnet/transformer pair and
  after the downsampler) for the skip connections.
  """

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *,
               num_layers: int, resnet_kw: dict, add_downsample: bool, downsample_padding: int,
               transformers: nnx.List | None, rngs: nnx.Rngs, dtype: Dtype = None,
               remat: bool = False):
    self.remat = remat
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels,
                      temb_channels=temb_channels, rngs=rngs, dtype=dtype, **resnet_kw)
        for j in range(num_layers)])
    self.attentions = transformers
    self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=downsample_padding,
                                                rngs=rngs, dtype=dtype)])
                         if add_downsample else None)

  def __call__(self, h, temb, context, mask):
    states = []
    for j, resnet in enumerate(self.resnets):
      h = layers.remat_call(resnet, h, temb, remat=self.remat)
      if self.attentions is not None:
        h = self.attentions[j](h, context, mask)
      states.append(h)
    if self.downsamplers is not None:
      h = self.downsamplers[0](h)
      states.append(h)
    return h, states


class UNetMidBlock2DCrossAttn(nnx.Module):
  """resnets[0], then (attentions[j], resnets[j + 1]) pairs; resnets scale by
  1 / mid_block_scale_factor."""

  def __init__(self, channels: int, temb_channels: int, *, resnet_kw: dict,
               transformers: nnx.List, rngs: nnx.Rngs, dtype: Dtype = None,
               remat: bool = False):
    self.remat = remat
    self.attentions = transformers
    self.resnets = nnx.List([
        ResnetBlock2D(channels, channels, temb_channels=temb_channels, rngs=rngs, dtype=dtype,
                      **resnet_kw) for _ in range(len(transformers) + 1)])

  def __call__(self, h, temb, context, mask):
    h = layers.remat_call(self.resnets[0], h, temb, remat=self.remat)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      h = attn(h, context, mask)
      h = layers.remat_call(resnet, h, temb, remat=self.remat)
    return h


class UpBlock2D(nnx.Module):
  """diffusers' UpBlock2D, or CrossAttnUpBlock2D when ``transformers`` is given.

  Resnet j reads concat(h, skip) where skips are consumed last-first; its input width is
  (prev_output_channel if j == 0 else out) + (in_channels if j is the last else out).
  """

  def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
               temb_channels: int, *, num_layers: int, resnet_kw: dict, add_upsample: bool,
               transformers: nnx.List | None, rngs: nnx.Rngs, dtype: Dtype = None,
               remat: bool = False):
    self.remat = remat
    self.resnets = nnx.List([
        ResnetBlock2D((prev_output_channel if j == 0 else out_channels)
                      + (in_channels if j == num_layers - 1 else out_channels), out_channels,
                      temb_channels=temb_channels, rngs=rngs, dtype=dtype, **resnet_kw)
        for j in range(num_layers)])
    self.attentions = transformers
    self.upsamplers = (nnx.List([Upsample2D(out_channels, rngs=rngs, dtype=dtype)])
                       if add_upsample else None)

  def __call__(self, h, skips, temb, context, mask):
    skips = list(skips)
    for j, resnet in enumerate(self.resnets):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = layers.remat_call(resnet, h, temb, remat=self.remat)
      if self.attentions is not None:
        h = self.attentions[j](h, context, mask)
    if self.upsamplers is not None:
      h = self.upsamplers[0](h)
    return h


class UNet2DConditionModel(nnx.Module):
  """The SD 1.x / 2.x / XL denoiser, parameter-compatible with diffusers.

  ``dtype`` is the compute dtype (None: promote inputs and parameters); ``remat`` wraps every
  resnet and transformer block in ``nnx.remat`` (same values, less activation memory in the
  backward pass); ``attention_impl`` goes to ``jax.nn.dot_product_attention`` ("cudnn" on GPUs).
  ``upcast_attention`` needs nothing: the softmax always runs in float32.
  """

  def __init__(self, config: UNetConfig | Mapping[str, Any], *, rngs: nnx.Rngs,
               dtype: Dtype = None, remat: bool = False, attention_impl: str | None = None):
    cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_diffusers(config)
    self.config = cfg
    self.dtype = dtype
    self.act = layers.activation(cfg.act_fn)
    boc = cfg.block_out_channels
    n = len(boc)
    temb = cfg.time_embed_dim
    kw = dict(rngs=rngs, dtype=dtype)
    resnet_kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, non_linearity=cfg.act_fn,
                     time_embedding_norm=cfg.resnet_time_scale_shift)
    tkw = dict(kw, attention_impl=attention_impl, remat=remat)

    self.conv_in = layers.Conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel, 1,
                                 (cfg.conv_in_kernel - 1) // 2, **kw)
    self.time_embedding = TimestepEmbedding(boc[0], temb, act_fn=cfg.act_fn, **kw)
    if cfg.addition_embed_type == "text_time":
      # diffusers builds this TimestepEmbedding with its default silu, whatever act_fn says.
      self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb,
                                             **kw)
    else:
      self.add_embedding = None

    down = []
    out_ch = boc[0]
    for i, kind in enumerate(cfg.down_block_types):
      in_ch, out_ch = out_ch, boc[i]
      attn = (_transformers(cfg, i, out_ch, cfg.down_transformer_layers[i],
                            cfg.only_cross_attention[i], **tkw)
              if kind == "CrossAttnDownBlock2D" else None)
      down.append(DownBlock2D(in_ch, out_ch, temb, num_layers=cfg.layers_per_block[i],
                              resnet_kw=resnet_kw, add_downsample=i < n - 1,
                              downsample_padding=cfg.downsample_padding, transformers=attn,
                              remat=remat, **kw))
    self.down_blocks = nnx.List(down)

    if cfg.mid_block_type is not None:
      # The mid block never uses only_cross_attention (diffusers does not pass it there).
      attn = _transformers(cfg, n - 1, boc[-1], (cfg.mid_transformer_layers,), False, **tkw)
      self.mid_block = UNetMidBlock2DCrossAttn(
          boc[-1], temb, resnet_kw=dict(resnet_kw, output_scale_factor=cfg.mid_block_scale_factor),
          transformers=attn, remat=remat, **kw)
    else:
      self.mid_block = None

    up = []
    rev = list(reversed(boc))
    out_ch = rev[0]
    for i, kind in enumerate(cfg.up_block_types):
      prev, out_ch = out_ch, rev[i]
      in_ch = rev[min(i + 1, n - 1)]
      r = n - 1 - i  # the down block whose config this up block mirrors
      attn = (_transformers(cfg, r, out_ch, cfg.up_transformer_layers[i],
                            cfg.only_cross_attention[r], **tkw)
              if kind == "CrossAttnUpBlock2D" else None)
      up.append(UpBlock2D(in_ch, prev, out_ch, temb, num_layers=cfg.layers_per_block[r] + 1,
                          resnet_kw=resnet_kw, add_upsample=i < n - 1, transformers=attn,
                          remat=remat, **kw))
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = layers.GroupNorm(cfg.norm_num_groups, boc[0], eps=cfg.norm_eps, **kw)
    self.conv_out = layers.Conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel, 1,
                                  (cfg.conv_out_kernel - 1) // 2, **kw)

  def time_embed(self, timesteps: jax.Array, batch: int, dtype: Dtype, *,
                 text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None) -> jax.Array:
    """emb = time_embedding(sinusoid(t)) [+ add_embedding(concat(text_embeds,
    sinusoid(time_ids).reshape(B, -1)))] of shape (B, time_embed_dim)."""
    cfg = self.config
    t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (batch,))
    t_emb = layers.timestep_embedding(t, cfg.block_out_channels[0],
                                      flip_sin_to_cos=cfg.flip_sin_to_cos,
                                      downscale_freq_shift=cfg.freq_shift)
    emb = self.time_embedding(t_emb.astype(dtype))
    if self.add_embedding is not None:
      if text_embeds is None or time_ids is None:
        raise ValueError("this UNet has addition_embed_type='text_time' (SDXL): pass "
                         "text_embeds (B, D) and time_ids (B, 6)")
      ids = layers.timestep_embedding(jnp.ravel(time_ids), cfg.addition_time_embed_dim,
                                      flip_sin_to_cos=cfg.flip_sin_to_cos,
                                      downscale_freq_shift=cfg.freq_shift)
      add = jnp.concatenate([text_embeds.astype(jnp.float32), ids.reshape(batch, -1)], axis=-1)
      emb = emb + self.add_embedding(add.astype(emb.dtype))
    return emb

  def __call__(self, sample: jax.Array, timesteps: jax.Array | float,
               encoder_hidden_states: jax.Array, *, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None,
               encoder_attention_mask: jax.Array | None = None) -> jax.Array:
    """Predicts the denoiser output for an NHWC ``sample`` (B, H, W, in_channels).

    ``timesteps``: (B,) or a scalar; ``encoder_hidden_states``: (B, T, D) text features;
    ``text_embeds`` (B, D') / ``time_ids`` (B, 6): SDXL's pooled text and size conditioning;
    ``encoder_attention_mask``: (B, T), nonzero / True where a text token may be attended to.
    H and W must be multiples of 2 ** (number of downsamplers). Returns (B, H, W, out_channels)
    in the compute dtype.
    """
    cfg = self.config
    b, h, w, _ = sample.shape
    factor = 2 ** cfg.num_upsamplers
    if h % factor or w % factor:
      raise ValueError(f"sample size {h}x{w} must be a multiple of {factor}")
    dtype = self.dtype or sample.dtype
    sample = sample.astype(dtype)
    context = encoder_hidden_states.astype(dtype)
    mask = None
    if encoder_attention_mask is not None:
      # diffusers adds a -10000 bias on masked keys; a boolean mask is the same after softmax.
      mask = (jnp.asarray(encoder_attention_mask) > 0.5)[:, None, None, :]
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0

    emb = self.time_embed(timesteps, b, dtype, text_embeds=text_embeds, time_ids=time_ids)
    x = self.conv_in(sample)
    skips = [x]
    for block in self.down_blocks:
      x, states = block(x, emb, context, mask)
      skips.extend(states)
    if self.mid_block is not None:
      x = self.mid_block(x, emb, context, mask)
    for block in self.up_blocks:
      k = len(block.resnets)
      x = block(x, skips[-k:], emb, context, mask)
      skips = skips[:-k]
    x = self.act(self.conv_norm_out(x))
    return self.conv_out(x)


# ---------------------------------------------------------------------------------------------
# checkpoints


def abstract_unet(source: str | os.PathLike | UNetConfig | Mapping[str, Any], *,
                  dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  remat: bool = False, attention_impl: str | None = None,
                  strict_config: bool = True) -> UNet2DConditionModel:
  """The shape-only model (``jax.ShapeDtypeStruct`` parameters: no memory, no FLOPs) of a
  diffusers UNet folder (its ``config.json``), a ``UNetConfig`` or a diffusers config dict;
  what ``core.load_torch_weights`` or an Orbax restore fills. Parameters get ``param_dtype``."""
  if isinstance(source, (str, os.PathLike)):
    source = core.read_json(os.path.join(source, "config.json"))
  config = (source if isinstance(source, UNetConfig)
            else UNetConfig.from_diffusers(source, strict=strict_config))
  abstract = layers.abstract_module(lambda rngs: UNet2DConditionModel(
      config, rngs=rngs, dtype=dtype, remat=remat, attention_impl=attention_impl))
  if jnp.dtype(param_dtype) != jnp.float32:
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), state)
    abstract = nnx.merge(graphdef, state)
  return abstract


def load_unet(folder: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              shardings: Any = None, remat: bool = False, attention_impl: str | None = None,
              strict_config: bool = True) -> UNet2DConditionModel:
  """Builds the UNet of a diffusers component folder (``config.json`` + safetensors).

  ``dtype`` is the compute dtype, ``param_dtype`` that of the parameters (float32: keep
  master weights for training). ``shardings`` is a ``jax.sharding.Mesh`` (parameters placed
  by ``parallel.mesh.DEFAULT_RULES``) or a callable ``(path, variable) -> Sharding``; each
  tensor goes straight to its place as it is read.
  """
  abstract = abstract_unet(folder, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           attention_impl=attention_impl, strict_config=strict_config)
  if isinstance(shardings, jax.sharding.Mesh):
    mesh = shardings
    shardings = lambda path, var: mesh_lib.param_sharding(var, mesh, mesh_lib.DEFAULT_RULES)
  return core.load_torch_weights(abstract, core.open_weights(folder), shardings=shardings,
                                 source=folder)


def export_unet(model: UNet2DConditionModel, dtype: Dtype = None) -> dict[str, np.ndarray]:
  """diffusers-layout numpy tensors (``load_state_dict(strict=True)``-ready) of ``model``."""
  return core.export_torch_weights(model, dtype=dtype)
