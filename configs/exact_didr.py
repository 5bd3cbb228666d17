"""DIDR (``--config.didr.mode=di`` / ``dipp``: DI, DI++) on the exact Gaussian-mixture benchmark
(``didr_jax.exact``, issue 27): a one-step generator (a copy of the exact reference read at its
generator time, plus a zero-initialised residual MLP) trained toward p_ref e^{r/beta}/Z with
1/beta = ``didr.reward_scale``. ``--config=configs/exact_didr.py:ring2d:linear[:flow]``."""

from didr_jax.exact.config import exact_base
from didr_jax.train import config as config_lib
from didr_jax.train.didr_config import didr_section


def get_config(spec: str = "ring2d:linear"):
  c = exact_base("didr", spec)
  c.sample.num_steps = 1
  c.sample.group_size = 1
  c.train.learning_rate = 1e-3
  c.didr = didr_section()
  c.didr.reward = dict(c.rewards)
  c.didr.reward_scale = 1.0       # 1/beta
  c.didr.ref_cfg = 1.0
  c.didr.drs_bound = "none"
  c.didr.drp_steps = 1            # Tweedie: the exact DRS for a linear reward
  c.didr.fake_updates = 2
  c.didr.ema_decay = 0.9
  return config_lib.finalize(c)
