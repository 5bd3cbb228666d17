"""Text-to-image sampling from a local model folder (diffusers format or our Orbax cache).

  python -m didr_jax.sample --model=/models/sdxl --prompt="a red circle" --out=samples/
  python -m didr_jax.sample --model=... --prompt=... --latents=init.npy   # NCHW, as diffusers

``--latents`` lets a user reproduce a diffusers image: save the initial latents that diffusers
used (``latents=`` argument, NCHW) with ``np.save`` and pass the file here.
"""

import os

import numpy as np
from absl import app, flags
from PIL import Image

from didr_jax.cli_util import quiet_logs
from didr_jax.pipelines import registry

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "local model folder")
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
flags.mark_flag_as_required("model")


def read_prompts() -> list[str]:
  prompts = list(FLAGS.prompt or [])
  if FLAGS.prompt_file:
    with open(FLAGS.prompt_file) as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    raise app.UsageError("no prompts: give --prompt or a non-empty --prompt_file")
  return prompts


def main(argv):
  quiet_logs()
  del argv
  prompts = read_prompts()
  pipe = registry.load_pipeline(FLAGS.model)
  latents = None
  if FLAGS.latents:
    latents = np.load(FLAGS.latents)
    if latents.ndim != 4 or latents.shape[0] != len(prompts):
      raise app.UsageError(f"--latents has shape {latents.shape}; expected NCHW with batch "
                           f"{len(prompts)} (one per prompt)")
    latents = latents.transpose(0, 2, 3, 1)
  images, _ = pipe.sample(prompts, num_steps=FLAGS.steps, guidance_scale=FLAGS.guidance,
                          eta=FLAGS.eta, height=FLAGS.height, width=FLAGS.width,
                          latents=latents, seed=FLAGS.seed)
  os.makedirs(FLAGS.out, exist_ok=True)
  for i, img in enumerate(np.asarray(images)):
    path = os.path.join(FLAGS.out, f"{i:04d}.png")
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
    print(path, prompts[i])


if __name__ == "__main__":
  app.run(main)
