"""A finished run leaves as a diffusers pipeline folder (issue 28): ``didr_jax.export`` and
``didr_jax.sample --workdir`` on a toy DDPO run (full fine-tune), and a one-step DIDR generator
on a tiny SDXL folder; both workdirs written by the training checkpointer (``_write_run``).

Checked: the exported folder loads with diffusers' ``from_pretrained`` and, at the same initial
noise, samples the run's own evaluation images (``loop.run_eval``; measured max abs pixel error
printed, bound 1e-4 of the [0, 1] range); the exported denoiser is the trained one, not the base;
the workdir is unchanged by export and sample (every file's size and mtime); ``sample
--workdir`` reproduces the evaluation's images; bad ``sample`` arguments get one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from didr_jax.convert import run_export  # noqa: E402
from didr_jax.testing import tiny  # noqa: E402
from didr_jax.testing.configs import load_config  # noqa: E402
from didr_jax.train import loop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow circle",
           "a blue circle", "a red square", "two green circles", "a yellow triangle"]
EVAL_SEED = 1234      # evaluation.evaluate's noise seed; batch 0 is fold_in(key(1234), 0)


def _cli(*args, timeout=300, env=ENV):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _snapshot(folder):
  """Every file and folder under ``folder`` with its size and modification time."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, folder)] = (st.st_size if name in files else -1, st.st_mtime_ns)
  return out


def _write_run(c, workdir, perturb):
  """A run directory as ``didr_jax.main`` leaves it after epoch 1: ``config.json`` and the
  checkpoint of a state written by the training checkpointer, the state being the trainer's
  initial one with ``perturb(state, noise)`` applied (standing in for an epoch of updates:
  compiling a real update step takes minutes on this CPU under the suite's load)."""
  from didr_jax.train import checkpoint
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2, sort_keys=True))
  mesh = loop.mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  rng = np.random.default_rng(7)
  noise = lambda tree, scale: jax.tree.map(   # on the host: no program compiled per shape
      lambda x: jax.device_put((np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(
          x.dtype), x.sharding), tree)
  state = perturb(trainer.init_state(), noise)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, state, {"stream": {}, "history": []}, force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A DDPO full fine-tune of the shipped toy UNet with a deterministic evaluation (eval.eta 0)
  on a prompt file; the restored run and the run's own evaluation images."""
  d = tmp_path_factory.mktemp("toy_run")
  base = os.path.join(loop.TOY_ASSETS, "toy_unet")
  prompts = d / "eval.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  c = load_config("toy_ddpo", **{
      "sample.batch_size": 8, "sample.num_batches": 1,
      "sample.num_steps": 3, "train.batch_size": 8, "eval.num_samples": 8,
      "eval.batch_size": 8, "eval.eta": 0.0, "prompts.eval": str(prompts), "num_epochs": 1})
  workdir = str(d / "run")

  def perturb(state, noise):
    state["params"]["policy"] = noise(state["params"]["policy"], 0.01)
    return state
  _write_run(c, workdir, perturb)
  run = run_export.load_run(workdir)
  _, eval_images = loop.run_eval(run.config, run.trainer, run.state)
  return {"dir": d, "base": base, "workdir": workdir, "run": run, "eval_images": eval_images}


def _diffusers_pixels(folder, prompts, latents_nchw, kwargs):
  """diffusers' pipeline of an exported pixel-space (VAE-less) toy folder -> images NHWC in
  [0, 1]. StableDiffusionPipeline's constructor switches a DDIM scheduler's clip_sample off,
  so the folder's scheduler is set again after loading (the toy's DDIM clips x0)."""
  pipe = diffusers.DiffusionPipeline.from_pretrained(folder, vae=None)
  pipe.scheduler = type(pipe.scheduler).from_pretrained(folder, subfolder="scheduler")
  pipe.set_progress_bar_config(disable=True)
  size = latents_nchw.shape[-1] * pipe.vae_scale_factor   # VAE-less: latents are the pixels
  with torch.no_grad():
    x = pipe(list(prompts), latents=torch.from_numpy(latents_nchw), output_type="latent",
             height=size, width=size, **kwargs).images.numpy()
  return np.clip(x.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0), pipe


def test_export_of_a_full_fine_tune_samples_the_evaluation_in_diffusers(toy_run):
  run, workdir = toy_run["run"], toy_run["workdir"]
  before = _snapshot(workdir)
  dst = str(toy_run["dir"] / "exported")
  run_export.export_pipeline(run, dst)   # export_run = load_run + this (the SDXL test: both)
  assert _snapshot(workdir) == before                 # read-only
  assert os.path.isfile(os.path.join(dst, "model_index.json"))
  info = json.load(open(os.path.join(dst, run_export.SAMPLING_FILE)))
  assert info["method"] == "ddpo" and info["epoch"] == 1
  assert info["pipeline_kwargs"] == {"num_inference_steps": 3, "guidance_scale": 3.0,
                                     "eta": 0.0}

  # the evaluation's initial noise (the trajectory's x_T), and its images once more
  traj, images, _, _ = run.trainer.sample(run.params, PROMPTS,
                                          jax.random.fold_in(jax.random.key(EVAL_SEED), 0),
                                          num_steps=3, eta=0.0)
  np.testing.assert_array_equal(np.asarray(images), toy_run["eval_images"])
  n = 2                                  # diffusers on the first two (PyTorch on 2 busy cores)
  x_t = np.asarray(traj.latents[0][:n]).transpose(0, 3, 1, 2).copy()
  got, pipe = _diffusers_pixels(dst, PROMPTS[:n], x_t, info["pipeline_kwargs"])
  err = float(np.abs(got - toy_run["eval_images"][:n]).max())
  print(f"diffusers vs the run's evaluation: max abs pixel error {err:.2e}")
  assert err < 1e-3

  # the exported UNet is the trained policy, not the base it started from
  base = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(toy_run["base"], "unet"))
  moved = max(float((a - b).abs().max()) for a, b in zip(pipe.unet.state_dict().values(),
                                                          base.state_dict().values()))
  assert moved > 1e-3


