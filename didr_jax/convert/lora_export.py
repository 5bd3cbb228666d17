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
format) of the pipeline with W' = W + s A B folded into the base.

  python -m didr_jax.convert.lora_export --workdir=RUN --dst=OUT [--merge]
      the adapters of a LoRA training run's latest checkpoint (base: the run's backbone.path) as
      OUT/pytorch_lora_weights.safetensors, or with --merge the merged diffusers folder OUT.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from didr_jax.convert import core
from didr_jax.models import lora as lora_lib

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def component_prefix(model: nnx.Module) -> str:
  """diffusers' name of the denoiser component: "transformer" (Z-Image) or "unet"."""
  from didr_jax.models import zimage_dit
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


def export_merged(pipe: Any, dst: str) -> None:
  """``pipe.export_diffusers(dst)`` with the denoiser's adapters merged into its weights
  (W' = W + s A B): a plain diffusers folder, no LoRA loading needed. ``pipe`` is unchanged."""
  model = pipe.model
  name = next(f.name for f in dataclasses.fields(pipe) if getattr(pipe, f.name) is model)
  dataclasses.replace(pipe, **{name: lora_lib.merge(model)}).export_diffusers(dst)


# ---------------------------------------------------------------------------------------------
# command line


def _latest_policy_params(workdir: str) -> tuple[Any, int]:
  """The evaluated adapters (``_evaluated_params``) of the latest complete training checkpoint
  of ``workdir``."""
  import orbax.checkpoint as ocp
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if n.isdigit())
  if not steps:
    raise core.ConversionError(f"no training checkpoint in {directory}")
  path = os.path.join(directory, str(steps[-1]), "state")
  try:
    state = ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # orbax raises many types; name the checkpoint and keep the cause
    raise core.ConversionError(f"could not read the training checkpoint {path}: {e}") from e
  return _evaluated_params(state), steps[-1]


def _evaluated_params(state: Mapping) -> Any:
  """The adapters a run samples and evaluates with: DDPO's / CRD's policy; DIDR's and TDM's
  generator EMA (in the generator's dtypes) when the run keeps one, else the generator."""
  params = state["params"]
  if "policy" in params:
    return params["policy"]
  from didr_jax.train import common
  ema = state.get("ema", {}).get("generator")
  return params["generator"] if ema is None else common.ema_as(ema, params["generator"])


def export_run(workdir: str, dst: str, *, merge: bool = False) -> str:
  """Exports a LoRA training run (its config.json names base, rank, alpha and targets)."""
  import ml_collections
  c = ml_collections.ConfigDict(core.read_json(os.path.join(workdir, "config.json")))
  if "lora" not in c or not c.lora.enabled:
    raise core.ConversionError(f"{workdir}: the run was not trained with LoRA "
                               "(config lora.enabled is false); export it with didr_jax.convert")
  from didr_jax.train import loop
  pipe = loop.build_backbone(c, None, master_weights=merge)
  lora_lib.from_config(pipe.model, c.lora)
  params, step = _latest_policy_params(workdir)
  set_adapter_params(pipe.model, params)
  if merge:
    export_merged(pipe, dst)
    return f"exported the merged diffusers pipeline of {workdir} (step {step}) to {dst}"
  path = save_lora_weights(pipe.model, dst)
  return f"wrote the LoRA adapters of {workdir} (step {step}) to {path}"


def main(argv):
  from absl import app, flags
  from didr_jax.train.config import ConfigError
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    print(export_run(f.workdir, f.dst, merge=f.merge))
  except (core.ConversionError, ConfigError) as e:  # bad input: one line, no traceback
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  from absl import app, flags
  from didr_jax.cli_util import quiet_logs
  flags.DEFINE_string("workdir", None, "a LoRA training run's workdir")
  flags.DEFINE_string("dst", None, "output folder")
  flags.DEFINE_bool("merge", False, "write the merged diffusers pipeline instead of the adapters")
  flags.mark_flags_as_required(["workdir", "dst"])
  quiet_logs()
  app.run(main)
