"""Shared building blocks for every ported model.

Every parameter is created through these helpers so that it carries *logical* axis names
(flax's ``sharding_names`` metadata). ``didr_jax.parallel`` maps them to mesh axes with the
rules of the config, so one model definition shards over data / fsdp / tensor meshes.

Logical axis vocabulary (keep to it, the default rules know only these):

- ``embed``: the model width a projection reads from or writes back to.
- ``mlp``: the hidden width of a feed-forward block.
- ``heads``: the concatenated attention-head width of q / k / v / out projections.
- ``vocab``: token or position tables.
- ``conv_in`` / ``conv_out``: input / output channels of a convolution.
- ``norm``: scales and biases of normalisation layers (replicated by default).

Layouts: images are NHWC inside the models (the TPU/XLA-native layout); sequences are (B, T, D);
attention heads are (B, T, N, H), the layout of ``jax.nn.dot_product_attention``.
Parameter names mirror the PyTorch module names of diffusers / transformers so that checkpoint
conversion is a mechanical renaming (see ``didr_jax.convert.core``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.parallel import mesh as mesh_lib

Dtype = Any


def _meta(axes: Sequence[str | None] | None) -> dict:
  return {} if axes is None else {"sharding_names": tuple(axes)}


def Dense(in_features: int, out_features: int, *, rngs: nnx.Rngs,
          axes: tuple[str | None, str | None] = ("embed", "mlp"), use_bias: bool = True,
          dtype: Dtype = None, param_dtype: Dtype = jnp.float32) -> nnx.Linear:
  """A torch ``nn.Linear`` equivalent; kernel is (in, out), i.e. the transpose of torch's."""
  with nnx.use_eager_sharding(False):
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs, kernel_metadata=_meta(axes),
                      bias_metadata=_meta(axes[1:]))


_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lax's (lhs, rhs, out) specs of NHWC / HWIO


def _conv(x, w, padding, strides=(1, 1), lhs_dilation=(1, 1), rhs_dilation=(1, 1),
          precision=None):
  return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation, rhs_dilation,
                                      ("NHWC", "HWIO", "NHWC"), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_canonical_vjp(x, w, strides, padding, precision):
  return _conv(x, w, padding, strides, precision=precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _conv(x, w, padding, strides, precision=precision), (x, w)


def _conv_bwd(strides, padding, precision, res, dy):
  """Both cotangents of y = conv(x, w) (NHWC x HWIO, stride s, padding (lo, hi)) as plain
  NHWC x HWIO convolutions of explicitly transposed operands:
      dx = conv(dilate_s(dy), flip_hw(w)^{io}, padding (a, H + k - 2 - (Ho - 1) s - a)),
           a = k - 1 - lo
      dw = conv(x^{b<->c}, dy as a (Ho, Wo, B, Co) kernel dilated by s,
                padding (lo, k + (Ho - 1) s - H - lo))^{(Ci, kh, kw, Co) -> (kh, kw, Ci, Co)}
  the same sums as JAX's transpose rules, which instead relabel the dimensions (kernel 'oi',
  batch and feature swapped). XLA:CPU rewrites such relabelled convolutions into its fast
  (Eigen) form only outside loops: inside a ``lax.scan`` / ``fori_loop`` body it emits them as
  naive loops, and a weight gradient there ran about 40x slower (3 convs of 16 x 32 x 32 x 64:
  30 s vs 0.7 s unrolled; ``tests/test_layers.py`` checks these cotangents against JAX's)."""
  x, w = res
  k, size, out = w.shape[:2], x.shape[1:3], dy.shape[1:3]
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  pad_x = []
  for d in range(2):
    lo = k[d] - 1 - padding[d][0]
    pad_x.append((lo, size[d] + k[d] - 2 - (out[d] - 1) * strides[d] - lo))
  dx = _conv(dy, w_t, pad_x, lhs_dilation=strides, precision=precision)
  pad_w = [(padding[d][0], k[d] + (out[d] - 1) * strides[d] - size[d] - padding[d][0])
           for d in range(2)]
  dw = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), pad_w, rhs_dilation=strides,
             precision=precision)
  return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv_canonical_vjp.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         **kwargs):
  """``jax.lax.conv_general_dilated`` (the function ``Conv2d`` hands to ``nnx.Conv``) whose
  gradient on the CPU backend is computed by plain NHWC convolutions (``_conv_bwd``), so a
  gradient inside a loop (an accumulation scan) runs at XLA:CPU's fast-convolution speed.
  Other backends, and anything but an ungrouped, undilated NHWC convolution with explicit
  padding, take lax's own."""
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if (platform() == "cpu" and tuple(map(tuple, dn)) == _NHWC and feature_group_count == 1
      and not isinstance(padding, str) and set(lhs_dilation or (1,)) == {1}
      and set(rhs_dilation or (1,)) == {1} and kwargs.get("out_sharding") is None
      and kwargs.get("preferred_element_type") is None):
    return _conv_canonical_vjp(lhs, rhs, tuple(window_strides),
                               tuple(tuple(p) for p in padding), precision)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      precision=precision, **kwargs)


def Conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
           padding: int | Sequence[tuple[int, int]] = 1, *, rngs: nnx.Rngs, use_bias: bool = True,
           axes: tuple[str | None, str | None] = ("conv_in", "conv_out"), dtype: Dtype = None,
           param_dtype: Dtype = jnp.float32) -> nnx.Conv:
  """A torch ``nn.Conv2d`` equivalent on NHWC inputs; kernel is HWIO.

  ``padding`` is torch's symmetric integer padding, or explicit ((top, bottom), (left, right)).
  """
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  with nnx.use_eager_sharding(False):
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), (stride, stride),
                    padding=tuple(padding), use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    conv_general_dilated=conv_general_dilated,
                    kernel_metadata=_meta((None, None) + tuple(axes)),
                    bias_metadata=_meta(axes[1:]))


def GroupNorm(num_groups: int, num_channels: int, *, eps: float = 1e-5, affine: bool = True,
              rngs: nnx.Rngs, dtype: Dtype = None) -> nnx.GroupNorm:
  """torch ``nn.GroupNorm`` on channels-last inputs (statistics in float32)."""
  with nnx.use_eager_sharding(False):
    return nnx.GroupNorm(num_channels, num_groups=num_groups, epsilon=eps, use_bias=affine,
                         use_scale=affine, dtype=dtype, rngs=rngs, use_fast_variance=False,
                         scale_metadata=_meta(("norm",)), bias_metadata=_meta(("norm",)))


