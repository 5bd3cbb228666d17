"""CLIP port: float32 parity with transformers on tiny random models, checkpoint round trips,
bf16 compute and sharded execution."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from jax.sharding import PartitionSpec as P

from didr_jax.convert import core
from didr_jax.models import clip
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing.tiny import randomize_torch

ERRORS: dict[str, tuple[float, float]] = {}

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4, num_channels=3, hidden_act="quick_gelu")


def _save(model, tmp_path_factory, name) -> str:
  folder = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(folder)
  return folder


def _close(name, ours, ref, tol=1e-4):
  """max |ours - ref| <= tol * max(1, max |ref|); records (max abs, relative) errors."""
  ours = np.asarray(jnp.asarray(ours, jnp.float32))
  ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
  assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
  err = float(np.max(np.abs(ours - ref)))
  scale = float(np.max(np.abs(ref)))
  ERRORS[name] = max(ERRORS.get(name, (0.0, 0.0)), (err, err / scale))
  assert err <= tol * max(1.0, scale), f"{name}: max abs err {err:.3g} (ref max {scale:.3g})"


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  for k, (a, r) in sorted(ERRORS.items()):
    print(f"\n  {k:40s} max abs {a:.2e}  rel {r:.2e}", end="")


def _text_ids(rng, b=3, t=12, vocab=64):
  return rng.integers(3, vocab, size=(b, t)).astype(np.int64)


@pytest.fixture(scope="module")
def legacy_text(tmp_path_factory):
  """quick_gelu, eos_token_id == 2: pooled at argmax(input_ids)."""
  cfg = tf.CLIPTextConfig(**TEXT, hidden_act="quick_gelu", eos_token_id=2)
  tm = randomize_torch(tf.CLIPTextModel(cfg), 0)
  return tm, _save(tm, tmp_path_factory, "legacy_text")


@pytest.fixture(scope="module")
def gelu_text(tmp_path_factory):
  """gelu, eos_token_id == 5: pooled at the first 5."""
  cfg = tf.CLIPTextConfig(**TEXT, hidden_act="gelu", eos_token_id=5)
  tm = randomize_torch(tf.CLIPTextModel(cfg), 1)
  return tm, _save(tm, tmp_path_factory, "gelu_text")


def _padded_batch(rng):
  """Right-padded rows ending in EOS=5: padded with pad id 1, or with EOS itself (SD
  tokenizers), so "first EOS" differs from "last EOS" and from argmax."""
  ids = rng.integers(6, 64, size=(4, 12)).astype(np.int64)
  mask = np.ones_like(ids)
  for row, (n, pad) in enumerate([(4, 1), (7, 5), (11, 1), (9, 5)]):
    ids[row, n] = 5
    ids[row, n + 1:] = pad
    mask[row, n + 1:] = 0
  return ids, mask


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
  cfg = tf.CLIPConfig(text_config=dict(TEXT, hidden_act="gelu", eos_token_id=5),
                      vision_config=VISION, projection_dim=24)
  tm = randomize_torch(tf.CLIPModel(cfg), 2)
  return tm, _save(tm, tmp_path_factory, "clip")


def _pixels(rng, b=2):
  return rng.standard_normal((b, 3, 16, 16)).astype(np.float32)  # NCHW for torch


def _check_text(prefix, ours, ref, n_layers=2):
  _close(f"{prefix}.last_hidden_state", ours.last_hidden_state, ref.last_hidden_state)
  _close(f"{prefix}.pooler_output", ours.pooler_output, ref.pooler_output)
  assert len(ours.hidden_states) == len(ref.hidden_states) == n_layers + 1
  for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
    _close(f"{prefix}.hidden_states", a, b)


def test_text_parity_legacy_eos(legacy_text, rng):
  tm, folder = legacy_text
  model = clip.load_clip(folder)
  assert type(model) is clip.CLIPTextModel and model.config.eos_token_id == 2
  ids = _text_ids(rng)
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids), output_hidden_states=True)
  ours = model(jnp.asarray(ids))
  _check_text("text_quick_gelu_eos2", ours, ref)
  np.testing.assert_array_equal(model.eos_positions(jnp.asarray(ids)), ids.argmax(-1))


def test_text_parity_eos_and_padding(gelu_text, rng):
  tm, folder = gelu_text
  model = clip.load_clip(folder)
  ids, mask = _padded_batch(rng)
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             output_hidden_states=True)
  ours = model(jnp.asarray(ids), jnp.asarray(mask))
  _check_text("text_gelu_eos5_padded", ours, ref)
  np.testing.assert_array_equal(model.eos_positions(jnp.asarray(ids)), [4, 7, 11, 9])
  # the mask matters: without it the padded positions change
  unmasked = model(jnp.asarray(ids)).last_hidden_state
  assert float(jnp.max(jnp.abs(unmasked - ours.last_hidden_state))) > 1e-3


def test_text_projection_parity(tmp_path_factory, rng):
  cfg = tf.CLIPTextConfig(**TEXT, hidden_act="quick_gelu", eos_token_id=7, projection_dim=24)
  tm = randomize_torch(tf.CLIPTextModelWithProjection(cfg), 3)
  model = clip.load_clip(_save(tm, tmp_path_factory, "text_proj"))
  assert type(model) is clip.CLIPTextModelWithProjection
  ids = _text_ids(rng, b=2)
  ids[0, 5], ids[1, 2] = 7, 7
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids), output_hidden_states=True)
  ours = model(jnp.asarray(ids))
  _close("text_projection.text_embeds", ours.text_embeds, ref.text_embeds)
  _close("text_projection.last_hidden_state", ours.last_hidden_state, ref.last_hidden_state)
  for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
    _close("text_projection.hidden_states", a, b)


def test_vision_projection_parity(tmp_path_factory, rng):
  tm = randomize_torch(tf.CLIPVisionModelWithProjection(
      tf.CLIPVisionConfig(**VISION, projection_dim=24)), 4)
  model = clip.load_clip(_save(tm, tmp_path_factory, "vision_proj"))
  assert type(model) is clip.CLIPVisionModelWithProjection
  px = _pixels(rng)
  with torch.no_grad():
    ref = tm(torch.from_numpy(px), output_hidden_states=True)
  ours = model(jnp.asarray(px.transpose(0, 2, 3, 1)))
  _close("vision.image_embeds", ours.image_embeds, ref.image_embeds)
  _close("vision.last_hidden_state", ours.last_hidden_state, ref.last_hidden_state)
  _close("vision.pooler_output", ours.pooler_output,
         tm.vision_model.post_layernorm(ref.last_hidden_state[:, 0]))
  for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
    _close("vision.hidden_states", a, b)
  with pytest.raises(ValueError, match="does not match"):
    model(jnp.zeros((1, 8, 8, 3)))


def test_clip_model_features(clip_pair, rng):
  tm, folder = clip_pair
  model = clip.load_clip(folder)
  assert type(model) is clip.CLIPModel
  ids, mask = _padded_batch(rng)
  px = _pixels(rng, b=3)
  tids, tmask, tpx = (torch.from_numpy(a) for a in (ids, mask, px))
  with torch.no_grad():
    ref_t = tm.get_text_features(tids, attention_mask=tmask)
    ref_i = tm.get_image_features(tpx)
    ref = tm(input_ids=tids, pixel_values=tpx, attention_mask=tmask)
  ref_t = getattr(ref_t, "pooler_output", ref_t)  # transformers 5 returns an output object
  ref_i = getattr(ref_i, "pooler_output", ref_i)
  nhwc = jnp.asarray(px.transpose(0, 2, 3, 1))
  _close("clip.text_features", model.get_text_features(jnp.asarray(ids), jnp.asarray(mask)),
         ref_t)
  _close("clip.image_features", model.get_image_features(nhwc), ref_i)
  out = model(jnp.asarray(ids), nhwc, jnp.asarray(mask))
  _close("clip.logits_per_image", out.logits_per_image, ref.logits_per_image)
  _close("clip.text_embeds", out.text_embeds, ref.text_embeds)
  # one tower (with its projection) read out of the full CLIPModel checkpoint
  vis = clip.load_clip(folder, cls=clip.CLIPVisionModelWithProjection)
  np.testing.assert_allclose(vis(nhwc).image_embeds, model.get_image_features(nhwc),
                             rtol=1e-6, atol=1e-6)


def test_load_text_model_prefixed_keys(legacy_text, tmp_path, rng):
  """Old / SD-style checkpoints: CLIPTextModel keys under ``text_model.`` (+ position_ids)."""
  tm, folder = legacy_text
  tensors = {"text_model." + k: v.numpy() for k, v in tm.state_dict().items()}
  tensors["text_model.embeddings.position_ids"] = np.arange(16)[None]
  assert "text_model.embeddings.token_embedding.weight" in tensors
  core.save_safetensors(tensors, str(tmp_path / "model.safetensors"))
  with open(os.path.join(folder, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  model = clip.load_clip(str(tmp_path))
  flat = clip.load_clip(folder)
  ids = jnp.asarray(_text_ids(rng))
  np.testing.assert_array_equal(model(ids).pooler_output, flat(ids).pooler_output)
  with torch.no_grad():
    ref = tm(torch.from_numpy(np.array(ids)))
  _close("text_prefixed.pooler_output", model(ids).pooler_output, ref.pooler_output)


def test_wrong_shape_names_tensor_and_shapes(legacy_text, tmp_path):
  tm, folder = legacy_text
  tensors = {k: v.numpy() for k, v in tm.state_dict().items()}
  tensors["encoder.layers.1.mlp.fc1.weight"] = np.zeros((60, 32), np.float32)
  core.save_safetensors(tensors, str(tmp_path / "model.safetensors"))
  with open(os.path.join(folder, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(core.ConversionError) as e:
    clip.load_clip(str(tmp_path))
  msg = str(e.value)
  assert "encoder.layers.1.mlp.fc1.weight" in msg and "(60, 32)" in msg and "(64, 32)" in msg


def test_export_roundtrip(clip_pair, gelu_text, tmp_path, rng):
  ids, mask = _padded_batch(rng)
  tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
  px = torch.from_numpy(_pixels(rng))
  # CLIPModel: export -> fresh torch model, strict load -> identical outputs
  tm, folder = clip_pair
  sd = clip.export_clip(clip.load_clip(folder))
  fresh = tf.CLIPModel(tm.config).eval()
  assert set(sd) == set(fresh.state_dict())
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                        strict=True)
  with torch.no_grad():
    a = fresh(input_ids=tids, pixel_values=px, attention_mask=tmask).logits_per_image
    b = tm(input_ids=tids, pixel_values=px, attention_mask=tmask).logits_per_image
  torch.testing.assert_close(a, b, rtol=0, atol=0)
  # CLIPTextModel exports transformers 5.23's flat keys; save_clip -> from_pretrained works
  tm, folder = gelu_text
  model = clip.load_clip(folder)
  sd = clip.export_clip(model)
  assert "embeddings.token_embedding.weight" in sd and not any(k.startswith("text_model.")
                                                                for k in sd)
  clip.save_clip(model, str(tmp_path / "text"))
  back = tf.CLIPTextModel.from_pretrained(str(tmp_path / "text")).eval()
  with torch.no_grad():
    a = back(tids, attention_mask=tmask).pooler_output
    b = tm(tids, attention_mask=tmask).pooler_output
  torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_compute_close_to_fp32(clip_pair, rng):
  _, folder = clip_pair
  f32 = clip.load_clip(folder)
  bf16 = clip.load_clip(folder, dtype=jnp.bfloat16)
  dtypes = {v.dtype for _, v in core.param_paths(bf16)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  ids, mask = (jnp.asarray(a) for a in _padded_batch(rng))
  px = jnp.asarray(_pixels(rng).transpose(0, 2, 3, 1))
  # jitted: one compile per dtype instead of eager op-by-op bf16 dispatch
  feats = nnx.jit(lambda m: {"text": m.get_text_features(ids, mask),
                             "image": m.get_image_features(px)})
  lo_all, hi_all = feats(bf16), feats(f32)
  for name in ("text", "image"):
    lo, hi = lo_all[name], hi_all[name]
    assert lo.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(lo)))
    lo = np.asarray(lo.astype(jnp.float32))
    err = float(np.max(np.abs(lo - np.asarray(hi))))
    ERRORS[f"bf16_vs_fp32.{name}_features"] = (err, err / float(np.max(np.abs(hi))))
    assert err <= 5e-2 * float(np.max(np.abs(hi))), (name, err)


def test_sharded_text_equals_unsharded(gelu_text, rng):
  _, folder = gelu_text
  model = clip.load_clip(folder)
  ids, mask = (jnp.asarray(a) for a in _padded_batch(rng))
  fwd = nnx.jit(lambda m, i, k: m(i, k))
  ref = fwd(model, ids, mask)
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  sharded = mesh_lib.shard_module(clip.load_clip(folder), mesh)
  fc1 = sharded.encoder.layers[0].mlp.fc1.kernel[...]
  assert fc1.sharding.spec == P("fsdp", "tensor")
  bs = mesh_lib.batch_sharding(mesh, 2, batch_size=ids.shape[0])
  out = fwd(sharded, jax.device_put(ids, bs), jax.device_put(mask, bs))
  for name in ("last_hidden_state", "pooler_output"):
    a, b = getattr(out, name), getattr(ref, name)
    err = float(jnp.max(jnp.abs(a - b)))
    ERRORS[f"sharded_vs_single.{name}"] = (err, err / float(jnp.max(jnp.abs(b))))
    assert err <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))), (name, err)


def test_configs_from_hf_and_rejections():
  d = tf.CLIPConfig(text_config=dict(TEXT, eos_token_id=5), vision_config=VISION,
                    projection_dim=24).to_dict()
  cfg = clip.CLIPConfig.from_hf(d)
  assert cfg.projection_dim == 24 and cfg.text_config.eos_token_id == 5
  assert cfg.vision_config.num_patches == 16
  assert clip.CLIPTextConfig.from_hf(d) == cfg.text_config  # the nested text part
  with pytest.raises(ValueError, match="unknown activation"):
    clip.CLIPTextConfig.from_hf(dict(TEXT, hidden_act="swiglu_x"))
  with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
    clip.CLIPTextConfig.from_hf(dict(TEXT, num_attention_heads=5))
  with pytest.raises(ValueError, match="non-square"):
    clip.CLIPVisionConfig.from_hf(dict(VISION, image_size=[16, 32]))
  with pytest.raises(ValueError, match="not a CLIP"):
    clip.CLIPTextConfig.from_hf(dict(TEXT, model_type="siglip_text_model"))
  with pytest.raises(ValueError, match="several eos_token_id"):
    clip.CLIPTextConfig.from_hf(dict(TEXT, eos_token_id=[2, 3]))
