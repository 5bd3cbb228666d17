"""Reward registry with one interface for every reward.

A reward takes a batch of images (B, H, W, 3) float in [0, 1] and the batch's prompts and returns
float32 scores (B,). ``differentiable`` rewards are JAX functions that may also be used inside a
jitted loss: ``jax_fn(module, images, features) -> (B,)`` with ``module = reward.module`` (its
weights) and ``features = reward.prompt_features(prompts)`` (computed on the host), both passed
as arguments of the jit (weights closed over would be compiled into the program as constants).
Host rewards (JPEG, detectors, servers) run in NumPy on worker threads (``AsyncRewards``) while
the devices sample the next batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
from typing import Any, Callable, Mapping, Sequence

import numpy as np


_REGISTRY: dict[str, Callable[..., "Reward"]] = {}


@dataclasses.dataclass
class Reward:
  name: str
  fn: Callable[[np.ndarray, Sequence[str]], np.ndarray]
  differentiable: bool = False
  jax_fn: Callable[..., Any] | None = None  # (module, images, features) -> (B,) for jitted use
  module: Any = None  # jax_fn's weights: an nnx module or pytree (a jit argument)
  prompt_features: Callable[[Sequence[str]], Any] | None = None  # prompts -> jax_fn's features

  def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"reward {self.name!r}: images must be (B, H, W, 3), got {images.shape}")
    if len(prompts) != images.shape[0]:
      raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
    out = np.asarray(self.fn(images, prompts), np.float32)
    if out.shape != (images.shape[0],) or not np.all(np.isfinite(out)):
      raise ValueError(f"reward {self.name!r} returned {out.shape} values "
                       f"(finite: {bool(np.all(np.isfinite(out)))}); expected {images.shape[0]} "
                       "finite scores")
    return out


def register(name: str):
  def deco(factory):
    _REGISTRY[name] = factory
    return factory
  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)


def make(name: str, **kwargs) -> Reward:
  if name not in _REGISTRY:
    raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(names())}")
  return _REGISTRY[name](**kwargs)


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def jpeg_kilobytes(images: np.ndarray, quality: int = 95) -> np.ndarray:
  from PIL import Image
  out = []
  for img in to_uint8(images):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    out.append(buf.tell() / 1000.0)
  return np.asarray(out, np.float32)


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> Reward:
  """-kB of the JPEG encoding at ``quality`` (DDPO's compressibility task)."""
  return Reward("jpeg_compressibility", lambda x, p: -jpeg_kilobytes(x, quality))


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> Reward:
  """+kB of the JPEG encoding (DDPO's incompressibility task)."""
  return Reward("jpeg_incompressibility", lambda x, p: jpeg_kilobytes(x, quality))


def weighted_sum(rewards: Mapping[str, tuple[Reward, float]]) -> Reward:
  """sum_k w_k R_k. Differentiable only when every term is; then its module and features are
  the tuples of the terms' (features None for a term without ``prompt_features``)."""
  items = list(rewards.values())
  name = "+".join(f"{w:g}*{r.name}" for r, w in items)

  def fn(images, prompts):
    return sum(w * r(images, prompts) for r, w in items)

  if not all(r.differentiable for r, _ in items):
    return Reward(name, fn)

  def jax_fn(modules, images, features):
    return sum(w * r.jax_fn(m, images, f) for (r, w), m, f in zip(items, modules, features,
                                                                   strict=True))

  def prompt_features(prompts):
    return tuple(r.prompt_features(prompts) if r.prompt_features else None for r, _ in items)
  return Reward(name, fn, True, jax_fn, tuple(r.module for r, _ in items), prompt_features)


def from_config(spec: Mapping[str, float], **kwargs_by_name) -> Reward:
  """Builds the reward of a config's ``rewards`` dict {name: weight}; weight-0 entries are
  left out (``--config.rewards.toy_detector=0`` switches a reward off); ``kwargs_by_name[name]``
  are reward ``name``'s options (e.g. ``pickscore={"folder": "/models/PickScore_v1"}``)."""
  spec = {n: w for n, w in spec.items() if w != 0}
  if not spec:
    raise ValueError("config.rewards is empty: name at least one reward, e.g. {'toy_detector': 1.0}")
  parts = {n: (make(n, **kwargs_by_name.get(n, {})), float(w)) for n, w in spec.items()}
  if len(parts) == 1 and next(iter(parts.values()))[1] == 1.0:
    return next(iter(parts.values()))[0]
  return weighted_sum(parts)


class AsyncRewards:
  """Scores batches on worker threads so devices keep sampling: ``submit`` returns a future."""

  def __init__(self, reward: Reward, workers: int = 2):
    self.reward = reward
    self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")

  def submit(self, images, prompts) -> cf.Future:
    images = np.asarray(images)  # device -> host copy happens here, once
    return self.pool.submit(self.reward, images, list(prompts))

  def close(self):
    self.pool.shutdown(wait=True)
