"""End to end on a tiny random diffusers ZImagePipeline: converted and sampled (Euler, CFG on)
from the same latents and prompts as diffusers; diffusers' CFG options and negative prompts; the
Flow-GRPO SDE rollout against an independent PyTorch loop; Orbax cache and diffusers export
round trips; the sample and convert commands."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from didr_jax.pipelines.zimage import ZImagePipeline
from didr_jax.testing import tiny_zimage

PROMPTS = ["two red circles", "a blue square and a yellow triangle"]
NEGATIVES = ["blurry", "a green circle"]
STEPS = 4
W = 4.5          # our (standard) CFG scale; diffusers' ZImagePipeline takes W - 1
SIZE = 32        # pixels; the tiny VAE halves it -> 16 x 16 x 16 latents, 8 x 8 DiT tokens


def _err(got, want):
  """(max abs error, max abs error / max(1, max |want|))."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  e = float(np.abs(got - want).max())
  return e, e / max(1.0, float(np.abs(want).max()))


def _close(got, want, tol, what):
  abs_err, rel = _err(got, want)
  print(f"{what}: max abs err {abs_err:.2e} (scaled {rel:.2e})")
  assert rel <= tol, f"{what}: max abs err {abs_err:.3g} (scaled {rel:.3g})"
  return abs_err


def _diffusers(tp, lat, images=True, **kw):
  """diffusers' ZImagePipeline on NCHW ``lat``: (final latents NCHW, images NHWC in [0, 1] or
  None)."""
  kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=W - 1,
            latents=torch.tensor(lat)) | kw
  # the pipeline rewrites prompt lists in place: every call gets fresh copies
  fresh = lambda: {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}
  with torch.no_grad():
    latents = tp(list(PROMPTS), output_type="latent", **fresh()).images.numpy()
    if images:
      images = tp(list(PROMPTS), output_type="np", **fresh()).images
  return latents, images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("zimage"))
  tp = tiny_zimage.save_tiny_zimage(folder, seed=3, image_size=SIZE)
  lat = np.random.default_rng(1).standard_normal((len(PROMPTS), 16, 16, 16)).astype(np.float32)
  ref_latents, ref_images = _diffusers(tp, lat)
  return {"folder": folder, "torch": tp, "latents": lat, "ref_latents": ref_latents,
          "ref_images": ref_images}


@pytest.fixture(scope="module")
def pipe(saved):
  return ZImagePipeline.from_pretrained(saved["folder"])


def _sample(p, lat, **kw):
  images, traj = p.sample(PROMPTS, num_steps=STEPS, guidance_scale=W, eta=0.0,
                          latents=lat.transpose(0, 2, 3, 1), height=SIZE, width=SIZE, **kw)
  return np.asarray(images), np.asarray(traj.sample).transpose(0, 3, 1, 2)


def test_matches_diffusers_pipeline(saved, pipe):
  assert pipe.resolution == SIZE and pipe.family == "flow"
  assert pipe.latent_shape(2) == (2, 16, 16, 16)
  tp = saved["torch"]
  tp.scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / STEPS, STEPS).tolist(), mu=0.0)
  np.testing.assert_allclose(pipe.sigmas(STEPS, (2, 16, 16, 16)), tp.scheduler.sigmas.numpy(),
                             rtol=0, atol=1e-7)  # static shift 3: mu is unused
  images, latents = _sample(pipe, saved["latents"])
  assert np.abs(saved["ref_latents"]).max() > 1.0  # a non-trivial trajectory
  _close(latents, saved["ref_latents"], 1e-4, "final latents")
  _close(images, saved["ref_images"], 1e-4, "decoded images")


def test_cfg_options_and_negative_prompts_match_diffusers(saved, pipe):
  opts = dict(cfg_normalization=1.1, cfg_truncation=0.3)
  # truncation: CFG is off at the steps whose progress 1 - sigma exceeds 0.3 (here the last)
  progress = 1 - pipe.sigmas(STEPS, (2, 16, 16, 16))[:-1]
  assert (progress > 0.3).any() and (progress <= 0.3).any()
  ref_latents, ref_images = _diffusers(saved["torch"], saved["latents"],
                                       negative_prompt=list(NEGATIVES), **opts)
  # each option changes the result, so this test checks them rather than plain CFG again
  normalized, _ = _diffusers(saved["torch"], saved["latents"], False, cfg_normalization=1.1)
  truncated, _ = _diffusers(saved["torch"], saved["latents"], False, cfg_truncation=0.3)
  for other in (normalized, truncated, ref_latents):
    assert _err(other, saved["ref_latents"])[0] > 1e-2
  images, latents = _sample(pipe, saved["latents"], negative_prompts=NEGATIVES, **opts)
  _close(latents, ref_latents, 1e-4, "latents with cfg options + negatives")
  _close(images, ref_images, 1e-4, "images with cfg options + negatives")