def LayerNorm(num_features: int, *, eps: float = 1e-5, affine: bool = True, use_bias: bool = True,
              rngs: nnx.Rngs, dtype: Dtype = None) -> nnx.LayerNorm:
  """torch ``nn.LayerNorm`` over the last axis (``affine=False`` is elementwise_affine=False)."""
  with nnx.use_eager_sharding(False):
    return nnx.LayerNorm(num_features, epsilon=eps, use_bias=affine and use_bias,
                         use_scale=affine, dtype=dtype, rngs=rngs, use_fast_variance=False,
                         scale_metadata=_meta(("norm",)), bias_metadata=_meta(("norm",)))


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis, computed in float32, scaled by ``weight``."""

  def __init__(self, num_features: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None,
               dtype: Dtype = None):
    del rngs
    self.eps = eps
    self.dtype = dtype
    with nnx.use_eager_sharding(False):
      self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32), sharding_names=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(dtype)


def Embed(num_embeddings: int, features: int, *, rngs: nnx.Rngs, axes=("vocab", "embed"),
          dtype: Dtype = None) -> nnx.Embed:
  """torch ``nn.Embedding``; the table has the same (num, features) layout as torch."""
  with nnx.use_eager_sharding(False):
    return nnx.Embed(num_embeddings, features, dtype=dtype, rngs=rngs,
                     embedding_metadata=_meta(axes))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


_SCORE_BLOCK = 1 << 20  # score elements per query block of the CPU attention (4 MiB in f32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              scale: float | None = None, implementation: str | None = None) -> jax.Array:
  """Multi-head attention on (B, T, N, H) tensors through ``jax.nn.dot_product_attention``.

  ``mask`` is boolean, broadcastable to (B, N, Tq, Tk), True where attention is allowed.
  ``implementation`` is passed through (None lets XLA choose; "cudnn" on GPUs), except
  "flash": ``flash_attention``, the Pallas TPU kernel, which ``None`` also picks for programs
  traced for TPUs (``activation_sharding`` on a TPU mesh) when ``flash_supported``.
  Softmax runs in float32 whatever the input dtype (XLA's implementation does so).

  On the CPU backend (``implementation`` None, as many key as query heads) the same function
  is computed by ``blocked_attention``: XLA:CPU materialises the whole (B, N, Tq, Tk) score
  tensor, which at 1024 tokens (tiny SD at 64 px: 16 x 8 x 1024 x 1024 floats) made one
  attention take 2.4 s where PyTorch's blocked kernel takes 0.28 s; blocked, 0.11 s.
  """
  if implementation is None and platform() == "cpu" and k.shape[2] == q.shape[2]:
    return blocked_attention(q, k, v, mask=mask, scale=scale)
  if implementation == "flash" or (implementation is None and _PLATFORM.get() == "tpu"
                                   and flash_supported(q, k, mask)):
    return flash_attention(q, k, v, mask=mask, scale=scale)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      implementation=implementation)


_FLASH_BLOCK = 128  # the Pallas TPU kernel's default block along both sequence axes


def _key_mask(mask: jax.Array | None) -> jax.Array | None:
  """``mask`` as (B or 1, Tk) when it masks keys only (broadcastable to (B, 1, 1, Tk)), else
  raises ValueError."""
  if mask is None:
    return None
  m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if m.shape[1] != 1 or m.shape[2] != 1:
    raise ValueError(f"flash attention takes a key mask (B, 1, 1, Tk), not {mask.shape}")
  return m[:, 0, 0, :]


def flash_supported(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> bool:
  """Whether ``attention`` hands this call to ``flash_attention`` on TPUs: as many key as query
  heads, no mask or a key mask (padding; not causal), and scores worth not materialising (at
  least 2^20 per head: self-attention over image tokens, not a UNet's cross-attention to 77
  text tokens: with those in the kernel too, keys padded to 128, the SDXL sampler's TPU temp
  was 4.51 GiB, with XLA's attention everywhere 4.27 GiB)."""
  try:
    _key_mask(mask)
  except ValueError:
    return False
  return k.shape[2] == q.shape[2] and q.shape[1] * k.shape[1] >= _SCORE_BLOCK


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                    scale: float | None = None) -> jax.Array:
  """``attention`` on TPUs: the Pallas flash-attention kernel
  (``jax.experimental.pallas.ops.tpu.flash_attention``: blocks of 128 queries x 128 keys in
  VMEM with an online softmax, and its own backward), so neither the (B, N, Tq, Tk) scores nor
  their gradient is ever in HBM. XLA's form on TPU materialises them: the Z-Image 6B at 1024 px
  (4608 tokens, 30 heads) holds 5.1 GiB of float32 scores per image pair.

  (B, T, N, H) as ``attention``; ``mask`` only on keys (``flash_supported``), and every query
  must see at least one key. Sequences are padded to multiples of 128 (padded keys masked by
  segment ids; padded query rows dropped). Inside ``activation_sharding`` it runs per device
  under ``shard_map``, split over the mesh axes of the logical "batch" and "heads" (a Pallas
  kernel has no SPMD partitioning rule).
  Runs on a CPU under ``jax.experimental.pallas.tpu.force_tpu_interpret_mode`` (the tests)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, tq, n, h = q.shape
  tk = k.shape[1]
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  keys = _key_mask(mask)
  pq, pk = -tq % _FLASH_BLOCK, -tk % _FLASH_BLOCK
  def heads_first(x, pad):  # (B, T, N, H) -> (B, N, T + pad, H)
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
  args = [heads_first(q, pq), heads_first(k, pk), heads_first(v, pk)]
  segments = keys is not None or pk > 0
  if segments:  # attend where the ids are equal: every query 1, real keys 1, masked keys 0
    kv = jnp.ones((b, tk), jnp.int32) if keys is None else jnp.broadcast_to(keys, (b, tk))
    args += [jnp.ones((b, tq + pq), jnp.int32), jnp.pad(kv.astype(jnp.int32), ((0, 0), (0, pk)))]

  def kernel(q, k, v, *ids):
    seg = fa.SegmentIds(q=ids[0], kv=ids[1]) if ids else None
    return fa.flash_attention(q, k, v, segment_ids=seg, sm_scale=scale)

  ctx = _ACTIVATION_SHARDING.get()
  if ctx is not None:  # (B, N, T, H) split over the batch and head axes of the rules
    spec = tuple(mesh_lib.logical_to_spec(("batch", "heads"), ctx[1], ctx[0], (b, n)))
    P = jax.sharding.PartitionSpec
    qkv, ids = P(*spec), P(*spec[:1])
    kernel = jax.shard_map(kernel, mesh=ctx[0], in_specs=(qkv,) * 3 + (ids,) * (len(args) - 3),
                           out_specs=qkv, check_vma=False)
  out = kernel(*args)
  return out[:, :, :tq].transpose(0, 2, 1, 3)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                      scale: float | None = None, block: int = _SCORE_BLOCK) -> jax.Array:
  """softmax(scale q k^T, masked) v on (B, T, N, H) tensors, over blocks of queries:
      o[b, i, n] = sum_j exp(s_ij - lse_i) v[b, j, n],   lse_i = log sum_j exp(s_ij),
      s_ij = scale <q[b, i, n], k[b, j, n]> (float32; -inf-like where ``mask`` is False),
  with the queries split into the fewest equal blocks whose (B, N, block, Tk) scores hold at
  most ``block`` elements (cache-sized), one block at a time in a loop. The gradient is the
  flash-attention backward (``_attend_bwd``): per block the scores are recomputed from the
  saved lse (nothing of size Tq x Tk is stored), with p = exp(s - lse), dO the output's
  cotangent and delta_i = <dO_i, o_i>:
      dv = p^T dO,  ds = p * (dO v^T - delta),  dq = scale ds k,  dk = scale ds^T q,
  every product a plain batched matmul (XLA:CPU emits the transposed products autodiff would
  produce inside a loop as slow naive dots: the tiny SD UNet's backward spent 0.6 of its 1.6 s
  in them). The loop runs over query positions, never over the batch or heads, so batch- or
  head-sharded inputs stay sharded. ``mask``: boolean, broadcastable to (B, N, Tq, Tk). Same
  function as ``jax.nn.dot_product_attention`` (tested against it, its gradients and float64
  NumPy)."""
  b, tq, n, h = q.shape
  tk = k.shape[1]
  scale = float(h ** -0.5 if scale is None else scale)
  qb = max(1, min(tq, block // max(1, b * n * tk)))
  while tq % qb:
    qb -= 1
  nb = tq // qb
  qs = q.transpose(0, 2, 1, 3).reshape(b, n, nb, qb, h).transpose(2, 0, 1, 3, 4)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, N, Tk, H)
  per_block = const = None
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[2] > 1:  # a per-query mask is sliced with its block
      mask = jnp.broadcast_to(mask, mask.shape[:2] + (tq, tk))
      per_block = mask.reshape(mask.shape[:2] + (nb, qb, tk)).transpose(2, 0, 1, 3, 4)
    else:
      const = mask
  out = _attend(qs, kt, vt, per_block, const, scale)  # (nb, B, N, qb, H)
  return out.transpose(1, 2, 0, 3, 4).reshape(b, n, tq, h).transpose(0, 2, 1, 3)


def _scores(qq, kt, mask, scale):
  """(B, N, qb, Tk) float32 scores of one query block, masked entries at float32's min."""
  s = jnp.einsum("bnqh,bnkh->bnqk", qq, kt, preferred_element_type=jnp.float32) * scale
  return s if mask is None else jnp.where(mask, s, jnp.finfo(jnp.float32).min)


def _attend_fwd(qs, kt, vt, per_block, const, scale):
  def one(args):
    qq, mm = args  # mm: this block's slice of per_block, None without one
    s = _scores(qq, kt, const if mm is None else mm, scale)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, -1, keepdims=True)
    o = jnp.einsum("bnqk,bnkh->bnqh", p.astype(vt.dtype), vt,
                   preferred_element_type=jnp.float32) / l
    return o.astype(qs.dtype), (m + jnp.log(l))[..., 0]

  out, lse = jax.lax.map(one, (qs, per_block))
  return out, (qs, kt, vt, per_block, const, out, lse)


