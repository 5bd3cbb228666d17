"""The Z-Image single-stream DiT (S3-DiT), diffusers' ``ZImageTransformer2DModel``, in Flax NNX.

Architecture (names as in diffusers, so checkpoints convert by renaming alone):

- ``t_embedder``: sinusoidal features of ``t * t_scale`` ([cos, sin], 256 wide) -> Linear(1024)
  -> SiLU -> Linear(min(dim, 256)) = ``adaln`` (no activation afterwards).
- ``all_x_embedder["{p}-{pf}"]``: Linear on patches (p x p pixels, features in (ph, pw, c) order).
- ``cap_embedder``: RMSNorm -> Linear on the text-encoder features.
- ``noise_refiner`` (modulated) on the image tokens, ``context_refiner`` (not modulated) on the
  caption tokens, then the main ``layers`` on the joint sequence [image tokens, caption tokens].
- Block: with (scale_msa, gate_msa, scale_mlp, gate_mlp) = Linear(adaln) (no SiLU before it),
      x = x + tanh(gate_msa) * RMSNorm(Attn(RMSNorm(x) * (1 + scale_msa)))
      x = x + tanh(gate_mlp) * RMSNorm(FFN(RMSNorm(x) * (1 + scale_mlp)))
  (unmodulated blocks drop the scales and gates). FFN(x) = w2(silu(w1 x) * w3 x), hidden width
  int(dim / 3 * 8). Attention: bias-free q/k/v/out, per-head RMSNorm on q and k (qk_norm), then
  3-axis RoPE, softmax(q k^T / sqrt(head_dim)) v over the valid tokens.
- ``all_final_layer``: LayerNorm (no affine, eps 1e-6) * (1 + Linear(silu(adaln))) -> Linear.

3-axis RoPE: ``head_dim = sum(axes_dims)``; channel pairs (2k, 2k+1) of q and k are rotated by
angle pos[a] * theta^(-2j / axes_dims[a]) where the pair k belongs to axis a, sub-index j.
Positions (as diffusers' ``patchify_and_embed``), per sample with L real caption tokens and
Lp = ceil(L / 32) * 32:
  caption token j (j < Lp, the last Lp - L are ``cap_pad_token``): (j + 1, 0, 0);
  image token (h, w):                                               (Lp + 1, h, w);
  image pad tokens (the image sequence is padded to a multiple of 32 with ``x_pad_token``):
                                                                     (0, 0, 0).
Pad tokens are real inputs of attention (diffusers attends to them), so reproducing diffusers'
numbers requires them; positions past Lp of a shorter caption are masked out of attention.

Batched, static-shape calling convention (``ZImageTransformer.__call__``):
  latents (B, H, W, C) NHWC, one resolution per batch. diffusers takes a list of per-sample
    (C, F=1, H, W) tensors: ``x_torch[b] = latents[b].transpose(2, 0, 1)[:, None]``; the output
    maps back the same way (``out[b] = out_torch[b][:, 0].transpose(1, 2, 0)``).
  cap_feats (B, L_bucket, cap_feat_dim) and cap_mask (B, L_bucket) bool: sample b's caption is
    ``cap_feats[b][cap_mask[b]]`` (diffusers' list entry; the pipeline passes
    ``prompt_embeds[b][prompt_masks[b]]``). Real tokens may sit anywhere (left or right padding);
    their order is kept. Values at masked positions never affect the result.
  t (B,): the model's time, see below.

Calling convention of the diffusers pipeline (``ZImagePipeline``), for flow samplers:
  the scheduler's sigma in [0, 1] (1 = pure noise) gives scheduler timesteps 1000 * sigma, and the
  pipeline calls the transformer with ``t = (1000 - timestep) / 1000 = 1 - sigma`` (0 = noise,
  1 = clean), which the model multiplies by ``t_scale`` (1000) before the sinusoidal embedding.
  The pipeline NEGATES the output: ``noise_pred = -model_out`` and Euler-steps
  ``x <- x + (sigma_next - sigma) * noise_pred``. With x_sigma = (1 - sigma) x0 + sigma eps,
  the model therefore predicts ``v = x0 - eps = dx/dt`` for t = 1 - sigma (it points towards data).
  Classifier-free guidance there is ``pos + g * (pos - neg)`` (g = guidance_scale, 0 disables it).
  Latents are the VAE latents normalised as (z - shift_factor) * scaling_factor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.models import layers
from didr_jax.parallel import mesh as mesh_lib

Dtype = Any

ADALN_EMBED_DIM = 256  # width of the timestep embedding (min(dim, 256))
T_MID_DIM = 1024  # hidden width of the timestep MLP (fixed in diffusers)
T_FREQ_DIM = 256  # sinusoidal feature width
SEQ_MULTI_OF = 32  # image and caption sequences are padded to multiples of this with pad tokens


def _round_up(n: int, m: int = SEQ_MULTI_OF) -> int:
  return -(-n // m) * m


# ---------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class ZImageConfig:
  """The diffusers config of ``ZImageTransformer2DModel`` (defaults: Z-Image 6B)."""
  all_patch_size: tuple[int, ...] = (2,)
  all_f_patch_size: tuple[int, ...] = (1,)
  in_channels: int = 16
  dim: int = 3840
  n_layers: int = 30
  n_refiner_layers: int = 2
  n_heads: int = 30
  n_kv_heads: int = 30  # ignored by diffusers too: k / v always have n_heads heads
  norm_eps: float = 1e-5
  qk_norm: bool = True
  cap_feat_dim: int = 2560
  rope_theta: float = 256.0
  t_scale: float = 1000.0
  axes_dims: tuple[int, ...] = (32, 48, 48)
  axes_lens: tuple[int, ...] = (1024, 512, 512)

  def __post_init__(self):
    for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if len(self.all_patch_size) != len(self.all_f_patch_size):
      raise ValueError("all_patch_size and all_f_patch_size must have the same length, got "
                       f"{self.all_patch_size} and {self.all_f_patch_size}")
    if self.dim % self.n_heads:
      raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
    if sum(self.axes_dims) != self.head_dim:
      raise ValueError(f"axes_dims {self.axes_dims} must sum to the head dim "
                       f"dim / n_heads = {self.head_dim}")
    if any(d % 2 for d in self.axes_dims):
      raise ValueError(f"axes_dims {self.axes_dims} must all be even (RoPE rotates pairs)")
    if len(self.axes_lens) != len(self.axes_dims) or len(self.axes_dims) != 3:
      raise ValueError(f"axes_dims {self.axes_dims} and axes_lens {self.axes_lens} must both "
                       "have 3 entries (frame, height, width)")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def adaln_dim(self) -> int:
    return min(self.dim, ADALN_EMBED_DIM)

  @property
  def ffn_dim(self) -> int:
    return int(self.dim / 3 * 8)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "ZImageConfig":
    """From a diffusers ``config.json`` dict; unknown or unsupported keys raise ValueError."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in config.items():
      if key.startswith("_"):  # _class_name, _diffusers_version, _use_default_values, ...
        continue
      if key == "siglip_feat_dim":
        if value is not None:
          raise ValueError("ZImageConfig: siglip_feat_dim (the Omni variant's SigLIP branch) "
                           "is not supported")
        continue
      if key not in fields:
        raise ValueError(f"ZImageConfig: unknown config key {key!r}")
      kwargs[key] = value
    return cls(**kwargs)

  def to_diffusers(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    d.update(_class_name="ZImageTransformer2DModel", siglip_feat_dim=None)
    return d


# ---------------------------------------------------------------------------------------------
# RoPE


@functools.lru_cache(maxsize=16)
def _rope_tables(theta: float, axes_dims: tuple[int, ...], axes_lens: tuple[int, ...]):
  """Per-axis (cos, sin) tables (len_a, d_a / 2), float32.

  angle[p, j] = p * theta^(-2j / d_a), formed in float64 and rounded to float32 before cos / sin,
  as diffusers' ``RopeEmbedder.precompute_freqs_cis`` does.
  """
  out = []
  for d, n in zip(axes_dims, axes_lens):
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(np.arange(n, dtype=np.float64), freqs).astype(np.float32)
    out.append((np.cos(ang), np.sin(ang)))
  return tuple(out)


def rope_cos_sin(pos: jax.Array, config: ZImageConfig) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each (..., head_dim / 2), for integer positions ``pos`` (..., 3)."""
  cos, sin = [], []
  for a, (c, s) in enumerate(_rope_tables(float(config.rope_theta), config.axes_dims,
                                          config.axes_lens)):
    idx = jnp.clip(pos[..., a], 0, c.shape[0] - 1)  # in range by construction (checked statically)
    cos.append(jnp.take(jnp.asarray(c), idx, axis=0))
    sin.append(jnp.take(jnp.asarray(s), idx, axis=0))
  return jnp.concatenate(cos, -1), jnp.concatenate(sin, -1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates channel pairs (x[2k], x[2k+1]) of x (B, T, N, H) by angle k: the complex product
  (x[2k] + i x[2k+1]) * (cos_k + i sin_k), in float32; cos / sin are (B, T, H / 2)."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# modules


class ZImageAttention(nnx.Module):
  """Bias-free self-attention with per-head RMSNorm on q / k (eps 1e-5) and RoPE."""

  def __init__(self, dim: int, n_heads: int, *, qk_norm: bool = True, rngs: nnx.Rngs,
               dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
    self.heads = n_heads
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.to_q = layers.Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.to_k = layers.Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.to_v = layers.Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.to_out = nnx.List([layers.Dense(dim, dim, axes=("heads", "embed"), **kw)])
    if qk_norm:
      self.norm_q = layers.RMSNorm(dim // n_heads, eps=1e-5, dtype=dtype)
      self.norm_k = layers.RMSNorm(dim // n_heads, eps=1e-5, dtype=dtype)
    else:
      self.norm_q = self.norm_k = None

  def __call__(self, x: jax.Array, mask: jax.Array | None,
               rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    q = layers.split_heads(self.to_q(x), self.heads)
    k = layers.split_heads(self.to_k(x), self.heads)
    v = layers.split_heads(self.to_v(x), self.heads)
    if self.norm_q is not None:
      q, k = self.norm_q(q), self.norm_k(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    # mask (B, T) marks the valid keys; every query row sees at least the valid keys.
    o = layers.attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])
    return self.to_out[0](layers.merge_heads(o))


class FeedForward(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x), bias-free."""

  def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.w1 = layers.Dense(dim, hidden_dim, axes=("embed", "mlp"), **kw)
    self.w2 = layers.Dense(hidden_dim, dim, axes=("mlp", "embed"), **kw)
    self.w3 = layers.Dense(dim, hidden_dim, axes=("embed", "mlp"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class ZImageTransformerBlock(nnx.Module):
  """Sandwich-norm block with optional tanh-gated AdaLN modulation (see the module docstring)."""

  def __init__(self, config: ZImageConfig, *, modulation: bool = True, rngs: nnx.Rngs,
               dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
    c = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention = ZImageAttention(c.dim, c.n_heads, qk_norm=c.qk_norm, **kw)
    self.feed_forward = FeedForward(c.dim, c.ffn_dim, **kw)
    self.attention_norm1 = layers.RMSNorm(c.dim, eps=c.norm_eps, dtype=dtype)
    self.ffn_norm1 = layers.RMSNorm(c.dim, eps=c.norm_eps, dtype=dtype)
    self.attention_norm2 = layers.RMSNorm(c.dim, eps=c.norm_eps, dtype=dtype)
    self.ffn_norm2 = layers.RMSNorm(c.dim, eps=c.norm_eps, dtype=dtype)
    self.modulation = modulation
    if modulation:
      self.adaLN_modulation = nnx.List(
          [layers.Dense(c.adaln_dim, 4 * c.dim, axes=("embed", "mlp"), **kw)])

  def __call__(self, x: jax.Array, mask: jax.Array | None, rope: tuple[jax.Array, jax.Array],
               adaln: jax.Array | None = None) -> jax.Array:
    if self.modulation:
      mod = self.adaLN_modulation[0](adaln)[:, None, :]
      scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
      h = self.attention(self.attention_norm1(x) * (1 + scale_msa), mask, rope)
      x = x + jnp.tanh(gate_msa) * self.attention_norm2(h)
      h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
      return x + jnp.tanh(gate_mlp) * self.ffn_norm2(h)
    x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, rope))
    return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class TimestepEmbedder(nnx.Module):
  """mlp[2](silu(mlp[0]([cos(t f), sin(t f)]))), f_k = 10000^(-k / 128), k < 128."""

  def __init__(self, out_size: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # index 1 is torch's parameter-free SiLU; keep the slot so keys read mlp.0 / mlp.2
    self.mlp = nnx.List([layers.Dense(T_FREQ_DIM, T_MID_DIM, axes=(None, "mlp"), **kw), None,
                         layers.Dense(T_MID_DIM, out_size, axes=("mlp", "embed"), **kw)])

  def __call__(self, t: jax.Array) -> jax.Array:
    f = layers.timestep_embedding(t, T_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    return self.mlp[2](jax.nn.silu(self.mlp[0](f)))


class FinalLayer(nnx.Module):
  """linear(LayerNorm(x) * (1 + adaLN_modulation[1](silu(c))))."""

  def __init__(self, dim: int, adaln_dim: int, out_channels: int, *, rngs: nnx.Rngs,
               dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm_final = layers.LayerNorm(dim, eps=1e-6, affine=False, rngs=rngs, dtype=dtype)
    self.linear = layers.Dense(dim, out_channels, axes=("embed", None), **kw)
    self.adaLN_modulation = nnx.List(
        [None, layers.Dense(adaln_dim, dim, axes=(None, "embed"), **kw)])

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    scale = 1 + self.adaLN_modulation[1](jax.nn.silu(c))[:, None, :]
    return self.linear(self.norm_final(x) * scale)


class ZImageTransformer(nnx.Module):
  """diffusers' ``ZImageTransformer2DModel`` on batched, padded inputs (module docstring).

  ``scan_layers``: the main ``layers`` are one block with stacked parameters (leading axis of
  logical name "layers", length n_layers) run by one ``lax.scan``, so compile time does not grow
  with depth; otherwise ``layers`` is an ``nnx.List`` named as in diffusers. ``remat``
  rematerialises every block's activations in the backward pass (``layers.remat_call``).
  ``dtype`` is the compute dtype (None: the parameters' dtype), ``param_dtype`` the storage
  dtype of the Linear weights.
  """

  def __init__(self, config: ZImageConfig, *, scan_layers: bool = False, remat: bool = False,
               rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
    c = self.config = config
    self.scan_layers, self.remat = scan_layers, remat
    self.dtype, self.param_dtype = dtype, param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.all_x_embedder = nnx.Dict({
        f"{p}-{f}": layers.Dense(f * p * p * c.in_channels, c.dim, axes=(None, "embed"),
                                 rngs=rngs, **kw)
        for p, f in zip(c.all_patch_size, c.all_f_patch_size)})
    self.all_final_layer = nnx.Dict({
        f"{p}-{f}": FinalLayer(c.dim, c.adaln_dim, f * p * p * c.in_channels, rngs=rngs, **kw)
        for p, f in zip(c.all_patch_size, c.all_f_patch_size)})
    self.noise_refiner = nnx.List([ZImageTransformerBlock(c, modulation=True, rngs=rngs, **kw)
                                   for _ in range(c.n_refiner_layers)])
    self.context_refiner = nnx.List([ZImageTransformerBlock(c, modulation=False, rngs=rngs, **kw)
                                     for _ in range(c.n_refiner_layers)])
    self.t_embedder = TimestepEmbedder(c.adaln_dim, rngs=rngs, **kw)
    self.cap_embedder = nnx.List([
        layers.RMSNorm(c.cap_feat_dim, eps=c.norm_eps, dtype=dtype),
        layers.Dense(c.cap_feat_dim, c.dim, axes=(None, "embed"), rngs=rngs, **kw)])
    with nnx.use_eager_sharding(False):
      # diffusers initialises these to zero; random init keeps a fresh model's pads distinct.
      init = nnx.initializers.normal(0.02)
      self.x_pad_token = nnx.Param(init(rngs.params(), (1, c.dim), param_dtype),
                                   sharding_names=(None, "embed"))
      self.cap_pad_token = nnx.Param(init(rngs.params(), (1, c.dim), param_dtype),
                                     sharding_names=(None, "embed"))
    if scan_layers:
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(key):
        return ZImageTransformerBlock(c, modulation=True, rngs=nnx.Rngs(key), **kw)
      self.layers = make(jax.random.split(rngs.params(), c.n_layers))
    else:
      self.layers = nnx.List([ZImageTransformerBlock(c, modulation=True, rngs=rngs, **kw)
                              for _ in range(c.n_layers)])

  # -- pieces --------------------------------------------------------------------------------

  def _run(self, blocks: Sequence[nnx.Module], x, mask, rope, adaln):
    for block in blocks:
      x = layers.remat_call(block, x, mask, rope, adaln, remat=self.remat)
    return x

  def _run_trunk(self, x, mask, rope, adaln):
    if not self.scan_layers:
      return self._run(self.layers, x, mask, rope, adaln)
    # Functional, as ``layers.remat_call``: ``nnx.scan`` refuses variables of an outer trace
    # (a model bound outside a sampler's scan, or passed to ``jax.jit`` as a pytree).
    graphdef, stacked = nnx.split(self.layers)

    def body(x, state):  # state: one layer's slice of every stacked variable
      block = nnx.merge(graphdef, state)
      return layers.remat_call(block, x, mask, rope, adaln, remat=self.remat), None

    return jax.lax.scan(body, x, stacked)[0]

  def __call__(self, latents: jax.Array, t: jax.Array, cap_feats: jax.Array,
               cap_mask: jax.Array | None = None, *, patch_size: int | None = None,
               f_patch_size: int = 1) -> jax.Array:
    """Predicts v = x0 - eps (see the module docstring) for NHWC ``latents`` (B, H, W, C).

    t: (B,) or scalar, 1 - sigma. cap_feats: (B, L, cap_feat_dim); cap_mask: (B, L) bool, True on
    real caption tokens (None: all real). Returns (B, H, W, C) in the compute dtype.
    """
    c = self.config
    p = c.all_patch_size[0] if patch_size is None else patch_size
    key = f"{p}-{f_patch_size}"
    if key not in self.all_x_embedder:
      raise ValueError(f"patch_size={p}, f_patch_size={f_patch_size} is not one of the model's "
                       f"{list(zip(c.all_patch_size, c.all_f_patch_size))}")
    if f_patch_size != 1:
      raise ValueError("images have one frame: only f_patch_size=1 applies")
    b, h, w, ch = latents.shape
    if h % p or w % p or ch != c.in_channels:
      raise ValueError(f"latents {latents.shape}: need H, W divisible by patch_size={p} and "
                       f"C={c.in_channels}")
    ht, wt = h // p, w // p
    n = ht * wt
    n_pad = _round_up(n)
    lb = _round_up(cap_feats.shape[1])
    if lb + 1 >= c.axes_lens[0] or ht > c.axes_lens[1] or wt > c.axes_lens[2]:
      raise ValueError(f"caption bucket {cap_feats.shape[1]} (padded to {lb}) and token grid "
                       f"{ht}x{wt} exceed the RoPE tables axes_lens={c.axes_lens}")
    dtype = self.dtype or latents.dtype
    if cap_mask is None:
      cap_mask = jnp.ones(cap_feats.shape[:2], bool)
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    adaln = self.t_embedder(t * c.t_scale).astype(dtype)

    # Caption: move real tokens to the front (stable), pad the bucket to a multiple of 32.
    # Sample i has L_i real tokens followed by Lp_i - L_i pad tokens (cap_pad_token); positions
    # past Lp_i are masked out of every attention.
    cap_mask = cap_mask.astype(bool)
    order = jnp.argsort(~cap_mask, axis=1, stable=True)
    cap = jnp.take_along_axis(cap_feats, order[:, :, None], axis=1)
    cap = jnp.pad(cap, ((0, 0), (0, lb - cap.shape[1]), (0, 0)))
    cap_len = cap_mask.sum(axis=1)  # L_i
    cap_len_pad = (cap_len + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF  # Lp_i
    j = jnp.arange(lb)[None, :]
    cap_real, cap_valid = j < cap_len[:, None], j < cap_len_pad[:, None]
    cap = self.cap_embedder[1](self.cap_embedder[0](cap.astype(dtype)))
    cap = jnp.where(cap_real[..., None], cap, self.cap_pad_token[...].astype(dtype))
    zeros = jnp.zeros((b, lb), jnp.int32)
    cap_pos = jnp.stack([jnp.where(cap_valid, j + 1, 0), zeros, zeros], axis=-1)
    cap_rope = rope_cos_sin(cap_pos, c)

    # Image: patchify (B, H, W, C) -> (B, N, p*p*C) with features in (ph, pw, c) order,
    # embed, pad to a multiple of 32 with x_pad_token at position (0, 0, 0).
    x = latents.astype(dtype).reshape(b, ht, p, wt, p, ch).transpose(0, 1, 3, 2, 4, 5)
    x = self.all_x_embedder[key](x.reshape(b, n, p * p * ch))
    x = jnp.concatenate(
        [x, jnp.broadcast_to(self.x_pad_token[...].astype(dtype), (b, n_pad - n, c.dim))], 1)
    hh, ww = jnp.meshgrid(jnp.arange(ht), jnp.arange(wt), indexing="ij")
    img_pos = jnp.concatenate([
        jnp.broadcast_to((cap_len_pad + 1)[:, None, None], (b, n, 1)),
        jnp.broadcast_to(jnp.stack([hh.ravel(), ww.ravel()], -1)[None], (b, n, 2))], -1)
    img_pos = jnp.pad(img_pos.astype(jnp.int32), ((0, 0), (0, n_pad - n), (0, 0)))
    img_rope = rope_cos_sin(img_pos, c)

    x = self._run(self.noise_refiner, x, None, img_rope, adaln)
    cap = self._run(self.context_refiner, cap, cap_valid, cap_rope, None)

    # Joint sequence [image, caption]; attention is order-free given the RoPE positions, so the
    # masked tail of short captions may sit between the tokens of other samples' layouts.
    u = jnp.concatenate([x, cap], axis=1)
    mask = jnp.concatenate([jnp.ones((b, n_pad), bool), cap_valid], axis=1)
    rope = tuple(jnp.concatenate([a, bb], axis=1) for a, bb in zip(img_rope, cap_rope))
    u = self._run_trunk(u, mask, rope, adaln)

    out = self.all_final_layer[key](u[:, :n], adaln)
    out = out.reshape(b, ht, wt, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, ch)


# ---------------------------------------------------------------------------------------------
# layer forms


def _abstract(config: ZImageConfig, **kw) -> ZImageTransformer:
  return nnx.eval_shape(lambda: ZImageTransformer(config, rngs=nnx.Rngs(0), **kw))


def _rebuild(model: ZImageTransformer, scan_layers: bool) -> ZImageTransformer:
  target = _abstract(model.config, scan_layers=scan_layers, remat=model.remat,
                     dtype=model.dtype, param_dtype=model.param_dtype)
  graphdef, params, rest = nnx.split(target, nnx.Param, ...)
  src = {path: var[...] for path, var in core.param_paths(model)}
  new = []
  for path, var in nnx.to_flat_state(params):
    if path[0] != "layers":
      value = src[path]
    elif scan_layers:  # (layers, i, ...) -> stacked (layers, ...)
      value = jnp.stack([src[("layers", i) + path[1:]] for i in range(model.config.n_layers)])
    else:  # stacked (layers, ...) -> (layers, i, ...)
      value = src[("layers",) + path[2:]][path[1]]
    new.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(new), rest)


def restack_layers(model: ZImageTransformer, scan_layers: bool) -> ZImageTransformer:
  """``model`` in the given layer form, stacked (scanned) or unrolled (diffusers-named): a new
  module with the same parameter values, or ``model`` itself when it has that form. Converted
  arrays are not placed on any mesh (``parallel.mesh.shard_module`` does that)."""
  return model if model.scan_layers == scan_layers else _rebuild(model, scan_layers)


def stack_layers(model: ZImageTransformer) -> ZImageTransformer:
  """The scanned form of an unrolled model (a new module; the same parameter values)."""
  return restack_layers(model, True)


def unstack_layers(model: ZImageTransformer) -> ZImageTransformer:
  """The unrolled (diffusers-named) form of a scanned model."""
  return restack_layers(model, False)


# ---------------------------------------------------------------------------------------------
# conversion

_STACKED = "layers.*."


def _torch_key(path: core.Path) -> str:
  """Scanned trunk params read the virtual key 'layers.*.<rest>' (see ``_StackedLayers``)."""
  if path[0] == "layers" and not isinstance(path[1], int):
    return _STACKED + core.default_torch_key(path[1:])
  return core.default_torch_key(path)


class _StackedLayers(Mapping[str, np.ndarray]):
  """A view of a torch state dict where 'layers.{i}.<rest>' (i < n) appear as one key
  'layers.*.<rest>' holding the per-layer tensors stacked in OUR layout (Linear weights
  transposed to (in, out)), which ``load_torch_weights`` then takes as is."""

  def __init__(self, base: Mapping[str, np.ndarray], n: int):
    self.base, self.n = base, n
    per_layer: dict[str, set[int]] = {}
    for k in base:
      parts = k.split(".", 2)
      if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        per_layer.setdefault(parts[2], set()).add(int(parts[1]))
    self._stacked = {r for r, ids in per_layer.items() if set(range(n)) <= ids}
    self._keys = [k for k in base if not self._covered(k)] + [_STACKED + r for r in self._stacked]

  def _covered(self, k: str) -> bool:
    parts = k.split(".", 2)
    return (len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit()
            and int(parts[1]) < self.n and parts[2] in self._stacked)

  def __getitem__(self, key: str) -> np.ndarray:
    if not key.startswith(_STACKED) or key[len(_STACKED):] not in self._stacked:
      return self.base[key]
    rest = key[len(_STACKED):]
    vals = [np.asarray(self.base[f"layers.{i}.{rest}"]) for i in range(self.n)]
    return np.stack([v.T if v.ndim == 2 else v for v in vals])  # all 2-D block weights are Linear

  def __contains__(self, key) -> bool:
    return (key.startswith(_STACKED) and key[len(_STACKED):] in self._stacked) or (
        key in self.base and not self._covered(key))

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)


def zimage_from_torch(config: ZImageConfig, tensors: Mapping[str, np.ndarray], *,
                      dtype: Dtype = jnp.float32, scan_layers: bool = False, remat: bool = False,
                      shardings: Any = None, source: str = "checkpoint") -> ZImageTransformer:
  """Builds the model from a torch-layout state dict (numpy arrays or safetensors views).

  ``dtype`` is the parameter and compute dtype. ``shardings``: None (default device), a
  ``jax.sharding.Mesh`` (placement by ``didr_jax.parallel.mesh.DEFAULT_RULES``), or a callable
  (path, var) -> Sharding as ``load_torch_weights`` takes.
  """
  if isinstance(shardings, jax.sharding.Mesh):
    m = shardings
    shardings = lambda path, var: mesh_lib.param_sharding(var, m, mesh_lib.DEFAULT_RULES)
  abstract = _abstract(config, scan_layers=scan_layers, remat=remat, dtype=dtype,
                       param_dtype=dtype)
  if scan_layers:
    tensors = _StackedLayers(tensors, config.n_layers)
  return core.load_torch_weights(abstract, tensors, key_fn=_torch_key, shardings=shardings,
                                 source=source)


def load_zimage_transformer(folder: str, *, dtype: Dtype = jnp.float32, scan_layers: bool = False,
                            shardings: Any = None, remat: bool = False) -> ZImageTransformer:
  """Loads a diffusers ``transformer`` component folder (config.json + safetensors, single or
  sharded with an index); see ``zimage_from_torch`` for the options."""
  config = ZImageConfig.from_diffusers(core.read_json(os.path.join(folder, "config.json")))
  return zimage_from_torch(config, core.open_weights(folder), dtype=dtype,
                           scan_layers=scan_layers, remat=remat, shardings=shardings,
                           source=folder)


def export_zimage_transformer(model: ZImageTransformer, *, dtype: Any = None,
                              as_torch: bool = False) -> dict[str, Any]:
  """The diffusers state dict of ``model`` (either layer form): numpy arrays in torch layout, or
  torch tensors with ``as_torch`` (what ``ZImageTransformer2DModel.load_state_dict(strict=True)``
  takes)."""
  out = {}
  for path, var in core.param_paths(model):
    value = np.asarray(jax.device_get(var[...]))
    if dtype is not None:
      value = value.astype(dtype)
    if path[0] == "layers" and not isinstance(path[1], int):
      for i in range(value.shape[0]):
        full = ("layers", i) + path[1:]
        out[core.default_torch_key(full)] = core.flax_to_torch_layout(full, value[i])
    else:
      out[core.default_torch_key(path)] = core.flax_to_torch_layout(path, value)
  if as_torch:
    import torch
    def to_torch(a):
      if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
      return torch.from_numpy(np.array(a))  # a writable copy: device_get may give read-only
    out = {k: to_torch(v) for k, v in out.items()}
  return out


def save_zimage_transformer(model: ZImageTransformer, folder: str, *, dtype: Any = None) -> None:
  """Writes a diffusers component folder (config.json + diffusion_pytorch_model.safetensors)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(model.config.to_diffusers(), f, indent=2)
  core.save_safetensors(export_zimage_transformer(model, dtype=dtype),
                        os.path.join(folder, "diffusion_pytorch_model.safetensors"))
