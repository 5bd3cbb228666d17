"""Differentiable CLIP rewards on real checkpoints: PickScore and the LAION aesthetic predictor.

Both are scored on images (B, H, W, 3) in [0, 1] (the registry's layout, see ``base.py``) and
are differentiable w.r.t. the images in JAX, preprocessing included:

  ``preprocess`` (``models.clip.preprocess``, shared with the toy CLIP):
      x -> (center_crop(resize_short_side(x, n), n) - mean) / std,
      transformers' CLIPImageProcessor in float, inside jit: the short side resized to the
      CLIP tower's n with ``jax.image.resize`` (bicubic by default, antialiased when
      shrinking: the filter of PIL and of torch's ``interpolate(..., antialias=True)``), the
      centred n x n crop, then CLIP's per-channel mean / std. Mean, std and filter come from
      the folder's ``preprocessor_config.json`` when it has one, else OpenAI CLIP's constants.
      It agrees with the processor to within its uint8 rounding (tested).

  **PickScore** (Kirstain et al. 2023) on a transformers ``CLIPModel`` folder:
      r(x, c) = exp(logit_scale) * cos(E_img(preprocess(x)), E_txt(tokens(c)))
      with E_* the projected features. ``pickscore_fn(model, prep)(images, text_embeds)``
      is the pure JAX form (jit / grad); ``PickScore.text_embeds(prompts)`` computes the prompt
      features once on the host (the text tower is never differentiated).

  **LAION aesthetic predictor** ("improved aesthetic predictor", Schuhmann et al.):
      r(x) = MLP(e / ||e||_2),  e = E_img(preprocess(x)) of CLIP ViT-L/14 (768-d),
      MLP = Linear(768, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64) Dropout
            Linear(64, 16) Linear(16, 1)
      (no activations; dropout is the identity at inference; torch ``nn.Sequential`` indices
      0, 2, 4, 6, 7). ``aesthetic_fn(predictor, prep)(images)`` is the pure JAX form, with
      ``AestheticPredictor`` holding the vision tower and the MLP.

Weights are read from local files only: the CLIP folders through ``models.clip.load_clip``
(safetensors), the MLP from a ``.safetensors`` file (``layers.{0,2,4,6,7}.{weight,bias}``).
The published MLP ships as a pickled ``.pth`` state dict; convert it once with
``python -m didr_jax.convert.aesthetic SRC.pth DST.safetensors`` (the only place that
unpickles, via ``torch.load(weights_only=True)``); run time never unpickles.

Pointing a config at the files (registry names ``pickscore`` and ``aesthetic``):
  ``rewards.from_config({"pickscore": 1.0}, pickscore={"folder": "/m/PickScore_v1",
  "tokenizer": "/m/CLIP-ViT-H-14"})`` and ``aesthetic={"clip": "/m/clip-vit-large-patch14",
  "mlp": "/m/sac+logos+ava1-l14-linearMSE.safetensors"}``; without kwargs the paths come
  from the environment: ``DIDR_PICKSCORE`` (and ``DIDR_PICKSCORE_TOKENIZER``, default: the
  model folder), ``DIDR_AESTHETIC_CLIP`` and ``DIDR_AESTHETIC_MLP``. ``tokenizer`` and
  ``preprocessor_config.json`` are looked up in the tokenizer folder, then the model folder
  (PickScore_v1 ships its processor in laion/CLIP-ViT-H-14-laion2B-s32B-b79K).

Registry use (``base.py``'s convention): ``reward.jax_fn(reward.module, images, features)``
with ``features = reward.prompt_features(prompts)`` (PickScore: the normalised text embeddings;
the aesthetic predictor has none and ignores the argument), module and features passed as
arguments of the jitted loss. ``reward(images, prompts)`` is the host form (NumPy in and out).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.errors import ConfigError
from didr_jax.models import clip, layers
from didr_jax.models.clip import ImagePrep, preprocess
from didr_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: F401  (old home)
from didr_jax.rewards.base import Reward, register

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# ---------------------------------------------------------------------------------------------
# pure JAX reward functions


def pickscore_fn(model: clip.CLIPModel, prep: ImagePrep
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(images, text_embeds) -> (B,) exp(logit_scale) * cos(image features, text_embeds).

  ``text_embeds`` (B, P): projected text features (normalised here again, so raw features
  work too), e.g. from ``PickScore.text_embeds``."""

  def fn(images: jax.Array, text_embeds: jax.Array) -> jax.Array:
    img = clip.l2_normalize(model.get_image_features(preprocess(images, prep)))
    txt = clip.l2_normalize(text_embeds)
    return jnp.exp(model.logit_scale[...]) * jnp.sum(img * txt, axis=-1)
  return fn


