"""Picks the pipeline class of a local model folder from its ``model_index.json``, and checks a
folder (``check_folder``) from its JSON files and weight headers alone, before anything loads."""

from __future__ import annotations

import os
from typing import Any, Mapping

from didr_jax.convert import core
from didr_jax.pipelines.base import PARAMS_DIR, has_vae

_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}
_SUPPORTED = sorted(_SD_CLASSES | {"ZImagePipeline"})


def pipeline_kind(path: str, index: Mapping[str, Any]) -> str:
  """"sd", "sdxl" or "zimage" from a folder's ``model_index.json``."""
  cls = index.get("_class_name", "")
  if cls in _SD_CLASSES:
    xl = cls == "StableDiffusionXLPipeline"
    if xl != bool((index.get("text_encoder_2") or [None])[0]):
      raise core.ConversionError(
          f"{path}: model_index.json names a {cls} but "
          f"{'lists no' if xl else 'lists a'} text_encoder_2 (SDXL has two text encoders, SD "
          "one); the class and the components must agree")
    return "sdxl" if xl else "sd"
  if cls == "ZImagePipeline":
    return "zimage"
  raise core.ConversionError(f"{path}: unsupported pipeline class {cls!r}; supported: "
                             f"{_SUPPORTED}")


def components(kind: str, index: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """(components with weights, tokenizer folders) of a pipeline of ``kind``."""
  vae = ["vae"] if has_vae(index) else []
  if kind == "zimage":
    return ["transformer"] + vae + ["text_encoder"], ["tokenizer"]
  te = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
  tok = ["tokenizer"] + (["tokenizer_2"] if kind == "sdxl" else [])
  return ["unet"] + vae + te, tok


def read_index(path: str) -> dict:
  """``model_index.json`` of a pipeline folder, with a message that says what is wrong."""
  if not os.path.isdir(path):
    raise core.ConversionError(f"{path!r} is not a folder" if not os.path.exists(path) else
                               f"{path!r} is a file; expected a pipeline folder")
  if not os.path.exists(os.path.join(path, "model_index.json")):
    what = "is empty" if not os.listdir(path) else "has no model_index.json"
    raise core.ConversionError(
        f"{path!r} {what}: expected a diffusers pipeline folder (model_index.json, unet/ or "
        "transformer/, text_encoder/, ...) or one written by python -m didr_jax.convert")
  return core.read_json(os.path.join(path, "model_index.json"))


def check_folder(path: str) -> str:
  """Checks a pipeline folder without loading weights: model_index.json, every component's
  config and tokenizer folder, and either the Orbax cache's metadata or every safetensors
  file's header and size (truncated downloads are found here). Returns its kind."""
  from didr_jax.convert import orbax_io
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
    from didr_jax.pipelines.sd import SDPipeline
    return SDPipeline.from_pretrained(path, **kwargs)
  from didr_jax.pipelines.zimage import ZImagePipeline
  return ZImagePipeline.from_pretrained(path, **kwargs)
