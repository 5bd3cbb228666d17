"""TDM-R1 on the toy shapes world with the non-differentiable toy detector as the reward: the
4-step toy TDM student (``didr_jax/toy/assets/toy_tdm``, built by ``python -m
didr_jax.toy.pretrain --stages=tdm``; ``--config.tdm.generator_path=""`` starts from the teacher
instead) reinforced through a surrogate reward learned by group preference on its trajectories,
with TDM's distribution matching to the shipped toy UNet (CFG 3).

  python -m didr_jax.main --config=configs/toy_tdmr1.py --workdir=/tmp/toy_tdmr1

Toy choices (not the paper's): 4 prompts x 8 samples per iteration, 2 iterations per epoch,
teacher CFG 3, surrogate CFG 3, generator lr 5e-5, surrogate lr 3e-5, no weight decay, beta_dpo 1
(as for GenEval-like rewards). The t_cfg scale is derived (``tdm_config.cfg_reward_scale``:
w_cfg s = ref_cfg - 1 = 2), so that with phi = ref the generator's three targets add up to TDM's
own, the distribution matching toward the CFG-3 teacher the student was distilled with. (A scale
of 2 moved the target to CFG 1.6 and raised the toy FD from 100 to 137 in 20 epochs without any
reward.) The surrogate's lr is 10x below the paper's: on the toy, full
fine-tuning at 3e-4 moved phi's outputs from the reference's by as much as the reference's own
denoising error within 15 iterations, and its learned implicit reward correlated less with the
reward (``benchmarks/tdmr1_surrogate_probe.py``, README).
"""

import os

from didr_jax.train import config as config_lib
from didr_jax.train.tdm_config import tdmr1_section


def get_config():
  c = config_lib.base_config()
  c.method = "tdmr1"
  c.backbone.kind = "toy_unet"
  c.rewards = {"toy_detector": 1.0}   # the trained reward (never differentiated)
  c.num_epochs = 50
  c.eval_every = 10
  c.sample.num_steps = 4              # the student's K (sampling ignores it: tdm.num_steps)
  c.sample.group_size = 8
  c.sample.batch_size = 32            # 4 prompts x 8 rollouts per iteration
  c.sample.num_batches = 2
  c.train.batch_size = 32
  c.tdm = tdmr1_section()
  student = os.path.join(config_lib.TOY_ASSETS, "toy_tdm")
  # the shipped 4-step student once it is built; until then the teacher read as the student
  c.tdm.generator_path = student if os.path.isdir(student) else ""
  c.tdm.ref_cfg = 3.0
  c.tdm.surrogate_cfg = 3.0
  c.tdm.beta_dpo = 1.0
  c.tdm.generator_learning_rate = 5e-5
  c.tdm.surrogate_learning_rate = 3e-5
  c.train.weight_decay = 0.0
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  return config_lib.finalize(c)