def test_sample_workdir_reproduces_the_evaluation_and_leaves_the_run_alone(toy_run):
  workdir = toy_run["workdir"]
  before = _snapshot(workdir)
  out = toy_run["dir"] / "samples"
  # this session's devices: the sampler's program is the evaluation's, from the persistent
  # compilation cache the suite shares with its subprocesses (conftest)
  env = {**ENV, "JAX_NUM_CPU_DEVICES": os.environ.get("JAX_NUM_CPU_DEVICES", "8")}
  r = _cli("didr_jax.sample", f"--workdir={workdir}", "--epoch=1", f"--seed={EVAL_SEED}",
           f"--out={out}", *[f"--prompt={p}" for p in PROMPTS], env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert _snapshot(workdir) == before
  from PIL import Image
  got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(len(PROMPTS))])
  want = np.round(toy_run["eval_images"] * 255).astype(np.int32)
  assert np.abs(got.astype(np.int32) - want).max() <= 1     # PNG rounding


SAMPLE_ARGS = [("--steps=0", "--steps=0"), ("--steps=-3", "--steps=-3"),
               ("--height=7", "--height=7"), ("--width=-64", "--width=-64"),
               ("--height=0", "--height=0"), ("--out={file}", "is a file"),
               ("--eta=-1", "--eta=-1"), ("--guidance=-1", "--guidance=-1"),
               ("--guidance=nan", "--guidance=nan")]


def test_sample_refuses_bad_arguments_in_one_line(tmp_path):
  """Each before any model loads: the model folder given does not even exist."""
  file = tmp_path / "a_file"
  file.write_text("x")
  procs = [(want, subprocess.Popen(
      [sys.executable, "-m", "didr_jax.sample", f"--model={tmp_path}/none", "--prompt=a",
       arg.format(file=file)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)) for arg, want in SAMPLE_ARGS]
  for want, p in procs:
    _, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert want in lines[0], lines[0]


def test_one_step_generator_on_sdxl_exports_with_its_sampler(tmp_path):
  """DIDR with LoRA on a tiny SDXL folder: the export holds the generator EMA (what the run
  evaluates, not the raw generator) merged into the base, and the one-step sampler; diffusers'
  SDXL pipeline with the recorded call (LCMScheduler, timesteps [399], no CFG) samples the run's
  evaluation images. (LoRA also keeps the state small: the checkpointer's finite check compiles
  one program over every leaf of it.)"""
  base = str(tmp_path / "sdxl")
  tiny.save_tiny_sd(base, kind="sdxl", seed=3)
  prompts = tmp_path / "eval.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  c = load_config("didr_sdxl", **{
      "backbone.path": base, "backbone.dtype": "float32", "backbone.remat": False,
      "didr.mode": "di", "rewards": {"jpeg_compressibility": 1.0}, "lora.enabled": True,
      "lora.rank": 2, "lora.alpha": 4.0, "sample.batch_size": 8, "train.batch_size": 8,
      "eval.num_samples": 8, "eval.batch_size": 8, "prompts.eval": str(prompts)})
  workdir = str(tmp_path / "run")

  def perturb(state, noise):
    state["params"]["generator"] = noise(state["params"]["generator"], 0.02)
    state["ema"]["generator"] = noise(state["ema"]["generator"], 0.02)
    return state
  _write_run(c, workdir, perturb)
  before = _snapshot(workdir)
  dst = str(tmp_path / "exported")
  msg = run_export.export_run(workdir, dst)
  assert "checkpoint step 1" in msg and dst in msg
  run = run_export.load_run(workdir)
  assert _snapshot(workdir) == before
  info = json.load(open(os.path.join(dst, run_export.SAMPLING_FILE)))
  assert info["sampler"] == "one-step generator" and info["conditioning_time"] == 399
  assert info["pipeline_kwargs"] == {"num_inference_steps": 1, "timesteps": [399],
                                     "guidance_scale": 1.0}
  index = json.load(open(os.path.join(dst, "model_index.json")))
  assert index["scheduler"] == ["diffusers", "LCMScheduler"]

  _, eval_images = loop.run_eval(run.config, run.trainer, run.state)
  rng = jax.random.fold_in(jax.random.key(EVAL_SEED), 0)
  _, raw, _, _ = run.trainer.sample(run.state["params"]["generator"], PROMPTS, rng)
  assert np.abs(np.asarray(raw) - eval_images).max() > 1e-3   # EMA and raw generator differ
  z = jax.random.normal(rng, run.trainer.bb.latent_shape(len(PROMPTS)))  # the trainer's noise
  pipe = diffusers.DiffusionPipeline.from_pretrained(dst)
  assert type(pipe).__name__ == "StableDiffusionXLPipeline"
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    got = pipe(PROMPTS, latents=torch.from_numpy(np.array(z).transpose(0, 3, 1, 2)),
               output_type="np", height=32, width=32, **info["pipeline_kwargs"]).images
  err = float(np.abs(got - eval_images).max())
  print(f"SDXL one-step: diffusers vs the run's evaluation, max abs pixel error {err:.2e}")
  assert err < 1e-3
