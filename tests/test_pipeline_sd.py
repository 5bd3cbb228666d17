"""End to end: tiny random SD 1.x and SDXL pipelines saved by diffusers, converted, sampled with
DDIM from the same latents and prompts as diffusers; Orbax cache and diffusers export round trips;
the convert and sample commands."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from didr_jax.pipelines.sd import SDPipeline
from didr_jax.testing import tiny

PROMPTS = ["two red circles", "a blue square and a yellow triangle"]
STEPS = 4
GUIDANCE = 5.0


_BUILT = {}


def _build(kind, tmp_path_factory):
  if kind in _BUILT:
    return _BUILT[kind]
  folder = str(tmp_path_factory.mktemp(kind))
  pipe = tiny.save_tiny_sd(folder, kind=kind, seed=3)
  lat = tiny.initial_latents(len(PROMPTS), 4, 16, seed=1)
  with torch.no_grad():
    ref_latents = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       latents=torch.tensor(lat), output_type="latent", eta=0.0,
                       height=32, width=32).images.numpy()
    ref_images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=torch.tensor(lat), output_type="np", eta=0.0,
                      height=32, width=32).images
  _BUILT[kind] = {"kind": kind, "folder": folder, "latents": lat,
                  "ref_latents": ref_latents, "ref_images": ref_images}
  return _BUILT[kind]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def saved(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


def _sample(pipe, lat):
  images, traj = pipe.sample(PROMPTS, num_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                             latents=lat.transpose(0, 2, 3, 1), height=32, width=32)
  return np.asarray(images), np.asarray(traj.sample).transpose(0, 3, 1, 2)


def _close(got, want, tol):
  err = np.abs(got - want).max()
  scale = max(1.0, np.abs(want).max())
  assert err <= tol * scale, f"max abs err {err:.3g} (scale {scale:.3g})"
  return err


def test_matches_diffusers_pipeline(saved):
  pipe = SDPipeline.from_pretrained(saved["folder"])
  assert pipe.kind == saved["kind"]
  images, latents = _sample(pipe, saved["latents"])
  err_lat = _close(latents, saved["ref_latents"], 1e-4)
  err_img = _close(images, saved["ref_images"], 1e-4)
  print(f"{saved['kind']}: latents max abs err {err_lat:.2e}, images {err_img:.2e}")


def test_sample_splits_the_batch_over_the_mesh_of_the_parameters(saved):
  """Loaded onto a 2-device mesh, ``sample`` shards the batch (not the whole batch on each
  device) and still reproduces diffusers."""
  import jax
  from didr_jax.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:2])
  pipe = SDPipeline.from_pretrained(saved["folder"], mesh=mesh)
  images, traj = pipe.sample(PROMPTS, num_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                             latents=saved["latents"].transpose(0, 2, 3, 1), height=32,
                             width=32)
  assert traj.sample.sharding.spec[0] in ("data", ("data",)), traj.sample.sharding
  assert images.sharding.shard_shape(images.shape)[0] == 1
  _close(np.asarray(traj.sample).transpose(0, 3, 1, 2), saved["ref_latents"], 1e-4)
  _close(np.asarray(images), saved["ref_images"], 1e-4)


def test_sample_sees_updated_parameters_and_replaced_modules(saved):
  """``sample``'s jitted sampler takes the modules as arguments on every call: a parameter
  changed in place after a first call, and a module replaced by another, take effect."""
  pipe = SDPipeline.from_pretrained(saved["folder"])
  before, _ = _sample(pipe, saved["latents"])
  kernel = pipe.unet.conv_out.kernel
  kernel.set_value(kernel[...] * 0.5)
  halved, _ = _sample(pipe, saved["latents"])
  fresh = SDPipeline.from_pretrained(saved["folder"])
  fresh.unet.conv_out.kernel.set_value(fresh.unet.conv_out.kernel[...] * 0.5)
  np.testing.assert_allclose(halved, _sample(fresh, saved["latents"])[0], atol=1e-6)
  assert np.abs(halved - before).max() > 1e-3
  pipe.unet = SDPipeline.from_pretrained(saved["folder"]).unet   # the original weights again
  np.testing.assert_allclose(_sample(pipe, saved["latents"])[0], before, atol=1e-6)


def test_orbax_cache_and_diffusers_export_round_trip(saved, tmp_path):
  from diffusers import DiffusionPipeline
  pipe = SDPipeline.from_pretrained(saved["folder"])
  images, latents = _sample(pipe, saved["latents"])
  cache = str(tmp_path / "cache")
  pipe.save(cache)
  assert os.path.isdir(os.path.join(cache, "orbax_params"))
  assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(cache) for f in fs)
  cached = SDPipeline.from_pretrained(cache)
  images2, latents2 = _sample(cached, saved["latents"])
  np.testing.assert_array_equal(latents2, latents)

  out = str(tmp_path / "exported")
  cached.export_diffusers(out)
  back = DiffusionPipeline.from_pretrained(out)
  with torch.no_grad():
    ref = back(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               latents=torch.tensor(saved["latents"]), output_type="np", eta=0.0,
               height=32, width=32).images
  _close(ref, saved["ref_images"], 1e-6)  # exported weights are bit-identical


def test_negative_prompt_convention(saved):
  pipe = SDPipeline.from_pretrained(saved["folder"])
  neg = pipe.encode_negative(2, 32, 32)
  if saved["kind"] == "sdxl":  # force_zeros_for_empty_prompt
    assert float(np.abs(np.asarray(neg.context)).max()) == 0.0
    assert neg.pooled.shape == (2, 32) and neg.time_ids.shape == (2, 6)
  else:
    np.testing.assert_allclose(neg.context, pipe.encode(["", ""]).context)


def test_convert_and_sample_commands(tmp_path, tmp_path_factory):
  saved = _build("sdxl", tmp_path_factory)
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
  cache = str(tmp_path / "cache")
  subprocess.run([sys.executable, "-m", "didr_jax.convert", f"--src={saved['folder']}",
                  f"--dst={cache}"], check=True, env=env, capture_output=True)
  lat_file = str(tmp_path / "lat.npy")
  np.save(lat_file, saved["latents"])
  out = str(tmp_path / "png")
  cmd = [sys.executable, "-m", "didr_jax.sample", f"--model={cache}", f"--out={out}",
         f"--steps={STEPS}", f"--guidance={GUIDANCE}", f"--latents={lat_file}",
         "--height=32", "--width=32"] + [f"--prompt={p}" for p in PROMPTS]
  # the sampling command splits the CPU into 2 devices and the 2 prompts over them
  split = {k: v for k, v in env.items() if k != "JAX_NUM_CPU_DEVICES"}
  r = subprocess.run(cmd + ["--cpu_devices=2"], check=True, env=split, capture_output=True,
                     text=True)
  assert "sampled 2 images on 2 cpu device(s)" in r.stdout, r.stdout
  from PIL import Image
  for i in range(len(PROMPTS)):
    png = np.asarray(Image.open(os.path.join(out, f"{i:04d}.png"))).astype(np.float32)
    want = np.round(saved["ref_images"][i] * 255)
    assert np.abs(png - want).max() <= 1.0
  bad = subprocess.run(cmd[:-2] + [f"--prompt={PROMPTS[0]}"], env=env, capture_output=True,
                       text=True)
  assert bad.returncode != 0 and "expected NCHW with batch 1" in bad.stderr