def _flow_grpo_reference(tp, lat, noise, a):
  """An independent SDE loop in PyTorch: the pipeline's prompt embeddings and sigma grid,
  diffusers' transformer with its t = (1000 - T) / 1000 and sign, and Flow-GRPO's
  ``sde_step_with_logprob`` written out. Returns (latents (n+1, B, C, H, W), log_probs (n, B))."""
  with torch.no_grad():
    pos, neg = tp.encode_prompt(list(PROMPTS), device=torch.device("cpu"),
                                do_classifier_free_guidance=True)
  tp.scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / STEPS, STEPS).tolist(), mu=0.0)
  sigmas = tp.scheduler.sigmas.double()
  sigma_max = sigmas[1]
  x = torch.tensor(lat, dtype=torch.float64)
  xs, lps = [x], []
  b = len(PROMPTS)
  for i in range(STEPS):
    s, s_next = sigmas[i], sigmas[i + 1]
    with torch.no_grad():
      t = torch.full((2 * b,), float((1000 - (s * 1000).float()) / 1000), dtype=torch.float32)
      out = tp.transformer(list(x.float().repeat(2, 1, 1, 1).unsqueeze(2).unbind(0)), t,
                           pos + neg, return_dict=False)[0]
    out = torch.stack(out)[:, :, 0].double()
    p, n_ = out[:b], out[b:]
    v = -(p + (W - 1) * (p - n_))
    dt = s_next - s
    std_t = torch.sqrt(s / (1 - torch.where(s == 1, sigma_max, s))) * a
    mean = x * (1 + std_t ** 2 / (2 * s) * dt) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    x = mean + std * torch.tensor(noise[i], dtype=torch.float64)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * np.log(2 * np.pi)
    lps.append(lp.mean(dim=(1, 2, 3)))
    xs.append(x)
  return torch.stack(xs).numpy(), torch.stack(lps).numpy()


def test_sde_rollout_matches_independent_loop(saved, pipe):
  a = 0.7
  lat = saved["latents"]
  noise = np.random.default_rng(2).standard_normal((STEPS,) + lat.shape).astype(np.float32)
  ref_lat, ref_lp = _flow_grpo_reference(saved["torch"], lat, noise, a)
  # the trainers' path: fixed-length captions (caption_length 256 >> the prompts' tokens)
  cond, uncond = pipe.encode(PROMPTS), pipe.negative(1)
  assert cond.embeds.shape[1] == pipe.caption_length == uncond.mask.shape[1]

  @nnx.jit
  def run(model, cond, uncond, x, noise):
    denoise = lambda x, t: pipe.denoise(model, x, t, cond, uncond, jnp.float32(W))
    return pipe.rollout(denoise, x, num_steps=STEPS, eta=jnp.float32(a), rng=None, noise=noise,
                        return_outputs=True)

  traj = run(pipe.model, cond, uncond, jnp.asarray(lat.transpose(0, 2, 3, 1)),
             jnp.asarray(noise.transpose(0, 1, 3, 4, 2)))
  ours = np.asarray(traj.latents).transpose(0, 1, 4, 2, 3)
  _close(ours, ref_lat, 1e-4, "SDE trajectory")
  _close(traj.log_probs, ref_lp, 1e-4, "SDE log-probs")
  # log_prob of the stored transitions under the sampling-time outputs: the rollout's values
  for i in range(STEPS):
    lp, _, std = pipe.log_prob(traj.outputs[i], traj.latents[i], traj.latents[i + 1],
                               traj.timesteps[i], traj.next_timesteps[i], eta=a)
    assert float(std) > 0
    np.testing.assert_allclose(lp, traj.log_probs[i], rtol=0, atol=2e-5)


def test_training_pair_is_a_flow_matching_pair(pipe):
  x0 = jax.random.normal(jax.random.key(0), (3, 16, 16, 16))
  x_t, sig, v = pipe.training_pair(jax.random.key(1), x0)
  assert sig.shape == (3,) and bool(jnp.all((sig >= 0) & (sig < 1)))
  eps = v + x0
  np.testing.assert_allclose(x_t, (1 - sig[:, None, None, None]) * x0
                             + sig[:, None, None, None] * eps, atol=1e-5)
  assert abs(float(jnp.std(eps)) - 1.0) < 0.1  # the target is eps - x0 for Gaussian eps
  with pytest.raises(ValueError, match="multiples of 4"):
    pipe.latent_shape(1, 30, 32)