def _attend_bwd(scale, res, dout):
  qs, kt, vt, per_block, const, out, lse = res
  f32 = lambda x: x.astype(jnp.float32)

  # dk and dv are accumulated transposed, (B, N, H, Tk) += (B, N, H, qb) @ (B, N, qb, Tk): the
  # small (qb, H) operand is transposed (behind an optimization barrier, so XLA does not fold
  # the transpose back into the product as a contraction over a non-minor dimension)
  small_t = lambda x: jax.lax.optimization_barrier(f32(x).transpose(0, 1, 3, 2))

  def one(carry, args):
    dk_t, dv_t = carry
    qq, mm, o, lse_b, do = args
    p = jnp.exp(_scores(qq, kt, const if mm is None else mm, scale)
                - lse_b[..., None])  # (B, N, qb, Tk)
    dv_t = dv_t + jnp.einsum("bnhq,bnqk->bnhk", small_t(do), p)
    dp = jnp.einsum("bnqh,bnkh->bnqk", f32(do), f32(vt))
    delta = jnp.sum(f32(do) * f32(o), -1, keepdims=True)
    ds = p * (dp - delta) * scale
    dq = jnp.einsum("bnqk,bnkh->bnqh", ds, f32(kt))
    dk_t = dk_t + jnp.einsum("bnhq,bnqk->bnhk", small_t(qq), ds)
    return (dk_t, dv_t), dq.astype(qs.dtype)

  b, n, tk, h = kt.shape
  zeros = jnp.zeros((b, n, h, tk), jnp.float32)
  (dk_t, dv_t), dqs = jax.lax.scan(one, (zeros, zeros), (qs, per_block, out, lse, dout))
  back = lambda x, like: x.transpose(0, 1, 3, 2).astype(like.dtype)
  return dqs, back(dk_t, kt), back(dv_t, vt), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(qs, kt, vt, per_block, const, scale):
  """(nb, B, N, qb, H) outputs of the query blocks ``qs`` against keys / values (B, N, Tk, H);
  ``per_block`` (nb, B|1, N|1, qb, Tk) or ``const`` (B|1, N|1, 1, Tk): the mask, or None."""
  return _attend_fwd(qs, kt, vt, per_block, const, scale)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding, as diffusers' ``get_timestep_embedding`` (float32)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :] * scale
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ShapeOnlyRngs:
  """Stands in for ``nnx.Rngs`` when a module is built under ``nnx.eval_shape``, where no
  initial value is computed: one fixed key serves every parameter and no counter is updated.
  (Updating ``nnx.Rngs``' counter on a tracer makes flax ask the tracer for its sharding, and
  jax answers with an error message built by walking everything traced so far: the cost grows
  quadratically with the number of parameters, minutes for SDXL-sized models.)"""

  def params(self) -> jax.Array:
    return jax.random.key(0)

  __call__ = params


