"""TDM on the toy shapes world: a 4-step deterministic student (DDIM eta 0 on the toy
scheduler's trailing 4-step grid 999, 749, 499, 249) distilled from the shipped pixel-space toy
UNet (the teacher, CFG 3: the toy's sampling scale) by trajectory distribution matching with an
online fake score. No reward is trained on: ``rewards`` (the toy detector) is only logged, and
evaluation adds the held-out detector score, shape accuracy and toy fidelity.

  python -m didr_jax.main --config=configs/toy_tdm.py --workdir=/tmp/toy_tdm

``python -m didr_jax.toy.pretrain --stages=tdm`` runs this distillation and writes the student as
a pipeline folder (``toy_tdm``) that ``configs/toy_tdmr1.py`` starts from. Learning rates and the
EMA are toy choices; the rest is docs/methods.md §4's TDM.
"""

from didr_jax.train import config as config_lib
from didr_jax.train.tdm_config import tdm_section


def get_config():
  c = config_lib.base_config()
  c.method = "tdm"
  c.backbone.kind = "toy_unet"
  c.rewards = {"toy_detector": 1.0}   # logged only
  c.num_epochs = 50
  c.eval_every = 10
  c.sample.num_steps = 4              # the student's K (sampling ignores it: tdm.num_steps)
  c.sample.batch_size = 32            # student rollouts per iteration
  c.sample.num_batches = 4            # iterations per epoch
  c.sample.group_size = 1
  c.train.batch_size = 32
  c.tdm = tdm_section()
  c.tdm.ref_cfg = 3.0                 # the toy's sampling CFG
  c.tdm.generator_learning_rate = 1e-4
  c.tdm.fake_learning_rate = 2e-4
  c.train.weight_decay = 0.0
  c.tdm.ema_decay = 0.99
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  return config_lib.finalize(c)