def aesthetic_fn(predictor: "AestheticPredictor", prep: ImagePrep
                 ) -> Callable[..., jax.Array]:
  """(images, *ignored) -> (B,) MLP(normalised CLIP image embedding)."""

  def fn(images: jax.Array, *unused) -> jax.Array:
    return predictor(preprocess(images, prep))
  return fn


# ---------------------------------------------------------------------------------------------
# the aesthetic MLP


class AestheticMLP(nnx.Module):
  """y = L5(L4(L3(L2(L1 e)))), Li(x) = W_i x + b_i, sizes dim -> 1024 -> 128 -> 64 -> 16 -> 1
  (the improved aesthetic predictor; its dropouts are inactive at inference)."""

  HIDDEN = (1024, 128, 64, 16, 1)
  TORCH_INDEX = (0, 2, 4, 6, 7)  # positions of the Linear layers in the torch nn.Sequential

  def __init__(self, dim: int = 768, *, rngs: nnx.Rngs):
    sizes = (dim,) + self.HIDDEN
    self.layers = nnx.List([layers.Dense(a, b, rngs=rngs, axes=(None, None))
                            for a, b in zip(sizes[:-1], sizes[1:])])

  @classmethod
  def torch_key(cls, path) -> str:
    """('layers', i, 'kernel') -> 'layers.<torch index>.weight'."""
    _, i, leaf = path
    return f"layers.{cls.TORCH_INDEX[i]}.{'weight' if leaf == 'kernel' else leaf}"

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


class AestheticPredictor(nnx.Module):
  """pixels -> (B,) MLP(e / ||e||_2), e = the vision tower's projected image embedding."""

  def __init__(self, vision: clip.CLIPVisionModelWithProjection, mlp: AestheticMLP):
    self.vision = vision
    self.mlp = mlp

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    return self.mlp(clip.l2_normalize(self.vision(pixel_values).image_embeds))[:, 0]


def load_aesthetic_mlp(path: str, dim: int) -> AestheticMLP:
  """The MLP from a safetensors file (torch key names); shapes are checked against ``dim``."""
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    raise core.ConversionError(
        f"{path}: pickled weights are not read at run time; convert once with "
        f"`python -m didr_jax.convert.aesthetic {path} OUT.safetensors`")
  if not os.path.isfile(path):
    raise core.ConversionError(f"aesthetic MLP weights {path!r} do not exist")
  abstract = layers.abstract_module(lambda rngs: AestheticMLP(dim, rngs=rngs))
  return core.load_torch_weights(abstract, core.SafetensorsFile(path),
                                 key_fn=AestheticMLP.torch_key, source=path)


# ---------------------------------------------------------------------------------------------
# host-facing models


class PickScore:
  """A PickScore (CLIPModel) folder, its tokenizer and preprocessing; host batched scoring."""

  def __init__(self, folder: str, tokenizer: str | None = None, dtype: Any = jnp.float32):
    from transformers import AutoTokenizer
    self.model = clip.load_clip(folder, clip.CLIPModel, dtype=dtype)
    tok_folder = tokenizer or folder
    if not any(os.path.exists(os.path.join(tok_folder, f)) for f in _TOKENIZER_FILES):
      # transformers would build an empty tokenizer from config.json alone, silently
      raise ValueError(f"no tokenizer ({' or '.join(_TOKENIZER_FILES)}) in {tok_folder!r}; "
                       "pass tokenizer=FOLDER (PickScore_v1 uses the one of "
                       "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    self.tokenizer = AutoTokenizer.from_pretrained(tok_folder)
    vocab = self.model.config.text_config.vocab_size
    if len(self.tokenizer) > vocab:
      raise ValueError(f"the tokenizer of {tok_folder!r} has {len(self.tokenizer)} tokens, more "
                       f"than the text model's vocab_size {vocab} (a different tokenizer?)")
    self.prep = ImagePrep.from_folder(self.model.config.vision_config.image_size,
                                      tokenizer, folder)
    self.max_length = min(int(self.tokenizer.model_max_length),
                          self.model.config.text_config.max_position_embeddings)
    self._text = jax.jit(lambda m, ids, mask: clip.l2_normalize(m.get_text_features(ids, mask)))
    self._score = jax.jit(lambda m, x, t: pickscore_fn(m, self.prep)(x, t))

  def text_embeds(self, prompts: Sequence[str]) -> jax.Array:
    """(B, P) L2-normalised projected text features (right-padded to the model's length)."""
    tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                         truncation=True, return_tensors="np")
    return self._text(self.model, jnp.asarray(tok.input_ids), jnp.asarray(tok.attention_mask))

  def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
    return np.asarray(self._score(self.model, jnp.asarray(images, jnp.float32),
                                  self.text_embeds(prompts)))


