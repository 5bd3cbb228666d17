"""``python -m didr_jax.convert --export`` folders load through the PyTorch classes people run.

Tiny random SD and SDXL pipelines (``testing.tiny``) are loaded into didr_jax, exported as
diffusers folders, and read back with transformers' CLIPTextModel / CLIPTextModelWithProjection
and diffusers' UNet2DConditionModel / AutoencoderKL: no missing, unexpected or mismatched keys,
and every tensor equal to the source pipeline's. The text encoders' keys are all under
``text_model.`` / ``text_projection.`` (the layout transformers 4.x reads; 5.x reads it too).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _header_keys(path: str) -> set[str]:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return set(json.loads(f.read(n))) - {"__metadata__"}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def exported(request, tmp_path_factory):
  """(torch source pipeline, exported folder) for each kind; SD is exported through the CLI."""
  from didr_jax.testing import tiny
  kind = request.param
  base = tmp_path_factory.mktemp(f"export_{kind}")
  src, dst = str(base / "src"), str(base / "out")
  pipe = tiny.save_tiny_sd(src, kind=kind, seed=3)
  if kind == "sd":
    r = subprocess.run([sys.executable, "-m", "didr_jax.convert", f"--src={src}", f"--dst={dst}",
                        "--export"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
  else:
    from didr_jax.pipelines import registry
    registry.load_pipeline(src).export_diffusers(dst)
  return kind, pipe, dst


def _same_weights(ours, theirs):
  a, b = ours.state_dict(), theirs.state_dict()
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


def _no_key_problems(info):
  for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(what), (what, info.get(what))


def test_text_encoders_load_in_transformers_with_classic_keys(exported):
  kind, pipe, dst = exported
  encoders = {"text_encoder": (transformers.CLIPTextModel, pipe.text_encoder)}
  if kind == "sdxl":
    encoders["text_encoder_2"] = (transformers.CLIPTextModelWithProjection, pipe.text_encoder_2)
  for name, (cls, source) in encoders.items():
    keys = _header_keys(os.path.join(dst, name, "model.safetensors"))
    flat = sorted(k for k in keys if not k.startswith(("text_model.", "text_projection.")))
    assert not flat, f"{name}: keys outside text_model. (transformers 4.x ignores them): {flat[:3]}"
    model, info = cls.from_pretrained(os.path.join(dst, name), output_loading_info=True)
    _no_key_problems(info)
    _same_weights(model, source)


def test_unet_and_vae_load_in_diffusers(exported):
  _, pipe, dst = exported
  for name, cls, source in (("unet", diffusers.UNet2DConditionModel, pipe.unet),
                            ("vae", diffusers.AutoencoderKL, pipe.vae)):
    model, info = cls.from_pretrained(os.path.join(dst, name), output_loading_info=True)
    _no_key_problems(info)
    _same_weights(model, source)
