"""Text-to-image sampling from a local model folder (diffusers format or our Orbax cache) or
straight from a training run.

  python -m didr_jax.sample --model=/models/sdxl --prompt="a red circle" --out=samples/
  python -m didr_jax.sample --model=... --prompt=... --latents=init.npy   # NCHW, as diffusers
  python -m didr_jax.sample --workdir=workdirs/toy_ddpo [--epoch=N] --prompt=... --out=...

``--latents`` lets a user reproduce a diffusers image: save the initial latents that diffusers
used (``latents=`` argument, NCHW) with ``np.save`` and pass the file here.

``--workdir`` samples with what the run evaluates (``trainer.policy_params``: DDPO's / CRD's
policy, DIDR's / TDM's generator EMA) at its latest or ``--epoch`` checkpoint, with the run's
own sampler (its evaluation's steps, eta and CFG unless ``--steps`` / ``--eta`` /
``--guidance`` say otherwise; one- and few-step generators take none of them): the images of
its evaluation for the same prompts and ``--seed``'s noise. The workdir is only read (no lock,
nothing moved or written), so a live run can be sampled.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from PIL import Image

from didr_jax.cli_util import compile_cache, fail, quiet_logs, run
from didr_jax.errors import PromptError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "local model folder")
flags.DEFINE_string("workdir", None, "a training run's directory (instead of --model)")
flags.DEFINE_integer("epoch", None, "with --workdir: the checkpoint epoch (default: the latest)")
flags.DEFINE_multi_string("prompt", None, "prompt(s); repeat the flag for a batch")
flags.DEFINE_string("prompt_file", None, "file with one prompt per line")
flags.DEFINE_string("out", "samples", "output folder for PNGs")
flags.DEFINE_integer("steps", 50, "denoising steps")
flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
flags.DEFINE_float("eta", 0.0, "DDIM eta (VP models) / SDE noise level (flow models)")
flags.DEFINE_integer("seed", 0, "seed for the initial noise")
flags.DEFINE_integer("height", None, "image height in pixels")
flags.DEFINE_integer("width", None, "image width in pixels")
flags.DEFINE_string("latents", None, ".npy initial latents in diffusers' NCHW layout")
flags.DEFINE_integer("cpu_devices", 0, "on a CPU: JAX devices to split the cores into, the "
                     "prompts sharded over them; 0 = one per core as the prompt count allows")


def check_flags() -> None:
  """The flags' values, checked before anything loads (one ``error:`` line each)."""
  f = FLAGS
  if (f.model is None) == (f.workdir is None):
    raise app.UsageError("give one of --model=FOLDER (a pipeline folder) or --workdir=RUN (a "
                         "training run)" + ("" if f.model is None else ", not both"))
  if f.epoch is not None and f.workdir is None:
    raise app.UsageError("--epoch applies to --workdir (a training run's checkpoint)")
  if f.epoch is not None and f.epoch < 0:
    raise app.UsageError(f"--epoch={f.epoch}: must be >= 0")
  if f.steps < 1:
    raise app.UsageError(f"--steps={f.steps}: must be >= 1")
  for name in ("height", "width"):
    v = f[name].value
    if v is not None and (v <= 0 or v % 8):
      raise app.UsageError(f"--{name}={v}: must be a positive multiple of 8 pixels")
  if not np.isfinite(f.eta) or f.eta < 0:
    raise app.UsageError(f"--eta={f.eta}: must be >= 0 (DDIM eta / flow SDE noise level; "
                         "0 = deterministic)")
  if not np.isfinite(f.guidance) or f.guidance < 0:
    raise app.UsageError(f"--guidance={f.guidance}: must be a finite number >= 0 (1 = no "
                         "classifier-free guidance)")
  if f.cpu_devices < 0:
    raise app.UsageError(f"--cpu_devices={f.cpu_devices}: must be >= 0")
  from didr_jax.convert.run_export import check_output_folder
  check_output_folder(f.out, "--out", empty=False)
  if f.workdir is not None:
    given = [n for n in ("latents", "height", "width") if f[n].present]
    if given:
      raise app.UsageError(
          f"--{given[0]} applies to --model; a run samples at its own size and noise (--seed): "
          "export it (python -m didr_jax.export) and sample the folder with --model")


def read_prompts() -> list[str]:
  prompts = list(FLAGS.prompt or [])
  if FLAGS.prompt_file:
    from didr_jax.train.prompts import load_prompts  # lazy: jax loads after the flag checks
    try:
      prompts += load_prompts(FLAGS.prompt_file)
    except PromptError as e:
      raise app.UsageError(f"--prompt_file: {e}") from None
  if not prompts:
    raise app.UsageError("no prompts: give --prompt or a non-empty --prompt_file")
  return prompts


_NPY_MAGIC = b"\x93NUMPY"


