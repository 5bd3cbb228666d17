"""Qwen3 text encoder: parity with transformers' Qwen3Model and Z-Image's prompt encoding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax.convert import core
from didr_jax.models import qwen3
from didr_jax.parallel import mesh as mesh_lib

VOCAB = 260  # byte-level test tokenizer: 256 bytes + 3 special tokens (+1 spare)

CONFIGS = {
    # grouped-query attention, head_dim (16) != hidden / heads (8)
    "gqa": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0),
    # plain multi-head attention with biases, 3 layers, head_dim 8, Qwen3's large theta
    "mha_bias": dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                     num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6,
                     head_dim=8, attention_bias=True, rope_theta=1_000_000.0),
}


def _err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  abs_err = float(np.abs(ours - ref).max())
  return abs_err, abs_err / max(float(np.abs(ref).max()), 1e-12)


def _assert_close(ours, ref, what, rel=1e-5):
  abs_err, rel_err = _err(ours, ref)
  print(f"{what}: max abs err {abs_err:.2e}, rel {rel_err:.2e}")
  assert rel_err < rel, f"{what}: max abs err {abs_err}, relative {rel_err}"


def _torch_model(name, cls=transformers.Qwen3Model, seed=0):
  torch.manual_seed(seed)
  model = cls(transformers.Qwen3Config(**CONFIGS[name])).eval()
  with torch.no_grad():  # move every parameter off its init (norm scales are all ones)
    for pname, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (0.1 if "norm" in pname else 0.15))
  return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
  """(name, torch model, folder, our unrolled model, our scanned model)."""
  tm = _torch_model(request.param)
  folder = str(tmp_path_factory.mktemp(request.param))
  tm.save_pretrained(folder)
  return (request.param, tm, folder, qwen3.load_qwen3(folder),
          qwen3.load_qwen3(folder, scan_layers=True))


@nnx.jit(static_argnames=("hidden_state_index",))
def _fwd(model, ids, mask, hidden_state_index=None):
  """Jitted forward (all hidden states unless an index is given). Every test feeds the same
  (B, L) so compilations are shared; eager op-by-op execution is far slower here."""
  return model(ids, mask, hidden_state_index=hidden_state_index,
               output_hidden_states=hidden_state_index is None)


B, L = 4, 12


def _ids(lengths, seed=1, left=False):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (B, L)).astype(np.int32)
  mask = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
  return ids, (mask[:, ::-1].copy() if left else mask)


def test_parity_right_padded_vs_unpadded(pair):
  name, tm, _, model, _ = pair
  lengths = (12, 7, 3, 1)
  ids, mask = _ids(lengths)
  ours = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
  assert len(ours) == tm.config.num_hidden_layers + 1
  for b, n in enumerate(lengths):  # reference: each sequence alone, without padding
    with torch.no_grad():
      ref = tm(input_ids=torch.tensor(ids[b:b + 1, :n]), output_hidden_states=True).hidden_states
    for k, (o, r) in enumerate(zip(ours, ref)):
      _assert_close(o[b, :n], r[0].numpy(), f"{name} seq{b} hidden_states[{k}]")


def test_parity_left_padding(pair):
  """Left padding: positions are arange(L) as in transformers (so not unpadded-equivalent);
  compare with transformers' own padded batch on the real tokens."""
  name, tm, _, model, _ = pair
  ids, mask = _ids((12, 9, 4, 2), seed=2, left=True)
  ours = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    ref = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             output_hidden_states=True).hidden_states
  for k, (o, r) in enumerate(zip(ours, ref)):
    _assert_close(np.asarray(o)[mask], r.numpy()[mask], f"{name} left-padded hidden_states[{k}]")


def test_scan_equals_unrolled_and_hidden_state_index(pair):
  name, _, _, model, scanned = pair
  n = model.config.num_hidden_layers
  ids, mask = _ids((10, 6, 12, 3), seed=3)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  full = _fwd(model, ids, mask)
  full_s = _fwd(scanned, ids, mask)
  for k in range(n + 1):
    _assert_close(full_s[k], full[k], f"{name} scanned vs unrolled hidden_states[{k}]", rel=5e-6)
  # only the selected state (only the layers it needs run), unrolled and scanned
  for m, k in ((model, -2), (scanned, -2)):
    np.testing.assert_allclose(_fwd(m, ids, mask, hidden_state_index=k), full[k], rtol=0,
                               atol=1e-5)
  with pytest.raises(IndexError):
    model(ids, mask, hidden_state_index=n + 1)
  # stacked params carry the leading "layers" logical axis and one row per layer
  flat = dict(core.param_paths(scanned))
  kernel = flat[("layers", "self_attn", "q_proj", "kernel")]
  assert kernel.shape[0] == n
  assert mesh_lib.variable_axes(kernel) == ("layers", "embed", "heads")


