"""Picks the pipeline class of a local model folder from its ``model_index.json``, and checks a
folder (``check_folder``) from its JSON files and weight headers alone, before anything loads.

The registry sits above the pipeline classes: ``sd`` and ``zimage`` read a folder's index with
``base.read_index`` / ``pipeline_kind`` / ``components`` (named here too, the folder API of the
trainers and command lines), and this module picks between them."""

from __future__ import annotations

import os

from didr_jax.convert import core, orbax_io
from didr_jax.pipelines.base import PARAMS_DIR, components, pipeline_kind, read_index
from didr_jax.pipelines.sd import SDPipeline
from didr_jax.pipelines.zimage import ZImagePipeline


def check_folder(path: str) -> str:
  """Checks a pipeline folder without loading weights: model_index.json, every component's
  config and tokenizer folder, and either the Orbax cache's metadata or every safetensors
  file's header and size (truncated downloads are found here). Returns its kind."""
  index = read_index(path)
  kind = pipeline_kind(path, index)
  weights, tokenizers = components(kind, index)
  for name in weights + tokenizers + ["scheduler"]:
    sub = os.path.join(path, name)
    if not os.path.isdir(sub):
      raise core.ConversionError(f"{path!r}: component folder {name}/ is missing")
  configs = {name: core.read_json(os.path.join(path, name, "config.json")) for name in weights}
  if kind in ("sd", "sdxl"):  # only SDXL's UNet takes the pooled text and size embedding
    add = configs["unet"].get("addition_embed_type")
    if (add == "text_time") != (kind == "sdxl"):
      raise core.ConversionError(
          f"{path}: model_index.json describes an {kind.upper()} pipeline but unet/config.json "
          f"is {'not ' if kind == 'sdxl' else ''}an SDXL UNet (addition_embed_type={add!r})")
  cache = os.path.join(path, PARAMS_DIR)
  if os.path.isdir(cache):
    orbax_io.check_cache(cache)
  else:
    for name in weights:
      core.open_weights(os.path.join(path, name))
  return kind


def load_pipeline(path: str, **kwargs):
  kind = pipeline_kind(path, read_index(path))
  if kind in ("sd", "sdxl"):
    return SDPipeline.from_pretrained(path, **kwargs)
  return ZImagePipeline.from_pretrained(path, **kwargs)
