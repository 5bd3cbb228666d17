"""DDPO on SDXL from a local diffusers folder (set --config.backbone.path=/models/sdxl).

Defaults follow the DDPO paper scaled to SDXL: DDIM eta 1, 50 steps, CFG 5, JPEG
compressibility (or incompressibility / toy rewards: --config.rewards='{"jpeg_incompressibility": 1.0}'),
per-prompt advantage buffers, PPO clip 1e-4, AdamW 1e-5 with weight decay 1e-4, grad clip 1.
Prompts: a text file, one per line (--config.prompts.train=/data/prompts.txt).
On a TPU pod set the mesh, e.g. --config.mesh.axes='(("data", -1), ("fsdp", 4), ("tensor", 1))'.
"""

from didr_jax.train import config as config_lib
from didr_jax.train.ddpo_config import ddpo_section


def get_config():
  c = config_lib.real_base("ddpo", "sdxl", {"jpeg_compressibility": 1.0}, num_epochs=100,
                          eval_every=10)
  c.sample.num_steps = 50
  c.sample.guidance_scale = 5.0
  c.sample.eta = 1.0
  c.sample.batch_size = 32
  c.sample.num_batches = 8
  c.train.batch_size = 32
  c.train.grad_accum = 2
  c.train.timestep_fraction = 1.0
  c.train.learning_rate = 1e-5
  c.ddpo = ddpo_section()
  c.eval.num_samples = 64
  c.eval.batch_size = 32
  c.eval.num_steps = 50
  return config_lib.finalize(c)