class Aesthetic:
  """CLIP ViT-L/14 vision tower + the aesthetic MLP; host batched scoring."""

  def __init__(self, clip_folder: str, mlp_path: str, dtype: Any = jnp.float32):
    vision = clip.load_clip(clip_folder, clip.CLIPVisionModelWithProjection, dtype=dtype)
    self.model = AestheticPredictor(vision, load_aesthetic_mlp(mlp_path,
                                                               vision.config.projection_dim))
    self.prep = ImagePrep.from_folder(vision.config.image_size, clip_folder)
    self._score = jax.jit(lambda m, x: aesthetic_fn(m, self.prep)(x))

  def __call__(self, images, prompts: Sequence[str] = ()) -> np.ndarray:
    return np.asarray(self._score(self.model, jnp.asarray(images, jnp.float32)))


@functools.lru_cache(maxsize=4)
def _pickscore(folder: str, tokenizer: str | None, dtype: str) -> PickScore:
  return PickScore(folder, tokenizer, jnp.dtype(dtype))


@functools.lru_cache(maxsize=4)
def _aesthetic(clip_folder: str, mlp_path: str, dtype: str) -> Aesthetic:
  return Aesthetic(clip_folder, mlp_path, jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------------
# registry


def _load(name: str, loader: Callable, *args):
  """``loader(*args)``, with unreadable or mismatched files reported as one ConfigError line
  (``rewards.<name>: why``) instead of a traceback."""
  try:
    return loader(*args)
  except (ValueError, OSError) as e:  # ConversionError, bad config.json, missing tokenizer
    raise ConfigError(f"rewards.{name}: {e}") from None


def _dtype(name: str, dtype: str) -> str:
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"rewards.{name}: dtype {dtype!r} must be 'float32' or 'bfloat16'")
  return dtype


def _path(name: str, key: str, value: str | None, env: str, *, file: bool = False) -> str:
  value = value or os.environ.get(env)
  if not value:
    raise ConfigError(f"rewards.{name}: no {key} given; pass {key}=PATH in the reward's "
                      f"options or set ${env}")
  ok = os.path.isfile(value) if file else os.path.isfile(os.path.join(value, "config.json"))
  if not ok:
    what = "file" if file else "folder with a config.json"
    raise ConfigError(f"rewards.{name}: {key} {value!r} is not a {what}")
  return value


@register("pickscore")
def pickscore(folder: str | None = None, tokenizer: str | None = None,
              dtype: str = "float32") -> Reward:
  """PickScore: exp(logit_scale) * cos(image, prompt) of a CLIPModel folder (default
  $DIDR_PICKSCORE); tokenizer folder default $DIDR_PICKSCORE_TOKENIZER, else ``folder``."""
  folder = _path("pickscore", "folder", folder, "DIDR_PICKSCORE")
  tokenizer = tokenizer or os.environ.get("DIDR_PICKSCORE_TOKENIZER") or None
  ps = _load("pickscore", _pickscore, folder, tokenizer, _dtype("pickscore", dtype))
  return Reward("pickscore", ps, True, lambda m, x, t: pickscore_fn(m, ps.prep)(x, t),
                ps.model, ps.text_embeds)


@register("aesthetic")
def aesthetic(clip: str | None = None, mlp: str | None = None,
              dtype: str = "float32") -> Reward:
  """LAION aesthetic score: MLP(normalised CLIP ViT-L/14 image embedding); ``clip`` a CLIP
  folder (default $DIDR_AESTHETIC_CLIP), ``mlp`` a safetensors file ($DIDR_AESTHETIC_MLP)."""
  clip_folder = _path("aesthetic", "clip", clip, "DIDR_AESTHETIC_CLIP")
  mlp_path = _path("aesthetic", "mlp", mlp, "DIDR_AESTHETIC_MLP", file=True)
  ae = _load("aesthetic", _aesthetic, clip_folder, mlp_path, _dtype("aesthetic", dtype))
  return Reward("aesthetic", ae, True, lambda m, x, unused=None: aesthetic_fn(m, ae.prep)(x),
                ae.model)
