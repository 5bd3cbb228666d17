"""Qwen3 decoder (transformers ``Qwen3Model``) as the text encoder of Z-Image.

Architecture (pre-norm decoder, no final projection to the vocabulary):

  h_0 = embed_tokens[ids]
  per layer:  a = RMSNorm(h);  h = h + o_proj(Attn(rope(q_norm(q(a))), rope(k_norm(k(a))), v(a)))
              m = RMSNorm(h);  h = h + down_proj(silu(gate_proj(m)) * up_proj(m))
  last_hidden_state = norm(h_N)

q_norm / k_norm are RMSNorms over each head's ``head_dim`` (applied before the rotary embedding);
attention is grouped-query (``num_key_value_heads`` may divide ``num_attention_heads``: query head
n reads key/value head n // (N / K)), causal, with padded keys masked out and scale head_dim^-0.5.
Rotary embedding ("default" rope, half-split layout): inv_freq_j = theta^(-2j / head_dim),
angle = pos * inv_freq, x' = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1).
Position ids are ``arange(L)`` whatever the padding, as transformers computes them without a
cache; with right padding a sequence's real tokens therefore get the same result as unpadded.

Hidden states are numbered as transformers' ``output_hidden_states``: 0 is the embedding output,
i (1..N-1) the output of layer i, N the final-normed output of the last layer. Z-Image uses
``hidden_states[-2]`` (the un-normed output of layer N-1), so its encoder never runs the last
layer (``hidden_state_index`` stops the stack early).

``scan_layers=True`` stores the layers stacked (leading logical axis ``layers``) and runs them
with ``lax.scan`` (one compiled layer, as big LLM ports do); it computes the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from didr_jax.convert import core
from didr_jax.models import layers
from didr_jax.parallel import mesh as mesh_lib

Dtype = Any


# ---------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  vocab_size: int = 151936
  hidden_size: int = 2560
  intermediate_size: int = 9728
  num_hidden_layers: int = 36
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  head_dim: int = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  attention_bias: bool = False
  max_position_embeddings: int = 40960
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for the rotary embedding")

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "Qwen3Config":
    """From a transformers ``config.json`` dict (4.x legacy ``rope_theta``/``rope_scaling`` or
    5.x ``rope_parameters``). Only the "default" rope is supported; sliding-window layers are
    refused (Qwen3 text encoders do not use them)."""
    cfg = dict(cfg)
    if cfg.get("model_type", "qwen3") != "qwen3":
      raise ValueError(f"expected a qwen3 config, got model_type={cfg.get('model_type')!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"Qwen3: rope type {rope_type!r} ({rope}) is not supported; only the "
                       "default rotary embedding (rope_scaling=None) is implemented")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    layer_types = cfg.get("layer_types")
    n_layers = cfg["num_hidden_layers"]
    sliding = (cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
               and cfg.get("max_window_layers", n_layers) < n_layers)
    if sliding or (layer_types and any(t != "full_attention" for t in layer_types)):
      raise ValueError("Qwen3: sliding-window attention layers are not supported")
    heads = cfg["num_attention_heads"]
    return cls(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        hidden_act=cfg.get("hidden_act", "silu"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), attention_bias=bool(cfg.get("attention_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        pad_token_id=cfg.get("pad_token_id"))

  def to_hf(self) -> dict:
    """A transformers 5.x style config dict (what ``from_hf`` reads back)."""
    d = dataclasses.asdict(self)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    d["model_type"] = "qwen3"
    d["architectures"] = ["Qwen3Model"]
    return d


# ---------------------------------------------------------------------------------------------
# modules


class TokenEmbedding(nnx.Module):
  """torch ``nn.Embedding``: a (vocab, width) table ``weight`` stored in ``param_dtype``
  (layers.Embed has no param_dtype, and a 150k-row table should load straight into bf16)."""

  def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32):
    self.dtype = dtype
    init = jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype)
    with nnx.use_eager_sharding(False):
      self.weight = nnx.Param(init, sharding_names=("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    out = jnp.take(self.weight[...], ids, axis=0)
    return out.astype(self.dtype) if self.dtype is not None else out


def rotary_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                   dtype: Dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of shape position_ids.shape + (head_dim,), angles pos * theta^(-2j/head_dim)
  repeated for both halves (transformers' layout), computed in float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = position_ids.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, T, N, H) rotated by (cos, sin) (B, T, H): x * cos + rotate_half(x) * sin."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  xf = x.astype(jnp.float32)
  return (xf * cos + rot.astype(jnp.float32) * sin).astype(x.dtype)


class Qwen3Attention(nnx.Module):
  """Grouped-query self-attention with per-head RMSNorm on q and k, then rotary embedding."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                        cfg.num_key_value_heads, hd)
    kw = dict(rngs=rngs, use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = layers.Dense(d, self.num_heads * hd, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Dense(d, self.num_kv_heads * hd, axes=("embed", "heads"), **kw)
    self.v_proj = layers.Dense(d, self.num_kv_heads * hd, axes=("embed", "heads"), **kw)
    self.o_proj = layers.Dense(self.num_heads * hd, d, axes=("heads", "embed"), **kw)
    self.q_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
    self.k_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    q = self.q_norm(layers.split_heads(self.q_proj(x), self.num_heads))
    k = self.k_norm(layers.split_heads(self.k_proj(x), self.num_kv_heads))
    v = layers.split_heads(self.v_proj(x), self.num_kv_heads)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    # jax.nn.dot_product_attention groups query heads over kv heads exactly as repeat_kv does.
    out = layers.attention(q, k, v, mask=mask)
    return self.o_proj(layers.merge_heads(out))


class Qwen3MLP(nnx.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x))."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Dense(f, d, axes=("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
  """h + attn(norm(h)), then + mlp(norm(.)) (pre-norm residual block)."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32):
    self.self_attn = Qwen3Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp = Qwen3MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                   dtype=dtype)

  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
    return h + self.mlp(self.post_attention_layernorm(h))


def _layer_apply(graphdef, state, h, cos, sin, mask):
  return nnx.merge(graphdef, state)(h, cos, sin, mask)


class Qwen3Model(nnx.Module):
  """transformers ``Qwen3Model`` (parameter names identical, so checkpoints load by renaming).

  ``dtype`` is the compute dtype (None: that of the parameters), ``param_dtype`` the storage
  dtype of matrices and the embedding table (norm scales stay float32). ``scan_layers`` stacks
  the layers (leading ``layers`` axis) and runs them with ``lax.scan``; ``remat`` recomputes
  each layer's activations in the backward pass.
  """

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, scan_layers: bool = False, remat: bool = False):
    self.config = config
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat = remat
    self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size, rngs=rngs,
                                       dtype=dtype, param_dtype=param_dtype)
    make = lambda r: Qwen3DecoderLayer(config, rngs=r, dtype=dtype, param_dtype=param_dtype)
    if scan_layers:
      # vmap over layer rngs stacks every parameter and prepends the "layers" logical axis.
      make = nnx.split_rngs(splits=config.num_hidden_layers)(
          nnx.vmap(make, in_axes=(0,), out_axes=0,
                   transform_metadata={nnx.PARTITION_NAME: "layers"}))
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([make(rngs) for _ in range(config.num_hidden_layers)])
    self.norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               position_ids: jax.Array | None = None, hidden_state_index: int | None = None,
               output_hidden_states: bool = False):
    """input_ids (B, L) int, attention_mask (B, L) (1/True = real token; None = all real).

    Returns the final-normed last hidden state (B, L, D); with ``hidden_state_index=k`` only
    hidden state k (transformers numbering, negative allowed), running only the layers it
    needs; with ``output_hidden_states`` the tuple of all N+1 hidden states. ``position_ids``
    (B, L) or (L,) default to arange(L), as transformers uses without a cache.
    """
    cfg = self.config
    n = cfg.num_hidden_layers
    b, length = input_ids.shape
    if hidden_state_index is not None and output_hidden_states:
      raise ValueError("pass either hidden_state_index or output_hidden_states, not both")
    if hidden_state_index is not None:
      if not -(n + 1) <= hidden_state_index <= n:
        raise IndexError(f"hidden_state_index {hidden_state_index} out of range for {n} layers")
      target = hidden_state_index % (n + 1)
    else:
      target = n
    h = self.embed_tokens(input_ids)
    if position_ids is None:
      position_ids = jnp.arange(length)[None, :]
    position_ids = jnp.broadcast_to(position_ids, (b, length))
    cos, sin = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    if attention_mask is None:
      mask = causal
    else:
      mask = causal & attention_mask.astype(jnp.bool_)[:, None, None, :]

    apply = jax.checkpoint(_layer_apply, static_argnums=(0,)) if self.remat else _layer_apply
    hidden = [h]
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      if target < n:
        state = jax.tree.map(lambda x: x[:target], state)

      def body(carry, layer_state):
        out = apply(graphdef, layer_state, carry, cos, sin, mask)
        return out, (out if output_hidden_states else None)

      if target > 0:
        h, ys = jax.lax.scan(body, h, state)
        if output_hidden_states:
          hidden += [ys[i] for i in range(n)]
    else:
      for layer in self.layers[:target]:
        graphdef, state = nnx.split(layer)
        h = apply(graphdef, state, h, cos, sin, mask)
        hidden.append(h)
    if target < n:
      return h
    h = self.norm(h)
    if output_hidden_states:
      return tuple(hidden[:-1]) + (h,)
    return h


# ---------------------------------------------------------------------------------------------
# Z-Image prompt encoding


def _bucket_length(n: int, bucket: int | Sequence[int]) -> int:
  if isinstance(bucket, int):
    return max(bucket, -(-n // bucket) * bucket)
  fits = sorted(x for x in bucket if x >= n)
  if not fits:
    raise ValueError(f"longest prompt has {n} tokens, more than the largest bucket {max(bucket)}")
  return fits[0]


def tokenize_prompts_zimage(tokenizer, prompts: str | Sequence[str], *, max_length: int = 512,
                            bucket: int | Sequence[int] = 32) -> tuple[np.ndarray, np.ndarray]:
  """Host side of Z-Image's ``_encode_prompt``: each prompt becomes the chat
  ``[{"role": "user", "content": p}]`` with the generation prompt (enable_thinking=True), is
  tokenized and truncated to ``max_length`` tokens, and right-padded to a static bucket length
  (``bucket`` an int: the next multiple of it; a list: the smallest entry that fits).

  Returns (input_ids (B, L_bucket) int32, mask (B, L_bucket) bool). The pipeline pads to
  ``max_length`` instead; with right padding (Qwen's tokenizer default) the real tokens' states
  do not depend on how much padding follows them, so the results agree.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
           for p in prompts]
  ids = tokenizer(texts, padding=False, truncation=True, max_length=max_length)["input_ids"]
  length = _bucket_length(max(len(x) for x in ids), bucket)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = np.full((len(ids), length), pad, np.int32)
  mask = np.zeros((len(ids), length), np.bool_)
  for i, x in enumerate(ids):
    out[i, :len(x)] = x
    mask[i, :len(x)] = True
  return out, mask


@functools.partial(jax.jit, static_argnames=("hidden_state_index",))
def _encode(model: Qwen3Model, ids, mask, hidden_state_index: int):
  h = model(ids, mask, hidden_state_index=hidden_state_index)
  return h * mask[..., None].astype(h.dtype), mask  # padded rows zeroed: deterministic output


def encode_prompts_zimage(model: Qwen3Model, tokenizer, prompts: str | Sequence[str], *,
                          max_length: int = 512, bucket: int | Sequence[int] = 32,
                          hidden_state_index: int = -2) -> tuple[jax.Array, jax.Array]:
  """Z-Image prompt embeddings with static shapes: (embeds (B, L_bucket, D), mask (B, L_bucket)).

  ``embeds[i][mask[i]]`` equals the pipeline's ``encode_prompt(...)[0][i]`` (hidden state -2 of
  the real tokens); padded positions are zero. One compilation per bucket length.
  """
  ids, mask = tokenize_prompts_zimage(tokenizer, prompts, max_length=max_length, bucket=bucket)
  return _encode(model, jnp.asarray(ids), jnp.asarray(mask), hidden_state_index)


# ---------------------------------------------------------------------------------------------
# checkpoints


class _Qwen3Tensors(Mapping[str, np.ndarray]):
  """A transformers Qwen3 checkpoint seen with ``Qwen3Model`` keys.

  Accepts keys with or without the ``model.`` prefix (Qwen3ForCausalLM vs Qwen3Model saves);
  ``lm_head.*`` is dropped (not part of the encoder). With ``stacked`` the per-layer tensors
  ``layers.{i}.{rest}`` are presented as ``layers.{rest}`` stacked over i, Linear weights already
  transposed to (layers, in, out) (the core's layout conversion only knows 2-D/4-D kernels).
  """

  def __init__(self, store: Mapping[str, np.ndarray], num_layers: int, stacked: bool):
    self.store = store
    body = [k for k in store if not k.startswith("lm_head.")]
    prefix = "model." if body and all(k.startswith("model.") for k in body) else ""
    self.raw = {k[len(prefix):]: k for k in body}
    self.groups: dict[str, list[str]] = {}
    if stacked:
      found: dict[str, dict[int, str]] = {}
      for k in list(self.raw):
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
        if m:
          found.setdefault(f"layers.{m.group(2)}", {})[int(m.group(1))] = self.raw.pop(k)
      for k, by_layer in found.items():
        if sorted(by_layer) != list(range(num_layers)):
          raise core.ConversionError(f"{k}: checkpoint has layers {sorted(by_layer)}, the "
                                     f"config has num_hidden_layers={num_layers}")
        self.groups[k] = [by_layer[i] for i in range(num_layers)]

  def __getitem__(self, key: str) -> np.ndarray:
    if key in self.groups:
      parts = [np.asarray(self.store[k]) for k in self.groups[key]]
      return np.stack([p.T if p.ndim == 2 else p for p in parts])
    return self.store[self.raw[key]]

  def __contains__(self, key) -> bool:
    return key in self.raw or key in self.groups

  def __iter__(self) -> Iterator[str]:
    yield from self.raw
    yield from self.groups

  def __len__(self) -> int:
    return len(self.raw) + len(self.groups)


def _resolve_folder(folder: str) -> str:
  """Accepts a text-encoder folder or a Z-Image pipeline root (uses its ``text_encoder/``)."""
  if not os.path.exists(os.path.join(folder, "config.json")):
    sub = os.path.join(folder, "text_encoder")
    if os.path.exists(os.path.join(sub, "config.json")):
      return sub
  return folder


def load_qwen3(folder: str, *, dtype: Dtype = jnp.float32, scan_layers: bool = False,
               shardings: Mesh | Callable[[core.Path, nnx.Variable], Any] | None = None,
               remat: bool = False) -> Qwen3Model:
  """Builds a ``Qwen3Model`` from a transformers folder (config.json + safetensors, single or
  sharded with an index), parameters and compute in ``dtype`` (norm scales stay float32).

  ``shardings``: a Mesh (parameters placed by their logical axes with DEFAULT_RULES) or a
  callable (path, variable) -> sharding; tensors are placed one by one as they are read.
  """
  folder = _resolve_folder(folder)
  config = Qwen3Config.from_hf(core.read_json(os.path.join(folder, "config.json")))
  abstract = nnx.eval_shape(lambda: Qwen3Model(config, rngs=nnx.Rngs(0), dtype=dtype,
                                               param_dtype=dtype, scan_layers=scan_layers,
                                               remat=remat))
  tensors = _Qwen3Tensors(core.open_weights(folder, prefer=("model",)),
                          config.num_hidden_layers, stacked=scan_layers)
  if isinstance(shardings, Mesh):
    mesh = shardings
    shardings = lambda path, var: mesh_lib.param_sharding(var, mesh, mesh_lib.DEFAULT_RULES)
  return core.load_torch_weights(abstract, tensors, shardings=shardings, source=folder)


def export_qwen3(model: Qwen3Model, *, dtype: Any = None,
                 prefix: str = "") -> dict[str, np.ndarray]:
  """PyTorch-layout numpy tensors keyed like ``Qwen3Model.state_dict()`` (``prefix="model."``
  for a Qwen3ForCausalLM checkpoint); stacked layers are split back into ``layers.{i}.*``."""
  out = {}
  for path, var in core.param_paths(model):
    value = np.asarray(jax.device_get(var[...]))
    if dtype is not None:
      value = value.astype(dtype)
    if model.scan_layers and path[0] == "layers":
      for i in range(value.shape[0]):
        key = core.default_torch_key(("layers", i) + tuple(path[1:]))
        out[prefix + key] = core.flax_to_torch_layout(path, value[i])
    else:
      out[prefix + core.default_torch_key(path)] = core.flax_to_torch_layout(path, value)
  return out