def read_latents(path: str, batch: int) -> np.ndarray:
  """The float32 NCHW initial latents of ``--latents`` (a ``.npy`` of one finite float array
  with one row per prompt); anything else is refused with one line."""
  try:
    with open(path, "rb") as f:
      head = f.read(6)
  except OSError as e:
    raise app.UsageError(f"--latents={path}: {e.strerror or e}") from None
  if head[:4] == b"PK\x03\x04":
    raise app.UsageError(f"--latents={path} is an .npz archive; save the one NCHW array with "
                         "np.save(path, latents) instead")
  if head != _NPY_MAGIC:
    raise app.UsageError(f"--latents={path} is not a .npy file; save the NCHW latents with "
                         "np.save(path, latents)")
  try:
    latents = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise app.UsageError(f"--latents={path}: cannot read it as a plain array ({e})") from None
  if not np.issubdtype(latents.dtype, np.floating):
    raise app.UsageError(f"--latents={path} holds {latents.dtype} values; expected floats")
  if latents.ndim != 4 or latents.shape[0] != batch:
    raise app.UsageError(f"--latents has shape {latents.shape}; expected NCHW with batch "
                         f"{batch} (one per prompt)")
  bad = int(np.size(latents) - np.isfinite(latents).sum())
  if bad:
    raise app.UsageError(f"--latents={path} holds {bad} NaN or infinite values; initial latents "
                         "must be finite")
  return latents.astype(np.float32)


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_flags()
  prompts = read_prompts()
  if FLAGS.workdir is not None:
    images = sample_run(prompts)
  else:
    compile_cache()  # the default cache directory (JAX_COMPILATION_CACHE_DIR overrides it)
    images = sample_model(prompts)
  images = np.asarray(images)
  if not np.all(np.isfinite(images)):
    fail("the model produced NaN or infinite pixels; no image written", code=1)
  os.makedirs(FLAGS.out, exist_ok=True)
  for i, img in enumerate(images):
    path = os.path.join(FLAGS.out, f"{i:04d}.png")
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
    print(path, prompts[i])
  import jax
  print(f"sampled {len(images)} images on {jax.device_count()} {jax.default_backend()} "
        f"device(s)")


def sample_model(prompts: list[str]) -> np.ndarray:
  """``--model``: the folder's pipeline with the DDIM / flow sampler of the flags."""
  latents = None if not FLAGS.latents else read_latents(FLAGS.latents, len(prompts))
  from didr_jax.parallel import mesh as mesh_lib  # lazy: jax loads after the flag checks
  mesh_lib.split_cpu(mesh_lib.cpu_device_count(FLAGS.cpu_devices, [len(prompts)]))
  from didr_jax.pipelines import registry  # lazy: jax loads after the flag checks
  registry.check_folder(FLAGS.model)  # headers only: a bad folder fails before loading
  pipe = registry.load_pipeline(FLAGS.model, mesh=mesh_lib.make_mesh())  # batch over devices
  pipe.warn_long_prompts(prompts, max_tokens=getattr(pipe, "max_sequence_length", None))
  if latents is not None:
    b, h, w, ch = pipe.latent_shape(len(prompts), FLAGS.height, FLAGS.width)
    if latents.shape[1:] != (ch, h, w):
      raise app.UsageError(
          f"--latents has shape {latents.shape}; this model at {h * pipe.vae_scale}x"
          f"{w * pipe.vae_scale} pixels expects NCHW {(b, ch, h, w)} (set --height / --width "
          "for another size)")
    latents = latents.transpose(0, 2, 3, 1)
  images, _ = pipe.sample(prompts, num_steps=FLAGS.steps, guidance_scale=FLAGS.guidance,
                          eta=FLAGS.eta, height=FLAGS.height, width=FLAGS.width,
                          latents=latents, seed=FLAGS.seed)
  return images


def sample_run(prompts: list[str]) -> np.ndarray:
  """``--workdir``: the run's evaluated parameters through its trainer's own sampler, the
  noise from ``--seed`` (read-only: ``run_export.load_run``)."""
  from didr_jax.convert import run_export
  from didr_jax.parallel import mesh as mesh_lib  # lazy: jax loads after the flag checks
  c = run_export.read_run_config(FLAGS.workdir)
  from didr_jax.train import methods  # lazy: imports jax; the flag checks run before it
  multi_step = methods.get(c.method).policy
  given = [n for n in ("steps", "eta", "guidance") if FLAGS[n].present]
  if given and not multi_step:
    raise app.UsageError(f"--{given[0]}: the {c.method} run's generator samples with its own "
                         "fixed steps and guidance; leave the flag out")
  compile_cache(c.compile_cache_dir)
  mesh_lib.split_cpu(mesh_lib.cpu_device_count(FLAGS.cpu_devices, [len(prompts)],
                                               tuple(tuple(a) for a in c.mesh.axes)))
  run = run_export.load_run(FLAGS.workdir, epoch=FLAGS.epoch)
  run.trainer.bb.warn_long_prompts(prompts)
  ev = c.eval
  kwargs = {}
  if multi_step:
    kwargs = {"num_steps": FLAGS.steps if FLAGS["steps"].present else (
                  ev.num_steps if ev.num_steps > 0 else c.sample.num_steps),
              "eta": FLAGS.eta if FLAGS["eta"].present else ev.eta}
    if FLAGS["guidance"].present:
      kwargs["guidance"] = FLAGS.guidance
  import jax
  from didr_jax.train import common  # lazy: jax loads after the flag checks
  print(f"sampling with {run.workdir} at epoch {run.step} ({c.method})", flush=True)
  # the noise of an evaluation's first batch: --seed=1234 (evaluation.evaluate's) and the
  # evaluation's first eval.batch_size prompts give its images
  rng = jax.random.fold_in(jax.random.key(FLAGS.seed), 0)
  _, images, _, _ = run.trainer.sample(run.params, prompts, rng, **kwargs)
  return common.all_rows(images)


if __name__ == "__main__":
  run(main)
