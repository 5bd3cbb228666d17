"""DDPO (Flow-GRPO style) on the toy shapes world with the shipped pixel-space DiT base (a tiny
Z-Image: the same transformer, Qwen3 text encoder and flow sampler as ``ddpo_zimage.py``),
rewarded by the toy detector. Runs on a laptop CPU.

The policy is the flow SDE with noise level a = 0.7 (evaluation samples with it too), groups of
8 images per prompt with group-relative advantages, PPO clip 1e-4, no KL to the reference.
"""

from didr_jax.train import config as config_lib
from didr_jax.train.ddpo import ddpo_section


def get_config():
  c = config_lib.base_config()
  c.method = "ddpo"
  c.backbone.kind = "toy_dit"
  c.rewards = {"toy_detector": 1.0}
  c.num_epochs = 40
  c.eval_every = 0
  c.sample.num_steps = 10
  c.sample.guidance_scale = 3.0
  c.sample.eta = 0.7
  c.sample.batch_size = 32
  c.sample.num_batches = 2
  c.sample.group_size = 8
  c.train.batch_size = 16
  c.train.grad_accum = 1
  c.train.num_inner_epochs = 1
  c.train.timestep_fraction = 0.5
  c.train.learning_rate = 1e-4
  c.ddpo = ddpo_section()
  c.ddpo.clip_range = 1e-4
  c.ddpo.advantage = "group"
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  c.eval.eta = 0.7
  return config_lib.finalize(c)
