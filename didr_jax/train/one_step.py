"""One-step generators on either backbone family: the backbone evaluated once, at a fixed
conditioning time, on pure noise.

    x0 = g_theta(z, c) = to_x0(f_theta(z, t_g, c), z, alpha_{t_g}, sigma_{t_g}),   z ~ N(0, I)

- VP / eps (SD, SDXL): t_g = 399 by default, the conditioning time of DMD2's one-step SDXL UNet.
  DMD2 feeds the unscaled noise z as if it were x_{399} and reads the clean image off the eps
  output, x0 = (z - sqrt(1 - abar_399) eps_hat) / sqrt(abar_399) (their ``get_x0_from_noise``;
  the model card's diffusers recipe, LCMScheduler with ``timesteps=[399]`` and unit
  ``init_noise_sigma``, is the same map up to LCM's c_skip ~ 1e-8 at t = 399). Any t_g in
  [0, T) and the v-prediction type work the same way (``param.to_x0``).
- Flow / velocity (Z-Image, toy DiT): t_g = sigma 1, where x_1 = z exactly, so
  x0 = z - v_hat(z, 1) (the clean estimate of the flow table, docs/methods.md §0).

A VP scheduler with ``clip_sample`` (the pixel-space toy's) clips x0 to its range, as its DDIM
sampler clips each x0-hat: without it DI distillation of the toy one-step generator drifted to
saturated pixels (81% of the shipped generator's x0 values above 1, the teacher's 0.7%) and the
re-noised samples left the range the reference was trained on. Latent backbones (SD, SDXL,
Z-Image) have no clip. The gradient through the clip is zero for clipped values, as in TDM's
student step (``losses.tdm.student_step``).

The generator runs without CFG (guidance is distilled into it). Its parameters are a copy of
the backbone's (the teacher; DMD2-style init) or are read from a one-step checkpoint folder in
diffusers format (``load_generator``): either a whole pipeline folder (``model_index.json``;
its trainable model is taken) or a single component folder (``unet/`` or ``transformer/``,
``config.json`` + safetensors, e.g. DMD2's SDXL UNet saved with diffusers). It must have the
backbone's architecture (same parameter tree and shapes); sampling is one network call.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from didr_jax.diffusion import kernels, param
from didr_jax.errors import ConfigError
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.pipelines import registry, sd as pipelines_sd, zimage as pipelines_zimage
from didr_jax.train import common

DMD2_TIME = 399     # DMD2's one-step SDXL conditioning timestep


@dataclasses.dataclass(frozen=True)
class OneStep:
  """The fixed conditioning time of a one-step generator and its (alpha, sigma)."""
  time: float
  alpha: float
  sigma: float
  prediction_type: str
  integer_time: bool
  clip_range: float | None = None

  @classmethod
  def of(cls, backbone, time: float | None = None) -> "OneStep":
    """VP: integer t_g (default ``DMD2_TIME``); flow: sigma t_g (default 1)."""
    if backbone.family == "vp":
      sched = backbone.schedule
      t = DMD2_TIME if time is None or time < 0 else int(round(time))
      if not 0 <= t < sched.num_train_timesteps:
        raise ConfigError(f"config.didr.generator_time: {t} is outside [0, "
                          f"{sched.num_train_timesteps})")
      a, s = kernels.vp_alpha_sigma(sched, jnp.int32(t))
      return cls(float(t), float(a), float(s), sched.prediction_type, True, clip_range(backbone))
    sig = 1.0 if time is None or time < 0 else float(time)
    if not 0.0 < sig <= 1.0:
      raise ConfigError(f"config.didr.generator_time: flow sigma {sig} is outside (0, 1]")
    return cls(sig, 1.0 - sig, sig, "flow", False)

  def times(self, batch: int) -> jax.Array:
    return jnp.full((batch,), self.time, jnp.int32 if self.integer_time else jnp.float32)


def clip_range(backbone) -> float | None:
  """The x0 clip of a VP scheduler with ``clip_sample`` (its ``clip_sample_range``), else None."""
  sched = getattr(backbone, "schedule", None)
  return float(sched.clip_sample_range) if getattr(sched, "clip_sample", False) else None


def generate(backbone, model, z: jax.Array, cond: Any, spec: OneStep) -> jax.Array:
  """x0 = to_x0(f(z, t_g, c), z, alpha_g, sigma_g) in float32, clipped to ``spec.clip_range``
  when set: one network call, no CFG."""
  out = backbone.denoise(model, z, spec.times(z.shape[0]), cond, None, 1.0)
  x0 = param.to_x0(out.astype(jnp.float32), z.astype(jnp.float32), spec.alpha, spec.sigma,
                   spec.prediction_type)
  return x0 if spec.clip_range is None else jnp.clip(x0, -spec.clip_range, spec.clip_range)


def _component(backbone) -> str:
  return "unet" if backbone.family == "vp" else "transformer"


def load_generator(path: str, backbone, like: Any, *, dtype, mesh, rules, remat: bool,
                   key: str = "config.didr.generator_path") -> Any:
  """The parameters (pure dict, placed on ``mesh``) of a one-step checkpoint folder: a pipeline
  folder (its trainable model) or a ``unet`` / ``transformer`` component folder. Raises
  ConfigError naming ``key`` (the config key of the path) when it is unreadable or its
  parameters differ from ``like`` (the reference's) in names, shapes or dtypes. TDM's few-step
  students load through it too."""
  if not os.path.isdir(path):
    raise ConfigError(f"{key}: {path!r} is not a folder")
  # a Z-Image DiT in the backbone's layer form (stacked for scan_layers, or unrolled)
  form = {} if backbone.family == "vp" else {"scan_layers": bool(backbone.model.scan_layers)}
  try:
    if os.path.isfile(os.path.join(path, "model_index.json")):
      module = registry.load_pipeline(path, dtype=dtype, mesh=mesh, rules=rules,
                                      remat=remat, **form).model
    elif os.path.isfile(os.path.join(path, "config.json")):
      family = pipelines_sd if backbone.family == "vp" else pipelines_zimage
      loaders, _ = family._component_fns(dtype, remat, **form)
      module = loaders[_component(backbone)](
          path, lambda p, v: mesh_lib.param_sharding(v, mesh, rules))
    else:
      raise ConfigError(f"{key}: {path!r} has neither model_index.json (a pipeline) nor "
                        f"config.json (a {_component(backbone)} folder)")
  except ConfigError:
    raise
  except (ValueError, OSError, KeyError) as e:
    raise ConfigError(f"{key}: {path!r} could not be loaded: {e}") from None
  params = common.Net.of(module).params
  if _signature(params) != _signature(like):
    raise ConfigError(f"{key}: {path!r} holds a {_component(backbone)} of another architecture "
                      "than the reference backbone (parameter names, shapes or dtypes differ)")
  return params


def _signature(tree) -> dict:
  return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}
