"""DIDR on the toy shapes world: a one-step generator on the shipped pixel-space toy UNet,
trained toward the toy-CLIP-tilted reference (the differentiable ``toy_clip`` reward), logged and
evaluated with the toy CLIP score plus the held-out toy detector and toy fidelity (the loop adds
both for toy prompts). Runs on a laptop CPU.

The generator starts from the shipped one-step toy generator ``didr_jax/toy/assets/toy_onestep``
(distilled from the toy UNet by our DI: ``python -m didr_jax.toy.pretrain --stages=onestep``;
README, DIDR section); ``--config.didr.generator_path=""`` starts from the teacher read as a
one-step generator at t = 399 (``train.one_step``) instead. Modes: ``didr`` (default),
``di`` (no reward: plain distillation), ``dipp`` (DI++, terminal reward). The reference is
queried with the toy's sampling CFG 3. Learning rates and EMA are toy choices, not the paper's.
"""

import os

from didr_jax.train import config as config_lib
from didr_jax.train.didr_config import didr_section


def get_config():
  c = config_lib.base_config()
  c.method = "didr"
  c.backbone.kind = "toy_unet"
  c.rewards = {"toy_clip": 1.0}      # host metric (reward_mean); also the DIDR reward below
  c.num_epochs = 50
  c.eval_every = 10
  c.sample.batch_size = 32           # generator samples per generator update
  c.sample.num_batches = 4           # generator updates per epoch
  c.sample.group_size = 1
  c.sample.num_steps = 1             # one-step generator (sampling ignores it)
  c.train.batch_size = 32
  c.train.learning_rate = 1e-4
  c.train.weight_decay = 0.0
  c.didr = didr_section()
  c.didr.reward = {"toy_clip": 1.0}
  generator = os.path.join(config_lib.TOY_ASSETS, "toy_onestep")
  c.didr.generator_path = generator if os.path.isdir(generator) else ""
  c.didr.reward_scale = 1.0          # 1/beta
  c.didr.ref_cfg = 3.0               # the toy's sampling CFG
  c.didr.fake_updates = 2
  c.didr.fake_learning_rate = 1e-4
  c.didr.ema_decay = 0.99
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  return config_lib.finalize(c)