def test_orbax_cache_and_diffusers_export_round_trip(saved, pipe, tmp_path):
  from diffusers import DiffusionPipeline
  _, latents = _sample(pipe, saved["latents"])
  cache = str(tmp_path / "cache")
  pipe.save(cache)
  assert os.path.isdir(os.path.join(cache, "orbax_params"))
  assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(cache) for f in fs)
  cached = ZImagePipeline.from_pretrained(cache)
  _, latents2 = _sample(cached, saved["latents"])
  np.testing.assert_array_equal(latents2, latents)

  out = str(tmp_path / "exported")
  cached.export_diffusers(out)
  back = DiffusionPipeline.from_pretrained(out)
  assert type(back).__name__ == "ZImagePipeline"
  for name in ("transformer", "text_encoder", "vae"):  # bit-identical weights
    ref = saved["torch"].components[name].state_dict()
    got = back.components[name].state_dict()
    assert sorted(got) == sorted(ref), name
    for k in ref:
      assert torch.equal(got[k], ref[k]), (name, k)


def test_scanned_layers_sample_the_same_and_caches_load_in_either_form(saved, pipe, tmp_path):
  """``scan_layers``: the DiT's main layers stacked (one ``nnx.scan``) sample what the unrolled
  layers sample; an Orbax cache written in one layer form loads in the other, restacked and
  placed on the mesh as the loaders place it."""
  from didr_jax.models import zimage_dit
  from didr_jax.parallel import mesh as mesh_lib
  folder = saved["folder"]
  scanned = ZImagePipeline.from_pretrained(folder, scan_layers=True)
  assert scanned.transformer.scan_layers and not pipe.transformer.scan_layers
  n = scanned.transformer.config.n_layers
  assert scanned.transformer.layers.attention.to_q.kernel.shape[0] == n
  _, want = _sample(pipe, saved["latents"])
  _, got_scanned = _sample(scanned, saved["latents"])
  _close(got_scanned, want, 1e-5, "scanned vs unrolled DiT, sampled latents")

  mesh = mesh_lib.make_mesh((("data", -1), ("fsdp", 2), ("tensor", 1)))
  unrolled_cache, scanned_cache = str(tmp_path / "unrolled"), str(tmp_path / "scanned")
  pipe.save(unrolled_cache)
  scanned.save(scanned_cache)
  for cache, form in ((unrolled_cache, True), (scanned_cache, False)):
    loaded = ZImagePipeline.from_pretrained(cache, scan_layers=form, mesh=mesh)
    assert loaded.transformer.scan_layers == form
    ref = (scanned if form else pipe).transformer
    want_params = dict(zimage_dit.core.param_paths(ref))
    for path, var in zimage_dit.core.param_paths(loaded.transformer):
      np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want_params[path][...]))
      target = mesh_lib.param_sharding(var, mesh, mesh_lib.DEFAULT_RULES)
      assert var[...].sharding.is_equivalent_to(target, var[...].ndim), path
    _, got = _sample(loaded, saved["latents"])
    _close(got, got_scanned if form else want, 1e-5, f"cache restacked to scan_layers={form}")


def test_sample_and_convert_commands(saved, tmp_path):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
  lat_file = str(tmp_path / "lat.npy")
  np.save(lat_file, saved["latents"])
  out = str(tmp_path / "png")
  cmd = [sys.executable, "-m", "didr_jax.sample", f"--model={saved['folder']}", f"--out={out}",
         f"--steps={STEPS}", f"--guidance={W}", f"--latents={lat_file}"]
  subprocess.run(cmd + [f"--prompt={p}" for p in PROMPTS], check=True, env=env,
                 capture_output=True)
  from PIL import Image
  for i in range(len(PROMPTS)):
    png = np.asarray(Image.open(os.path.join(out, f"{i:04d}.png"))).astype(np.float32)
    want = np.round(saved["ref_images"][i] * 255)
    assert png.shape == (SIZE, SIZE, 3) and np.abs(png - want).max() <= 1.0
  cache = str(tmp_path / "cache")
  subprocess.run([sys.executable, "-m", "didr_jax.convert", f"--src={saved['folder']}",
                  f"--dst={cache}"], check=True, env=env, capture_output=True)
  assert os.path.isdir(os.path.join(cache, "orbax_params"))
  assert os.path.exists(os.path.join(cache, "tokenizer", "tokenizer.json"))
