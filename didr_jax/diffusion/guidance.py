"""Classifier-free guidance (CFG), with the options of diffusers' ZImagePipeline.

Standard CFG: out = out_uncond + w (out_cond - out_uncond) (w = 1: conditional only).

ZImagePipeline writes its guidance_scale g as pred = cond + g (cond - uncond), i.e. standard
CFG with w = 1 + g (``zimage_scale``); g = 0 (w = 1) switches CFG off. Its two extra options:

- ``cfg_normalization`` r > 0 (``normalization``): per sample, if ||pred|| > r ||cond|| (L2 over all
  non-batch dims), rescale pred to norm r ||cond||.
- ``cfg_truncation`` c <= 1 (``truncation``): no guidance (pred = cond) at steps whose progress
  p = (1000 - T) / 1000 ~= 1 - sig (0 at pure noise, 1 at clean) exceeds c; c = 1 never truncates.
  The pipeline precomputes p from its float32 timesteps T = 1000 sig.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion.param import bcast


def cfg(uncond: jax.Array, cond: jax.Array, scale) -> jax.Array:
  """out_uncond + scale (out_cond - out_uncond); scale a scalar or (B,)."""
  return uncond + bcast(scale, cond) * (cond - uncond)


def zimage_scale(guidance_scale: float) -> float:
  """ZImagePipeline's guidance_scale g as a standard CFG scale: w = 1 + g."""
  return 1.0 + guidance_scale


def renormalize(pred: jax.Array, cond: jax.Array, max_ratio) -> jax.Array:
  """Z-Image ``cfg_normalization``: pred * min(1, r ||cond|| / ||pred||), norms per sample over
  all non-batch dims (computed in float32)."""
  axes = tuple(range(1, pred.ndim))
  p32 = pred.astype(jnp.float32)
  n_pred = jnp.sqrt(jnp.sum(p32 ** 2, axis=axes))
  n_max = jnp.sqrt(jnp.sum(cond.astype(jnp.float32) ** 2, axis=axes)) * max_ratio
  factor = jnp.where(n_pred > n_max, n_max / jnp.where(n_pred > 0, n_pred, 1.0), 1.0)
  return (p32 * bcast(factor, p32)).astype(pred.dtype)


def guided_output(uncond: jax.Array, cond: jax.Array, scale, *, normalization: float = 0.0,
                  truncation: float | None = None, progress=None) -> jax.Array:
  """CFG with the Z-Image options: pred = cfg(uncond, cond, scale), renormalised if
  ``normalization`` > 0, and replaced by ``cond`` for samples whose ``progress`` (scalar or (B,),
  see module docstring) exceeds ``truncation``."""
  pred = cfg(uncond, cond, scale)
  if normalization and float(normalization) > 0.0:
    pred = renormalize(pred, cond, float(normalization))
  if truncation is not None and float(truncation) <= 1.0:
    if progress is None:
      raise ValueError("truncation needs the step's progress")
    active = bcast(jnp.asarray(progress) <= _f32_floor(truncation), pred)
    pred = jnp.where(active, pred, cond.astype(pred.dtype))
  return pred


def _f32_floor(c: float) -> np.float32:
  """The largest float32 <= c, so that a float32 ``p <= c`` test agrees with the pipeline's
  Python-float comparison exactly (rounding c to nearest could flip p == fl32(c) > c)."""
  c32 = np.float32(c)
  return np.nextafter(c32, np.float32(-np.inf)) if float(c32) > float(c) else c32


def flow_progress(sig) -> jax.Array:
  """Z-Image's progress for flow sigma sig, in float32 as its pipeline: (1000 - 1000 sig) / 1000."""
  return (1000.0 - jnp.asarray(sig, jnp.float32) * 1000.0) / 1000.0


def guided(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any,
           uncond: Any | None, scale, *, normalization: float = 0.0,
           truncation: float | None = None,
           progress_fn: Callable[[jax.Array], jax.Array] = flow_progress,
           ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A ``denoise_fn(x, t)`` for the samplers from ``model_fn(x, t, context)``.

  cond / uncond are context pytrees whose leaves have batch dim B. Both passes run as ONE
  model call on the concatenated batch [cond; uncond] (2B), then ``guided_output``. With
  ``uncond=None``, or a literal scale of 1 and no truncation, only the conditional pass runs.
  ``progress_fn(t)`` maps the sampler's t to the truncation progress (default: flow sigma ->
  ``flow_progress``; for VP integer t use e.g. ``lambda t: 1 - t / T``).
  """
  cond_only = uncond is None or (isinstance(scale, (int, float)) and scale == 1
                                 and truncation is None)
  if cond_only:
    return lambda x, t: model_fn(x, t, cond)

  def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
    t = jnp.broadcast_to(t, (x.shape[0],))
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    out_cond, out_uncond = jnp.split(out, 2)
    progress = None if truncation is None else progress_fn(t)
    return guided_output(out_uncond, out_cond, scale, normalization=normalization,
                         truncation=truncation, progress=progress)

  return denoise