@pytest.mark.parametrize("pair", ["gqa"], indirect=True)
def test_gradients_remat_and_scan(pair):
  """Gradients of hidden state -2: scanned+remat == scanned == unrolled+remat (layer-stacked)."""
  name, _, _, model, scanned = pair
  ids, mask = _ids((12, 7, 3, 1), seed=4)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)

  @nnx.jit
  def grad(m):
    return nnx.grad(lambda m: jnp.sum(m(ids, mask, hidden_state_index=-2) ** 2))(m)

  def with_remat(m):
    m = nnx.merge(*nnx.split(m))
    m.remat = True
    return m

  g = dict(nnx.to_flat_state(grad(scanned)))
  g_remat = dict(nnx.to_flat_state(grad(with_remat(scanned))))
  g_unrolled = dict(nnx.to_flat_state(grad(with_remat(model))))
  n = model.config.num_hidden_layers
  for path, v in g.items():
    ref = v[...]
    if path[0] == "layers":
      unrolled = np.stack([g_unrolled[("layers", i) + path[1:]][...] for i in range(n)])
    else:
      unrolled = g_unrolled[path][...]
    for other, what in ((g_remat[path][...], "remat"), (unrolled, "unrolled")):
      abs_err, rel_err = _err(other, ref)  # summation order may differ, values must not
      assert rel_err < 1e-5, (path, what, abs_err, rel_err)
  assert float(np.abs(g[("embed_tokens", "weight")][...]).max()) > 0
  # the last layer is not used by hidden state -2: its gradient is exactly zero
  assert not np.asarray(g[("layers", "mlp", "down_proj", "kernel")][...][-1]).any()


def test_export_round_trip(pair, tmp_path):
  name, tm, _, model, scanned = pair
  ref = {k: v.numpy() for k, v in tm.state_dict().items()}
  for m in (model, scanned):
    exported = qwen3.export_qwen3(m)
    assert sorted(exported) == sorted(ref)
    for k in ref:
      np.testing.assert_array_equal(exported[k], ref[k], err_msg=k)
  folder = tmp_path / "rt"
  folder.mkdir()
  core.save_safetensors(qwen3.export_qwen3(scanned), str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(model.config.to_hf()))
  reloaded = qwen3.load_qwen3(str(folder))
  for (p1, v1), (p2, v2) in zip(core.param_paths(reloaded), core.param_paths(model)):
    assert p1 == p2
    np.testing.assert_array_equal(v1[...], v2[...])


def test_load_causal_lm_sharded_checkpoint(tmp_path):
  """A Qwen3ForCausalLM save ('model.' prefix, lm_head, several shards with an index) loads,
  also from a Z-Image style pipeline root (text_encoder/ sub-folder)."""
  tm = _torch_model("gqa", cls=transformers.Qwen3ForCausalLM, seed=5)
  folder = tmp_path / "text_encoder"
  tm.save_pretrained(str(folder), max_shard_size="40KB")
  names = os.listdir(folder)
  assert "model.safetensors.index.json" in names, names
  assert sum(n.endswith(".safetensors") for n in names) > 1
  for scan in (False, True):
    model = qwen3.load_qwen3(str(tmp_path), scan_layers=scan)
    exported = qwen3.export_qwen3(model, prefix="model.")
    ref = {k: v.numpy() for k, v in tm.state_dict().items() if not k.startswith("lm_head.")}
    assert sorted(exported) == sorted(ref)
    for k in ref:
      np.testing.assert_array_equal(exported[k], ref[k], err_msg=k)


def test_load_errors(pair, tmp_path):
  name, _, folder, _, _ = pair
  cfg = json.load(open(os.path.join(folder, "config.json")))
  bad = tmp_path / "bad"
  bad.mkdir()
  os.symlink(os.path.join(folder, "model.safetensors"), bad / "model.safetensors")
  wide = dict(cfg, intermediate_size=2 * cfg["intermediate_size"])
  (bad / "config.json").write_text(json.dumps(wide))
  with pytest.raises(core.ConversionError, match="mlp.down_proj.weight"):
    qwen3.load_qwen3(str(bad))
  (bad / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
  with pytest.raises(core.ConversionError, match="layers"):
    qwen3.load_qwen3(str(bad), scan_layers=True)
  with pytest.raises(core.ConversionError, match="not used"):
    qwen3.load_qwen3(str(bad))
  with pytest.raises(ValueError, match="linear"):
    qwen3.Qwen3Config.from_hf(dict(cfg, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                         "rope_theta": 1e4}))
  with pytest.raises(ValueError, match="yarn"):
    qwen3.Qwen3Config.from_hf({k: v for k, v in cfg.items() if k != "rope_parameters"}
                              | {"rope_theta": 1e6, "rope_scaling": {"type": "yarn"}})
  with pytest.raises(ValueError, match="sliding"):
    qwen3.Qwen3Config.from_hf(
        dict(cfg, layer_types=["sliding_attention"] * cfg["num_hidden_layers"]))
  legacy = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "head_dim")}
  legacy |= {"rope_theta": 5e6, "rope_scaling": None}
  parsed = qwen3.Qwen3Config.from_hf(legacy)
  assert parsed.rope_theta == 5e6
  assert parsed.head_dim == cfg["hidden_size"] // cfg["num_attention_heads"]


