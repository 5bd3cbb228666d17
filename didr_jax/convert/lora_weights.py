"""LoRA adapters out of (and back into) our models in diffusers' PEFT format, and merged exports.

diffusers' ``pipe.load_lora_weights(folder)`` reads ``pytorch_lora_weights.safetensors`` whose
keys are ``<component>.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r)
(``(r, in, 1, 1)`` / ``(out, r, 1, 1)`` for a 1x1 conv), component ``unet`` or ``transformer``;
PEFT then computes W x + (alpha / r) B A x with alpha = r when the file names no alpha. Our
adapter is x W + s (x A_ours) B_ours with s = alpha / r, so we write

    lora_A.weight = A_ours^T,    lora_B.weight = s B_ours^T,

the same map at PEFT's scale 1 whatever reader loads it (no alpha metadata needed). A scanned
model's stacked adapters (leading layer axis) are written per layer, ``layers.{i}.<rest>``.

``export_merged`` writes the ordinary diffusers folder (``python -m didr_jax.convert --export``'s
format) of the pipeline with W' = W + s A B folded into the base. The command lines that export
a run are ``python -m didr_jax.export`` and ``python -m didr_jax.convert.lora_export``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.models import lora as lora_lib, zimage_dit

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def component_prefix(model: nnx.Module) -> str:
  """diffusers' name of the denoiser component: "transformer" (Z-Image) or "unet"."""
  return "transformer" if isinstance(model, zimage_dit.ZImageTransformer) else "unet"


def _unstacked(path: tuple, value: np.ndarray, stacked_ndim: int):
  """(path, value) per layer: a scanned trunk's ('layers', rest...) -> ('layers', i, rest...)."""
  if value.ndim == stacked_ndim and path[0] == "layers" and not isinstance(path[1], int):
    return [(("layers", i) + path[1:], value[i]) for i in range(value.shape[0])]
  return [(path, value)]


def lora_state_dict(model: nnx.Module, *, prefix: str | None = None,
                    dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The PEFT-format state dict of every adapter in ``model`` (see the module docstring)."""
  prefix = component_prefix(model) if prefix is None else prefix
  out = {}
  for path, layer in lora_lib.adapters(model):
    conv = isinstance(layer.base_module, nnx.Conv)
    a = np.asarray(jax.device_get(layer.lora_a[...]), np.float32)
    b = np.asarray(jax.device_get(layer.lora_b[...]), np.float32) * layer.scale
    for (p, a_i), (_, b_i) in zip(_unstacked(path, a, 3), _unstacked(path, b, 3)):
      key = ".".join(str(x) for x in ((prefix,) if prefix else ()) + p)
      lora_a, lora_b = a_i.T, b_i.T                        # (r, in), (out, r)
      if conv:
        lora_a, lora_b = lora_a[:, :, None, None], lora_b[:, :, None, None]
      out[f"{key}.lora_A.weight"] = lora_a.astype(dtype)
      out[f"{key}.lora_B.weight"] = lora_b.astype(dtype)
  if not out:
    raise core.ConversionError("the model has no LoRA adapters to export")
  return out


def save_lora_weights(model: nnx.Module, dst: str, *, prefix: str | None = None,
                      dtype: Any = np.float32) -> str:
  """Writes ``dst/pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights(dst)``
  reads); returns the file's path."""
  os.makedirs(dst, exist_ok=True)
  path = os.path.join(dst, WEIGHT_NAME)
  core.save_safetensors(lora_state_dict(model, prefix=prefix, dtype=dtype), path,
                        metadata={"format": "pt"})
  return path


def load_lora_weights(model: nnx.Module, tensors: Mapping[str, np.ndarray], *,
                      prefix: str | None = None) -> None:
  """Sets the adapters of ``model`` (already injected, same targets and rank) from a PEFT-format
  state dict written by ``lora_state_dict`` (B is divided by the adapter's scale again).
  Missing or surplus keys and shape mismatches raise ``ConversionError``."""
  prefix = component_prefix(model) if prefix is None else prefix
  used = set()
  for path, layer in lora_lib.adapters(model):
    vals = {}
    for name, var in (("A", layer.lora_a), ("B", layer.lora_b)):
      ref = np.zeros(var.shape, np.float32)
      parts = []
      for p, r in _unstacked(path, ref, 3):
        key = ".".join(str(x) for x in ((prefix,) if prefix else ()) + p) + f".lora_{name}.weight"
        if key not in tensors:
          raise core.ConversionError(f"LoRA weights: missing {key}")
        used.add(key)
        t = np.asarray(tensors[key], np.float32)
        t = t.reshape(t.shape[:2]).T if t.ndim == 4 else t.T
        if t.shape != r.shape:
          raise core.ConversionError(f"LoRA weights: {key} has shape {t.T.shape}, the adapter "
                                     f"expects {r.T.shape}")
        parts.append(t)
      vals[name] = np.stack(parts) if len(parts) > 1 or ref.ndim == 3 else parts[0]
    layer.lora_a.set_value(jax.numpy.asarray(vals["A"], layer.lora_a.dtype))
    layer.lora_b.set_value(jax.numpy.asarray(vals["B"] / layer.scale, layer.lora_b.dtype))
  extra = sorted(k for k in tensors if k not in used)
  if extra:
    raise core.ConversionError(f"LoRA weights: {len(extra)} tensors match no adapter of the "
                               f"model (other targets?): {extra[:5]}")


def set_adapter_params(model: nnx.Module, params: Any) -> None:
  """Puts a pure dict of adapter parameters (a LoRA run's ``state['params']['policy']``) into
  the injected ``model``."""
  state = nnx.state(model, nnx.LoRAParam)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def merged_pipeline(pipe: Any, model: nnx.Module | None = None) -> Any:
  """``pipe`` with its denoiser replaced by ``model`` (default: its own) with every adapter
  merged into the weights (W' = W + s A B). ``pipe`` and ``model`` are unchanged."""
  current = pipe.model
  name = next(f.name for f in dataclasses.fields(pipe) if getattr(pipe, f.name) is current)
  return dataclasses.replace(pipe, **{name: lora_lib.merge(current if model is None else model)})


def export_merged(pipe: Any, dst: str) -> None:
  """``pipe.export_diffusers(dst)`` with the denoiser's adapters merged into its weights:
  a plain diffusers folder, no LoRA loading needed. ``pipe`` is unchanged."""
  merged_pipeline(pipe).export_diffusers(dst)
