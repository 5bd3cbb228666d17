"""The shipped toy CLIP: a differentiable reward (scaled cosine similarity, PickScore's form)
and the feature extractor of the toy fidelity metric (Frechet distance of image features)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.models import clip
from didr_jax.toy import fidelity, shapes

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


MEAN = STD = (0.5, 0.5, 0.5)  # (x - 0.5) / 0.5 = 2x - 1: the range of pretraining


def pixels(model, images: jax.Array) -> jax.Array:
  """Images in [0, 1] of any size -> the toy CLIP's input: resized to its size (bilinear,
  antialiased; the CLIP preprocessing ``models.clip.preprocess`` the CLIP rewards share) and
  mapped to [-1, 1]. Differentiable, jit-able."""
  n = model.config.vision_config.image_size
  return clip.preprocess(images, clip.ImagePrep(n, MEAN, STD, "bilinear"))


def score(model, images: jax.Array, input_ids: jax.Array) -> jax.Array:
  """exp(logit_scale) * cos(text features, image features), per sample (differentiable;
  images (B, H, W, 3) in [0, 1], any size)."""
  img = clip.l2_normalize(model.get_image_features(pixels(model, images)))
  txt = clip.l2_normalize(model.get_text_features(input_ids))
  return jnp.exp(model.logit_scale[...]) * jnp.sum(img * txt, axis=-1)


class ToyCLIP:
  """Loads the toy CLIP and its tokenizer once; host-facing batched functions."""

  def __init__(self, folder: str = os.path.join(ASSETS, "toy_clip")):
    from transformers import AutoTokenizer
    self.model = clip.load_clip(folder, clip.CLIPModel)
    self.tokenizer = AutoTokenizer.from_pretrained(folder)
    self._score = jax.jit(score)
    self._features = jax.jit(lambda m, x: m.get_image_features(pixels(m, x)))

  def ids(self, prompts) -> jax.Array:
    n = self.model.config.text_config.max_position_embeddings
    return jnp.asarray(self.tokenizer(list(prompts), padding="max_length", max_length=n,
                                      truncation=True, return_tensors="np").input_ids)

  def __call__(self, images, prompts) -> np.ndarray:
    return np.asarray(self._score(self.model, jnp.asarray(images, jnp.float32),
                                  self.ids(prompts)))

  def features(self, images, batch: int = 256) -> np.ndarray:
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(self._features(self.model,
                                                     jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])

  def fidelity(self, images, prompts, seed: int = 0) -> float:
    """Frechet distance between the toy-CLIP features of ``images`` and of rendered shapes
    scenes for the same prompts (seeded): how far samples drift from the true distribution."""
    size = np.asarray(images).shape[1]
    real = np.stack([shapes.render(shapes.sample_scene(seed + i, p), seed + i, size=size)
                     for i, p in enumerate(prompts)]).astype(np.float32) / 255.0
    a = fidelity.gaussian_stats(self.features(images))
    b = fidelity.gaussian_stats(self.features(real))
    return fidelity.frechet_distance(*a, *b)


@functools.lru_cache(maxsize=2)
def load(folder: str = os.path.join(ASSETS, "toy_clip")) -> ToyCLIP:
  return ToyCLIP(folder)


def available(folder: str = os.path.join(ASSETS, "toy_clip")) -> bool:
  return os.path.exists(os.path.join(folder, "config.json"))
