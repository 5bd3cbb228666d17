"""The shipped toy checkpoints (``didr_jax/toy/assets``): small, loadable by the PyTorch
libraries they claim the format of (same outputs as our modules), tokenizers that keep every
toy word whole, base models that already draw the shapes world, and the embedded toy configs
running one DDPO epoch on each base."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from didr_jax.parallel import mesh as mesh_lib
from didr_jax.testing.configs import load_config
from didr_jax.toy import detector, pretrain, shapes
from didr_jax.train import loop

ASSETS = loop.TOY_ASSETS


def test_assets_are_small():
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS) for f in fs)
  # 12.5 MB today: toy UNet 4.0, toy DiT 3.2, 4-step TDM student 2.0, one-step generator 2.0
  # (both bfloat16 UNet-only folders), toy CLIP 0.8
  assert total < 13e6, f"shipped toy assets are {total / 1e6:.1f} MB"


def test_qwen_tokenizer_keeps_toy_words_whole():
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "toy_dit", "tokenizer"))
  for w in pretrain.words():
    assert len(tok(w).input_ids) == 1 and len(tok(" " + w).input_ids) == 1, w
  prompt = "two red circles and a blue square"
  assert len(tok(prompt).input_ids) == len(prompt.split())
  text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                 add_generation_prompt=True, enable_thinking=True)
  assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
  assert len(tok(text).input_ids) <= pretrain.DIT_CAPTION_LENGTH
  # anything else still tokenizes, byte by byte
  assert tok.decode(tok("a purple zebra!").input_ids) == "a purple zebra!"


def test_toy_dit_matches_the_pytorch_modules():
  """The shipped DiT and text encoder are real diffusers / transformers checkpoints: the torch
  modules loaded from them give our outputs."""
  from diffusers import ZImageTransformer2DModel
  from transformers import Qwen3Model
  from didr_jax.pipelines import registry
  folder = os.path.join(ASSETS, "toy_dit")
  pipe = registry.load_pipeline(folder)
  ids = pipe.tokenizer(["<|im_start|>user\nthree green triangles<|im_end|>"],
                       return_tensors="np").input_ids
  ours_h = np.asarray(pipe.text_encoder(jnp.asarray(ids), None, hidden_state_index=-2))
  te = Qwen3Model.from_pretrained(os.path.join(folder, "text_encoder")).eval()
  with torch.no_grad():
    ref_h = te(torch.from_numpy(ids.astype(np.int64)),
               output_hidden_states=True).hidden_states[-2].numpy()
  np.testing.assert_allclose(ours_h, ref_h, rtol=1e-4, atol=1e-4 * np.abs(ref_h).max())

  tr = ZImageTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  cap = rng.standard_normal((2, 16, ours_h.shape[-1])).astype(np.float32)
  t = np.array([0.3, 0.8], np.float32)
  ours = np.asarray(pipe.transformer(jnp.asarray(x), jnp.asarray(t), jnp.asarray(cap),
                                     jnp.ones((2, 16), bool)))
  with torch.no_grad():
    ref = tr([torch.from_numpy(xi.transpose(2, 0, 1)[:, None]) for xi in x],
             torch.from_numpy(t), [torch.from_numpy(c) for c in cap],
             patch_size=tr.config.all_patch_size[0], f_patch_size=1, return_dict=False)[0]
  ref = np.stack([r[:, 0].numpy().transpose(1, 2, 0) for r in ref])
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_toy_dit_samples_like_diffusers_zimage_pipeline():
  """diffusers' own ZImagePipeline runs the shipped folder (no VAE: output_type "latent" gives
  the pixels) and its Euler sampling with CFG equals ours from the same initial noise."""
  from didr_jax.pipelines import registry
  from didr_jax.testing import tiny_zimage
  folder = os.path.join(ASSETS, "toy_dit")
  pipe = registry.load_pipeline(folder)
  prompts = ["two red circles", "a blue square and a yellow triangle"]
  noise = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ours, _ = pipe.sample(prompts, num_steps=6, guidance_scale=3.0, latents=noise)
  ref_images = tiny_zimage.diffusers_pixel_sampler(folder)(prompts, noise, 6, 3.0)
  np.testing.assert_allclose(np.asarray(ours), ref_images, atol=2e-4)
  assert np.asarray(ours).std() > 0.1  # an image, not a constant


@pytest.mark.parametrize("name", ["toy_ddpo", "toy_ddpo_dit"])
def test_base_draws_the_shapes_world_and_one_epoch_runs(name, tmp_path):
  """The base model's samples already score on the detector (random images score ~0), and the
  embedded config runs a (shrunk) DDPO epoch on it."""
  c = load_config(name, **{"sample.batch_size": 16, "sample.num_batches": 1,
                           "train.batch_size": 16, "num_epochs": 1, "eval.num_samples": 0,
                           "log_images": 4, "async_checkpoint": False})
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = trainer.init_state()
  prompts = list(shapes.train_prompts()[:64])
  _, images, _, _ = trainer.sample(trainer.policy_params(state), prompts, jax.random.key(0))
  score = float(detector.batch_score(np.asarray(images), prompts).mean())
  assert score > 0.05, f"{name} base scores {score:.3f} on the detector"
  metrics = loop.train(c, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["reward_mean"] <= 1.0


def test_dit_pretraining_writes_a_loadable_pipeline(tmp_path):
  """The regenerating command's DiT stage (two steps): loss finite, the folder loads back as a
  pixel-space Z-Image pipeline with the shipped layout."""
  from didr_jax.pipelines import registry
  pretrain.train_dit(str(tmp_path), steps=2, batch=4, seed=3)
  pipe = registry.load_pipeline(str(tmp_path / "toy_dit"))
  assert pipe.kind == "zimage" and pipe.vae is None
  assert (pipe.resolution, pipe.caption_length) == (32, pretrain.DIT_CAPTION_LENGTH)
  shipped = sorted(os.listdir(os.path.join(ASSETS, "toy_dit")))
  assert sorted(os.listdir(tmp_path / "toy_dit")) == shipped


def test_dit_pretraining_continues_from_a_folder(tmp_path):
  """``--dit_init``: the stage starts from the shipped base, not a random init (two tiny steps
  leave the EMA weights within 1e-4 of it; a random init is ~0.1 away)."""
  from didr_jax.convert import core
  shipped = os.path.join(ASSETS, "toy_dit")
  pretrain.train_dit(str(tmp_path), steps=2, batch=4, seed=3, lr=1e-6, init=shipped)
  for sub in ("transformer", "text_encoder"):
    a = core.open_weights(os.path.join(shipped, sub))
    b = core.open_weights(os.path.join(tmp_path, "toy_dit", sub))
    assert sorted(a) == sorted(b)
    err = max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)
    assert err < 1e-4, f"{sub} moved {err:.2e} from the folder it continued"


def test_shipped_onestep_generator_loads_and_draws():
  """``toy_onestep`` (the DI-distilled one-step toy generator, a bfloat16 diffusers UNet folder;
  the start of ``configs/toy_didr.py``) loads against the toy UNet reference, one network call
  gives finite, non-constant 32 x 32 RGB images in [0, 1], and on the 72 held-out prompts x 2
  noise draws (the same for both) they score higher on the detector than the undistilled teacher
  read as a one-step generator (measured on 256 samples: 0.071 vs 0.011)."""
  from didr_jax.convert import core
  from didr_jax.train.didr import DIDRTrainer
  folder = os.path.join(ASSETS, "toy_onestep")
  weights = core.open_weights(folder)
  assert {str(np.asarray(weights[k]).dtype) for k in weights} == {"bfloat16"}
  c = load_config("toy_didr", **{"sample.batch_size": 4, "train.batch_size": 4,
                                 "didr.generator_path": folder})
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = DIDRTrainer(c, loop.build_backbone(c, mesh), mesh)
  state = trainer.init_state()
  prompts = ["two red circles", "a blue square and a yellow triangle"]
  _, images, _, _ = trainer.sample(trainer.policy_params(state), prompts, jax.random.key(0))
  images = np.asarray(images)
  assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
  assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.05
  _, teacher, _, _ = trainer.sample(trainer.ref_params, prompts, jax.random.key(0))
  assert np.abs(images - np.asarray(teacher)).mean() > 1e-2
  score = _heldout_detector(trainer, {"generator": trainer.policy_params(state),
                                      "teacher": trainer.ref_params}, draws=2)
  assert score["generator"] > score["teacher"] + 0.02, score


def _heldout_detector(trainer, models: dict, draws: int) -> dict:
  """Mean detector score of each model's samples on the held-out prompts x ``draws`` noise
  draws (the same noise for every model)."""
  prompts = list(shapes.heldout_prompts())
  score = {}
  for name, params in models.items():
    images = [trainer.sample(params, prompts, jax.random.key(seed))[1] for seed in range(draws)]
    score[name] = float(np.mean([detector.batch_score(np.asarray(im), prompts).mean()
                                 for im in images]))
  return score


def test_shipped_tdm_student_beats_the_teacher_read_in_four_steps():
  """``toy_tdm`` (the 4-step TDM student, a bfloat16 UNet component folder; what
  ``configs/toy_tdmr1.py`` starts from) loads, and on the 72 held-out prompts x 4 noise draws
  (the same for both) its 4-step samples score higher on the non-differentiable detector than
  the undistilled teacher read with the same 4-step deterministic sampler (measured 0.054 vs
  0.039; one draw of 72 alone flips the order in 1 of these 4 draws, hence 288 samples)."""
  from didr_jax.convert import core
  from didr_jax.train.tdm import TDMTrainer
  folder = os.path.join(ASSETS, "toy_tdm")
  weights = core.open_weights(folder)
  assert {str(np.asarray(weights[k]).dtype) for k in weights} == {"bfloat16"}
  c = load_config("toy_tdm", **{"tdm.generator_path": folder})
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = TDMTrainer(c, loop.build_backbone(c, mesh), mesh)
  state = trainer.init_state()
  score = _heldout_detector(trainer, {"student": trainer.policy_params(state),
                                      "teacher": trainer.ref_params}, draws=4)
  assert score["student"] > score["teacher"] + 0.005, score