# ---------------------------------------------------------------------------------------------
# Z-Image prompt encoding


def test_encode_prompts_zimage_matches_pipeline(pair):
  from diffusers import ZImagePipeline
  name, tm, _, model, scanned = pair
  from didr_jax.testing.tiny_zimage import tiny_qwen_tokenizer
  tok = tiny_qwen_tokenizer()
  pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=tm, tokenizer=tok,
                        transformer=None)
  prompts = ["a red cat", "", "an astronaut riding a horse on the moon, oil painting"]
  max_length = 48  # the last prompt is longer (> 60 tokens): truncated like the pipeline
  with torch.no_grad():
    ref, _ = pipe.encode_prompt(list(prompts), device=torch.device("cpu"),
                                do_classifier_free_guidance=False, max_sequence_length=max_length)
  lengths = [r.shape[0] for r in ref]
  assert lengths[-1] == max_length and lengths[1] < lengths[0] < max_length
  for m in (model, scanned):
    embeds, mask = qwen3.encode_prompts_zimage(m, tok, prompts, max_length=max_length, bucket=32)
    assert embeds.shape == (3, 64, tm.config.hidden_size) and mask.shape == (3, 64)
    assert list(np.asarray(mask).sum(1)) == lengths
    embeds, mask = np.asarray(embeds), np.asarray(mask)
    assert not embeds[~mask].any()  # padding is zeroed
    for i, r in enumerate(ref):
      _assert_close(embeds[i][mask[i]], r.numpy(), f"{name} zimage prompt {i}")
  # a list of bucket lengths picks the smallest that fits
  ids, mask = qwen3.tokenize_prompts_zimage(tok, prompts[:2], max_length=max_length,
                                            bucket=(16, 32, 128))
  assert ids.shape == (2, 32) and list(mask.sum(1)) == lengths[:2]
  with pytest.raises(ValueError, match="bucket"):
    qwen3.tokenize_prompts_zimage(tok, prompts, max_length=max_length, bucket=(16, 32))


def test_sharded_forward_equals_single_device(pair):
  name, _, folder, model, scanned = pair
  mesh = mesh_lib.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  ids, mask = _ids((8, 5, 12, 2), seed=6)
  for single in (model, scanned):
    ref = _fwd(single, jnp.asarray(ids), jnp.asarray(mask))
    sharded = qwen3.load_qwen3(folder, scan_layers=single.scan_layers, shardings=mesh)
    flat = dict(core.param_paths(sharded))
    q = flat[(("layers", "self_attn", "q_proj", "kernel") if single.scan_layers
              else ("layers", 0, "self_attn", "q_proj", "kernel"))]
    assert q[...].sharding.spec != P() and len(q[...].sharding.device_set) == 8
    data = NamedSharding(mesh, P(("data", "fsdp")))
    out = _fwd(sharded, jax.device_put(ids, data), jax.device_put(mask, data))
    for k, (o, r) in enumerate(zip(out, ref)):
      _assert_close(o, r, f"{name} scan={single.scan_layers} sharded hidden_states[{k}]")


@pytest.mark.parametrize("pair", ["gqa"], indirect=True)
def test_bfloat16_load(pair):
  name, _, folder, model, _ = pair
  bf = qwen3.load_qwen3(folder, dtype=jnp.bfloat16)
  kernel = dict(core.param_paths(bf))[("layers", 0, "mlp", "up_proj", "kernel")]
  assert kernel.dtype == jnp.bfloat16
  ids, mask = _ids((7, 3, 12, 1), seed=7)
  out = _fwd(bf, jnp.asarray(ids), jnp.asarray(mask), hidden_state_index=-2)
  assert out.dtype == jnp.bfloat16
  ref = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))[-2]
  abs_err, rel_err = _err(np.asarray(out, np.float32)[mask], np.asarray(ref)[mask])
  print(f"{name} bf16 vs f32: max abs {abs_err:.2e}, rel {rel_err:.2e}")
  assert rel_err < 5e-2
