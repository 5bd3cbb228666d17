"""Evaluation shared by every method: deterministic samples on held-out prompts, scored by
every named metric, reported as one flat dict (and one JSON line by ``didr_jax.evaluate``)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from didr_jax.train import common


def evaluate(sample_fn: Callable, prompts: Sequence[str],
             metrics: Mapping[str, Callable[[np.ndarray, Sequence[str]], np.ndarray]], *,
             num_samples: int, batch_size: int, seed: int = 1234,
             set_metrics: Mapping[str, Callable[[np.ndarray, Sequence[str]], float]] = {},
             progress: Callable[[int, int], None] | None = None) -> tuple[dict, np.ndarray]:
  """``sample_fn(prompts, rng) -> images (B, H, W, 3) in [0, 1]``; prompt i of the evaluation is
  ``prompts[i % len(prompts)]`` and its noise comes from ``seed``, so every run and checkpoint
  is judged on the same prompts and noise. ``metrics`` are per-image scores (means reported);
  ``set_metrics`` see all images at once (e.g. a Frechet distance). On several hosts every
  host gathers all images, so all report the same metrics. ``progress(done, total)`` is called
  after each batch with the samples drawn so far."""
  all_images, all_prompts = [], []
  for b in range(num_samples // batch_size):
    ps = [prompts[(b * batch_size + i) % len(prompts)] for i in range(batch_size)]
    images = sample_fn(ps, jax.random.fold_in(jax.random.key(seed), b))
    all_images.append(common.all_rows(images))
    all_prompts += ps
    if progress is not None:
      progress(len(all_prompts), num_samples)
  images = np.concatenate(all_images)
  out = {}
  for name, fn in metrics.items():
    out[name] = float(np.mean(fn(images, all_prompts)))
  for name, fn in set_metrics.items():
    out[name] = float(fn(images, all_prompts))
  out["num_samples"] = int(images.shape[0])
  return out, images
