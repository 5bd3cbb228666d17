"""Convolutional and attention blocks shared by the UNet and the VAE (diffusers naming).

``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D`` and ``Attention`` follow the parameter names
of the diffusers modules of the same names, so their checkpoints convert by renaming alone.
All take channels-last (NHWC) images.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.models import layers


class ResnetBlock2D(nnx.Module):
  """GroupNorm-act-conv twice with an optional time-embedding injection and a shortcut.

  out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))) + proj(act(temb)))))) / output_scale
  With ``time_embedding_norm="scale_shift"`` the embedding gives (scale, shift) applied after
  norm2 instead: norm2(h) * (1 + scale) + shift.
  """

  def __init__(self, in_channels: int, out_channels: int | None = None, *,
               temb_channels: int | None = 512, groups: int = 32, groups_out: int | None = None,
               eps: float = 1e-6, non_linearity: str = "silu",
               time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
               use_in_shortcut: bool | None = None, conv_shortcut: bool = False,
               conv_shortcut_bias: bool = True, rngs: nnx.Rngs, dtype: Any = None):
    out_channels = out_channels or in_channels
    if time_embedding_norm not in ("default", "scale_shift"):
      raise ValueError(f"ResnetBlock2D: unsupported time_embedding_norm {time_embedding_norm!r}")
    self.time_embedding_norm = time_embedding_norm
    self.output_scale_factor = output_scale_factor
    self.act = layers.activation(non_linearity)
    self.norm1 = layers.GroupNorm(groups, in_channels, eps=eps, rngs=rngs, dtype=dtype)
    self.conv1 = layers.Conv2d(in_channels, out_channels, 3, 1, 1, rngs=rngs, dtype=dtype)
    if temb_channels is not None:
      mult = 2 if time_embedding_norm == "scale_shift" else 1
      self.time_emb_proj = layers.Dense(temb_channels, mult * out_channels, rngs=rngs,
                                        dtype=dtype, axes=("embed", "conv_out"))
    else:
      self.time_emb_proj = None
    self.norm2 = layers.GroupNorm(groups_out or groups, out_channels, eps=eps, rngs=rngs,
                                  dtype=dtype)
    self.conv2 = layers.Conv2d(out_channels, out_channels, 3, 1, 1, rngs=rngs, dtype=dtype)
    if use_in_shortcut is None:
      use_in_shortcut = in_channels != out_channels
    if use_in_shortcut:
      k, p = (3, 1) if conv_shortcut else (1, 0)
      self.conv_shortcut = layers.Conv2d(in_channels, out_channels, k, 1, p, rngs=rngs,
                                         dtype=dtype, use_bias=conv_shortcut_bias)
    else:
      self.conv_shortcut = None

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(self.act(self.norm1(x)))
    scale_shift = None
    if self.time_emb_proj is not None and temb is not None:
      t = self.time_emb_proj(self.act(temb))[:, None, None, :]
      if self.time_embedding_norm == "default":
        h = h + t
      else:
        scale_shift = jnp.split(t, 2, axis=-1)
    h = self.norm2(h)
    if scale_shift is not None:
      h = h * (1 + scale_shift[0]) + scale_shift[1]
    h = self.conv2(self.act(h))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return (shortcut + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv. ``padding=0`` is the VAE encoder's form: pad right/bottom by one first."""

  def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1,
               rngs: nnx.Rngs, dtype: Any = None):
    pad = ((padding, padding),) * 2 if padding else ((0, 1), (0, 1))
    self.conv = layers.Conv2d(channels, out_channels or channels, 3, 2, pad, rngs=rngs,
                              dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

  def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs,
               dtype: Any = None):
    self.conv = layers.Conv2d(channels, out_channels or channels, 3, 1, 1, rngs=rngs,
                              dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Attention(nnx.Module):
  """diffusers ``Attention`` (to_q / to_k / to_v / to_out.0, optional input group_norm).

  Takes (B, T, C) sequences or (B, H, W, C) images (flattened to H*W tokens and restored).
  out = to_out(softmax(q k^T / sqrt(d)) v) (+ input if ``residual_connection``) / rescale.
  """

  def __init__(self, query_dim: int, cross_attention_dim: int | None = None, *, heads: int = 8,
               dim_head: int = 64, bias: bool = False, out_bias: bool = True,
               norm_num_groups: int | None = None, eps: float = 1e-5,
               residual_connection: bool = False, rescale_output_factor: float = 1.0,
               rngs: nnx.Rngs, dtype: Any = None, attention_impl: str | None = None):
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    self.heads = heads
    self.residual_connection = residual_connection
    self.rescale_output_factor = rescale_output_factor
    self.attention_impl = attention_impl
    self.group_norm = (layers.GroupNorm(norm_num_groups, query_dim, eps=eps, rngs=rngs,
                                        dtype=dtype) if norm_num_groups else None)
    self.to_q = layers.Dense(query_dim, inner, use_bias=bias, rngs=rngs, dtype=dtype,
                             axes=("embed", "heads"))
    self.to_k = layers.Dense(kv_dim, inner, use_bias=bias, rngs=rngs, dtype=dtype,
                             axes=("embed", "heads"))
    self.to_v = layers.Dense(kv_dim, inner, use_bias=bias, rngs=rngs, dtype=dtype,
                             axes=("embed", "heads"))
    self.to_out = nnx.List([layers.Dense(inner, query_dim, use_bias=out_bias, rngs=rngs,
                                         dtype=dtype, axes=("heads", "embed"))])

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    residual = x
    spatial = x.ndim == 4
    if spatial:
      b, h, w, c = x.shape
      x = x.reshape(b, h * w, c)
    if self.group_norm is not None:
      x = self.group_norm(x)
    ctx = x if context is None else context
    q = layers.split_heads(self.to_q(x), self.heads)
    k = layers.split_heads(self.to_k(ctx), self.heads)
    v = layers.split_heads(self.to_v(ctx), self.heads)
    o = layers.attention(q, k, v, mask=mask, implementation=self.attention_impl)
    o = self.to_out[0](layers.merge_heads(o).astype(x.dtype))
    if spatial:
      o = o.reshape(b, h, w, c)
    if self.residual_connection:
      o = o + residual
    return o / self.rescale_output_factor
