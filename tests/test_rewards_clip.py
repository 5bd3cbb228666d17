"""PickScore and the LAION aesthetic predictor: float32 parity of the score and of its gradient
w.r.t. the images against PyTorch (transformers CLIPModel + torch preprocessing, the MLP as a
torch nn.Sequential) on tiny random weights; jit, registry, conversion and error lines."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from flax import nnx

from didr_jax import rewards
from didr_jax.convert import aesthetic as aesthetic_convert
from didr_jax.convert import core
from didr_jax.rewards import clip_rewards as cr
from didr_jax.testing import tiny
from didr_jax.toy import toy_clip
from didr_jax.toy.tokenizer import write_clip_tokenizer
from didr_jax.errors import ConfigError

PROMPTS = ["a red cat", "two blue squares", "a photo of a dog"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # distinct from the defaults: the config is read


def _write_prep(folder, mean=MEAN, std=STD, resample=3):
  import json
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump({"image_mean": list(mean), "image_std": list(std), "resample": resample}, f)


@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory):
  """A tiny random CLIPModel (PickScore's architecture) with its tokenizer and processor."""
  folder = str(tmp_path_factory.mktemp("pickscore"))
  tm = tiny.save_tiny_pickscore(folder, words=("red", "blue", "cat", "dog"))
  _write_prep(folder)
  return tm, folder


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
  """A tiny ViT with the real 768-d projection and the published MLP layout; the MLP also as
  a pickled .pth (nested as Lightning saves it) converted to safetensors by our converter."""
  root = tmp_path_factory.mktemp("aesthetic")
  vm, head = tiny.save_tiny_aesthetic(str(root))
  folder = os.path.join(str(root), "clip")
  _write_prep(folder)
  pth, st = str(root / "mlp.pth"), str(root / "converted.safetensors")
  torch.save({"state_dict": head.state_dict()}, pth)
  assert aesthetic_convert.main([pth, st]) == 0
  written = core.SafetensorsFile(str(root / "mlp.safetensors"))
  for k, v in core.SafetensorsFile(st).items():
    np.testing.assert_array_equal(v, written[k])
  return vm, head, folder, pth, st


def _images(seed, b=3, h=32, w=32):
  return np.random.default_rng(seed).random((b, h, w, 3)).astype(np.float32)


def _torch_preprocess(x, n, mean=MEAN, std=STD, mode="bicubic"):
  """Independent reference: NHWC [0, 1] -> short side to n (torch antialiased resize) ->
  centred n x n crop -> per-channel normalisation (NCHW out)."""
  h, w = x.shape[1:3]
  x = x.permute(0, 3, 1, 2)
  if (h, w) != (n, n):
    nh, nw = (n, int(n * w / h)) if h <= w else (int(n * h / w), n)
    x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
    x = x[:, :, (nh - n) // 2:(nh - n) // 2 + n, (nw - n) // 2:(nw - n) // 2 + n]
  return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _feats(out):
  return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  for k, v in sorted(ERRORS.items()):
    print(f"\n  {k:32s} max abs err / bound {v:.2e}", end="")


def _close(ours, ref, tol=1e-4, name=None, rel=False):
  """max |ours - ref| <= tol * max(1, max |ref|), or tol * max |ref| with ``rel`` (gradients,
  whose entries are small)."""
  ours = np.asarray(ours, np.float32)
  ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err = float(np.max(np.abs(ours - ref)))
  scale = float(np.max(np.abs(ref)))
  bound = scale if rel else max(1.0, scale)
  if name:
    ERRORS[name] = max(ERRORS.get(name, 0.0), err / bound)
  assert scale > 0 and err <= tol * bound, f"max abs err {err:.3g} (ref max {scale:.3g})"


@pytest.mark.parametrize("shape,size,method", [((2, 32, 32), 16, "bicubic"),
                                               ((2, 40, 28), 16, "bilinear"),
                                               ((2, 20, 36), 16, "bicubic"),
                                               ((2, 12, 12), 16, "bicubic")])
def test_preprocess_matches_torch(shape, size, method):
  """Shrink by 2, non-integer shrink + crop (tall, wide), enlarge: values and vjp match torch."""
  x = _images(0, *shape)
  prep = cr.ImagePrep(size, MEAN, STD, method)
  ours = jax.jit(cr.preprocess, static_argnums=1)(jnp.asarray(x), prep)
  xt = torch.from_numpy(x).requires_grad_(True)
  ref = _torch_preprocess(xt, size, mode=method)
  _close(ours, ref.permute(0, 2, 3, 1), 1e-5, "preprocess")
  cot = np.random.default_rng(1).standard_normal(ours.shape).astype(np.float32)
  (ref * torch.from_numpy(cot).permute(0, 3, 1, 2)).sum().backward()
  g = jax.grad(lambda a: jnp.sum(cr.preprocess(a, prep) * cot))(jnp.asarray(x))
  _close(g, xt.grad, 1e-5, "preprocess.vjp", rel=True)


@pytest.mark.parametrize("h,w", [(32, 32), (40, 28), (20, 36)])
def test_preprocess_matches_clip_image_processor(h, w):
  """transformers' CLIPImageProcessor (PIL, uint8) on the same uint8 images: equal up to its
  rounding to uint8 in each of PIL's two resampling passes (<= ~1.05 levels, one level =
  1 / (255 std) in normalised units). Smooth images inside (0, 1): PIL also clips the bicubic
  overshoot to [0, 255] between its passes, which full-range noise would hit."""
  proc = tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
  coarse = jnp.asarray(np.random.default_rng(7).random((2, h // 4, w // 4, 3)), jnp.float32)
  smooth = 0.15 + 0.7 * np.asarray(jax.image.resize(coarse, (2, h, w, 3), "linear"))
  u8 = np.round(smooth * 255).astype(np.uint8)
  ref = proc(images=list(u8), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
  ours = cr.preprocess(jnp.asarray(u8 / 255.0, jnp.float32), cr.ImagePrep(16))
  level = 1.0 / (255.0 * min(cr.OPENAI_CLIP_STD))
  err = float(np.max(np.abs(np.asarray(ours) - ref)))
  ERRORS[f"vs_CLIPImageProcessor_{h}x{w}"] = err / level
  assert err <= 1.1 * level, (err, level)


def test_prep_from_folder(pickscore_folder, tmp_path):
  _, folder = pickscore_folder
  assert cr.ImagePrep.from_folder(16, None, folder) == cr.ImagePrep(16, MEAN, STD, "bicubic")
  assert cr.ImagePrep.from_folder(16, str(tmp_path)) == cr.ImagePrep(16)  # OpenAI defaults
  _write_prep(str(tmp_path), resample=0)
  with pytest.raises(ValueError, match="resample=0"):
    cr.ImagePrep.from_folder(16, str(tmp_path))


def test_pickscore_parity_and_gradient(pickscore_folder):
  tm, folder = pickscore_folder
  reward = rewards.make("pickscore", folder=folder)
  assert reward.differentiable
  x = _images(2)
  # torch reference: tokenizer -> text features; torch preprocessing -> image features
  tok = tf.AutoTokenizer.from_pretrained(folder)(PROMPTS, padding="max_length", max_length=16,
                                                 truncation=True, return_tensors="pt")
  xt = torch.from_numpy(x).requires_grad_(True)
  t_emb = _feats(tm.get_text_features(input_ids=tok.input_ids,
                                      attention_mask=tok.attention_mask))
  i_emb = _feats(tm.get_image_features(pixel_values=_torch_preprocess(xt, 16)))
  t_emb = t_emb / t_emb.norm(dim=-1, keepdim=True)
  i_emb = i_emb / i_emb.norm(dim=-1, keepdim=True)
  ref = tm.logit_scale.exp() * (i_emb * t_emb).sum(-1)
  ref.sum().backward()
  # host reward (numpy in / out)
  host = reward(x, PROMPTS)
  _close(host, ref, name="pickscore")
  assert float(np.ptp(host)) > 1e-3  # the three pairs score differently: a real comparison
  # the pure, jitted function and its gradient w.r.t. the images
  te = reward.prompt_features(PROMPTS)
  _close(te, t_emb, name="pickscore.text_embeds")
  # the registry's pure function, jitted with the module as an argument, and its gradient
  val, grad = nnx.jit(nnx.value_and_grad(lambda a, m, t: jnp.sum(reward.jax_fn(m, a, t))))(
      jnp.asarray(x), reward.module, te)
  _close(val, ref.sum())
  assert bool(jnp.all(jnp.isfinite(grad)))
  _close(grad, xt.grad, 1e-4, "pickscore.grad", rel=True)


def test_aesthetic_parity_and_gradient(aesthetic_files):
  vm, head, folder, pth, st = aesthetic_files
  reward = rewards.make("aesthetic", clip=folder, mlp=st)
  x = _images(3, b=4)
  xt = torch.from_numpy(x).requires_grad_(True)
  emb = vm(pixel_values=_torch_preprocess(xt, 16)).image_embeds
  ref = head.layers(emb / emb.norm(dim=-1, keepdim=True))[:, 0]
  ref.sum().backward()
  host = reward(x, [""] * 4)
  _close(host, ref, name="aesthetic")
  assert float(np.ptp(host)) > 1e-4
  assert reward.prompt_features is None
  grad = nnx.jit(nnx.grad(lambda a, m: jnp.sum(reward.jax_fn(m, a, None))))(jnp.asarray(x),
                                                                             reward.module)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 1e-6
  _close(grad, xt.grad, 1e-4, "aesthetic.grad", rel=True)
  # the MLP alone, with dropout layers present in the torch module (eval mode: identity)
  e = np.random.default_rng(4).standard_normal((5, 768)).astype(np.float32)
  _close(reward.module.mlp(jnp.asarray(e)), head.layers(torch.from_numpy(e)), name="aesthetic.mlp")


def test_weighted_sum_of_both(pickscore_folder, aesthetic_files):
  """from_config with per-reward options: host and jax paths agree with the parts."""
  _, ps_folder = pickscore_folder
  _, _, ae_folder, _, st = aesthetic_files
  r = rewards.from_config({"pickscore": 1.0, "aesthetic": 0.5},
                          pickscore={"folder": ps_folder}, aesthetic={"clip": ae_folder,
                                                                       "mlp": st})
  assert r.differentiable
  ps, ae = rewards.make("pickscore", folder=ps_folder), rewards.make(
      "aesthetic", clip=ae_folder, mlp=st)
  x = _images(5)
  want = ps(x, PROMPTS) + 0.5 * ae(x, PROMPTS)
  np.testing.assert_allclose(r(x, PROMPTS), want, rtol=1e-5, atol=1e-5)
  feats = r.prompt_features(PROMPTS)
  assert feats[1] is None and feats[0].shape == (3, 24)
  np.testing.assert_allclose(nnx.jit(r.jax_fn)(r.module, jnp.asarray(x), feats), want,
                             rtol=1e-5, atol=1e-5)


def test_env_paths_and_error_lines(pickscore_folder, aesthetic_files, monkeypatch, tmp_path):
  _, ps_folder = pickscore_folder
  _, _, ae_folder, pth, st = aesthetic_files
  monkeypatch.delenv("DIDR_PICKSCORE", raising=False)
  with pytest.raises(ConfigError, match=r"^rewards.pickscore: no folder given.*DIDR_PICKSCORE"):
    rewards.make("pickscore")
  monkeypatch.setenv("DIDR_PICKSCORE", ps_folder)
  assert rewards.make("pickscore").module is rewards.make("pickscore", folder=ps_folder).module
  with pytest.raises(ConfigError, match="rewards.pickscore: folder .* is not a folder"):
    rewards.make("pickscore", folder=str(tmp_path))
  with pytest.raises(ConfigError, match="rewards.pickscore: dtype 'fp8' must be"):
    rewards.make("pickscore", dtype="fp8")
  monkeypatch.setenv("DIDR_AESTHETIC_CLIP", ae_folder)
  monkeypatch.delenv("DIDR_AESTHETIC_MLP", raising=False)
  with pytest.raises(ConfigError, match="rewards.aesthetic: no mlp given"):
    rewards.make("aesthetic")
  # the pickled file is refused at run time, with the conversion command
  with pytest.raises(ConfigError, match="rewards.aesthetic: .*python -m didr_jax.convert.aes"):
    rewards.make("aesthetic", mlp=pth)
  # a head of another input size than the CLIP's projection names the tensor and both shapes
  bad = {k: np.asarray(v) for k, v in core.SafetensorsFile(st).items()}
  bad["layers.0.weight"] = np.zeros((1024, 512), np.float32)
  core.save_safetensors(bad, str(tmp_path / "mlp512.safetensors"))
  with pytest.raises(ConfigError, match=r"layers.0.weight: .* \(1024, 512\), .* \(1024, 768\)"):
    rewards.make("aesthetic", mlp=str(tmp_path / "mlp512.safetensors"))
  # a CLIP folder without a tokenizer: one line, not a traceback
  tm_folder = str(tmp_path / "no_tok")
  os.makedirs(tm_folder)
  for f in ("config.json", "model.safetensors"):
    os.link(os.path.join(ps_folder, f), os.path.join(tm_folder, f))
  with pytest.raises(ConfigError, match="rewards.pickscore: no tokenizer .* in .*no_tok"):
    rewards.make("pickscore", folder=tm_folder)
  # a tokenizer with more tokens than the text model's table (ids would be clamped silently)
  write_clip_tokenizer(str(tmp_path / "big_tok"), ("red", "blue", "cat", "dog", "zebra"))
  with pytest.raises(ConfigError, match="more than the text model's vocab_size"):
    rewards.make("pickscore", folder=ps_folder, tokenizer=str(tmp_path / "big_tok"))
  # the converter refuses a state dict that is not the predictor's, in one line
  torch.save({"w": torch.zeros(2)}, str(tmp_path / "bad.pth"))
  assert aesthetic_convert.main([str(tmp_path / "bad.pth"), str(tmp_path / "o.st")]) == 1


@pytest.mark.skipif(not toy_clip.available(), reason="toy CLIP asset not built")
def test_toy_clip_shares_preprocessing():
  """The toy CLIP reward resizes inside jit with the shared preprocessing: an image twice the
  CLIP's size scores as its bilinear downsample mapped to [-1, 1] (the pretraining range), and
  its gradient w.r.t. the full-size image flows."""
  from didr_jax.models.clip import l2_normalize
  reward = rewards.make("toy_clip")
  m = toy_clip.load()
  n = m.model.config.vision_config.image_size
  ids = m.ids(["a red circle", "two blue squares"])
  x = jnp.asarray(_images(6, b=2, h=2 * n, w=2 * n))

  @nnx.jit
  def want(mod, a):
    img = l2_normalize(mod.get_image_features(
        jax.image.resize(a, (2, n, n, 3), "bilinear") * 2.0 - 1.0))
    txt = l2_normalize(mod.get_text_features(ids))
    return jnp.exp(mod.logit_scale[...]) * jnp.sum(img * txt, -1)

  assert reward.module is m.model
  np.testing.assert_array_equal(reward.prompt_features(["a red circle", "two blue squares"]), ids)
  val, grad = nnx.jit(nnx.value_and_grad(lambda a, mod: jnp.sum(reward.jax_fn(mod, a, ids))))(
      x, reward.module)
  _close(val, jnp.sum(want(m.model, x)), 1e-5, "toy_clip")
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.max(jnp.abs(grad))) > 0


def test_pickscore_sharded_equals_single_device(pickscore_folder):
  """Module sharded by its logical axes (data x fsdp x tensor on 8 CPU devices), images split
  over the batch: score and image gradient equal the single-device ones; bfloat16 compute
  stays close to float32."""
  from didr_jax.models import clip
  from didr_jax.parallel import mesh as mesh_lib
  _, folder = pickscore_folder
  reward = rewards.make("pickscore", folder=folder)
  x = jnp.asarray(_images(8, b=4))
  te = reward.prompt_features(PROMPTS + ["a cat"])
  step = nnx.jit(nnx.value_and_grad(lambda a, m, t: jnp.sum(reward.jax_fn(m, a, t) ** 2)))
  ref_val, ref_grad = step(x, reward.module, te)
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  sharded = mesh_lib.shard_module(clip.load_clip(folder, clip.CLIPModel), mesh)
  bs = mesh_lib.batch_sharding(mesh, 4, batch_size=4)
  val, grad = step(jax.device_put(x, bs), sharded,
                   jax.device_put(te, mesh_lib.batch_sharding(mesh, 2, batch_size=4)))
  assert len(grad.sharding.device_set) == 8
  _close(val, ref_val, 1e-5, "sharded_vs_single.value")
  _close(grad, ref_grad, 1e-5, "sharded_vs_single.grad", rel=True)
  bf16 = rewards.make("pickscore", folder=folder, dtype="bfloat16")
  score = nnx.jit(reward.jax_fn)  # one compile per module dtype
  lo, hi = np.asarray(score(bf16.module, x, te)), np.asarray(score(reward.module, x, te))
  ERRORS["bf16_vs_fp32.score"] = float(np.max(np.abs(lo - hi)) / np.max(np.abs(hi)))
  assert np.max(np.abs(lo - hi)) <= 5e-2 * np.max(np.abs(hi))