def abstract_module(build: Callable[[Any], nnx.Module]) -> nnx.Module:
  """``nnx.eval_shape(lambda: build(rngs))`` with ``ShapeOnlyRngs``: the shape-only module
  (ShapeDtypeStruct parameters) that checkpoint loaders and Orbax restores fill."""
  return nnx.eval_shape(lambda: build(ShapeOnlyRngs()))


_ACTIVATION_SHARDING = contextvars.ContextVar("didr_jax_activation_sharding", default=None)
_PLATFORM = contextvars.ContextVar("didr_jax_platform", default=None)


def platform() -> str:
  """The platform the program being traced is for: that of the ``activation_sharding`` mesh's
  devices (a program compiled ahead of time for a TPU topology on a CPU host takes the TPU
  forms), else JAX's default backend. Picks the CPU-only forms of ``conv_general_dilated``'s
  gradient and ``attention``."""
  return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def activation_sharding(mesh, rules=None):
  """While a model is traced inside this context, every block it runs (``remat_call``: UNet
  resnets and transformer blocks, Z-Image blocks, the VAE's up / down / mid blocks) keeps the batch axis of its
  hidden state sharded over the mesh's batch axes (``parallel.mesh.batch_sharding``, by
  ``rules``). Without these constraints XLA's sharding propagation may instead gather the batch
  and split the channels of FSDP-sharded weights: compiled on 8 devices with fsdp 8, the tiny
  SDXL sampler ran half its UNet and its whole VAE decoder on the full batch on every device.
  Trainers enter it through ``train.common.Net.jit``, pipelines in ``sample``. ``mesh`` None or
  one device: nothing is constrained."""
  active = mesh is not None and mesh.size > 1
  token = _ACTIVATION_SHARDING.set(
      (mesh, rules or mesh_lib.DEFAULT_RULES) if active else None)
  where = _PLATFORM.set(None if mesh is None else mesh.devices.flat[0].platform)
  try:
    yield
  finally:
    _PLATFORM.reset(where)
    _ACTIVATION_SHARDING.reset(token)


def constrain_batch(x: Any) -> Any:
  """``x`` (batch-leading) constrained to the batch sharding of the ``activation_sharding``
  context; unchanged outside one, for non-arrays, and when no batch axis divides the batch."""
  ctx = _ACTIVATION_SHARDING.get()
  if ctx is None or getattr(x, "ndim", 0) < 2:
    return x
  sharding = mesh_lib.batch_sharding(ctx[0], x.ndim, ctx[1], x.shape[0])
  if not tuple(sharding.spec):
    return x
  return jax.lax.with_sharding_constraint(x, sharding)


def remat_call(module: nnx.Module, *args, remat: bool = True):
  """``module(*args)``, rematerialised in the backward pass when ``remat`` (same values).

  Functional on purpose: ``nnx.remat`` writes the module's variables back after the call and
  refuses variables created in an outer trace, which is what a sampler's ``lax.scan`` body sees
  when the model was bound outside the scan. Splitting into (graph, state) and checkpointing a
  pure function avoids any write-back (these modules are stateless at call time)."""
  args = (constrain_batch(args[0]),) + args[1:]  # the hidden state (activation_sharding)
  if not remat:
    return constrain_batch(module(*args))
  graphdef, state = nnx.split(module)
  return constrain_batch(
      jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args))
