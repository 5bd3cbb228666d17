"""Picks the pipeline class of a local model folder from its ``model_index.json``."""

from __future__ import annotations

import os

from didr_jax.convert import core

_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}


def load_pipeline(path: str, **kwargs):
  index = core.read_json(os.path.join(path, "model_index.json"))
  cls = index.get("_class_name", "")
  if cls in _SD_CLASSES:
    from didr_jax.pipelines.sd import SDPipeline
    return SDPipeline.from_pretrained(path, **kwargs)
  if cls == "ZImagePipeline":
    from didr_jax.pipelines.zimage import ZImagePipeline
    return ZImagePipeline.from_pretrained(path, **kwargs)
  raise core.ConversionError(f"{path}: unsupported pipeline class {cls!r}; supported: "
                             f"{sorted(_SD_CLASSES | {'ZImagePipeline'})}")
