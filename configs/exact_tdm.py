"""TDM on the exact Gaussian-mixture benchmark (``didr_jax.exact``, issue 27): a 4-step student
(a copy of the exact reference + zero-initialised residual MLP) distilled from the exact
reference by trajectory distribution matching (no reward: ``rewards`` is only logged). It is the
few-step starting generator of ``exact_tdmr1.py``. ``--config=configs/exact_tdm.py:ring2d``."""

from didr_jax.exact.config import exact_base
from didr_jax.train import config as config_lib
from didr_jax.train.tdm_config import tdm_section


def get_config(spec: str = "ring2d:linear"):
  c = exact_base("tdm", spec)
  c.sample.num_steps = 4
  c.sample.group_size = 1
  c.tdm = tdm_section()
  c.tdm.shift = 1.0
  c.tdm.ref_cfg = 1.0
  c.tdm.generator_learning_rate = 1e-3
  c.tdm.fake_learning_rate = 2e-3
  c.train.weight_decay = 0.0
  c.tdm.ema_decay = 0.9
  return config_lib.finalize(c)
