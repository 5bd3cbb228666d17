"""TDM-R1 on the exact Gaussian-mixture benchmark (``didr_jax.exact``, issue 27): the 4-step
student (``tdm.generator_path``, e.g. an ``exact_tdm.py`` run exported; "" = the exact reference
read as the student) reinforced through a surrogate reward learned by group preference, with TDM's
distribution matching to the exact reference. ``--config=configs/exact_tdmr1.py:ring2d:box``."""

from didr_jax.exact.config import exact_base
from didr_jax.train import config as config_lib
from didr_jax.train.tdm_config import tdmr1_section


def get_config(spec: str = "ring2d:linear"):
  c = exact_base("tdmr1", spec)
  c.sample.num_steps = 4
  c.sample.group_size = 8
  c.tdm = tdmr1_section()
  c.tdm.shift = 1.0
  c.tdm.ref_cfg = 1.0
  c.tdm.surrogate_cfg = 1.0
  c.tdm.generator_learning_rate = 1e-3
  c.tdm.surrogate_learning_rate = 1e-3
  c.train.weight_decay = 0.0
  return config_lib.finalize(c)
