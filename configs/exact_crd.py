"""CRD on the exact Gaussian-mixture benchmark (``didr_jax.exact``, issue 27): deterministic
rollouts from the sampling snapshot, groups of 8 per prompt, the MSE loss with the KL anchor to
the frozen exact reference. ``--config=configs/exact_crd.py:ring2d:box[:flow]``."""

from didr_jax.exact.config import exact_base, parse_spec
from didr_jax.train import config as config_lib
from didr_jax.train.crd_config import crd_section


def get_config(spec: str = "ring2d:linear"):
  c = exact_base("crd", spec)
  c.sample.num_steps = 10
  c.sample.eta = 0.0
  c.sample.group_size = 8
  c.train.batch_size = 32
  c.train.grad_accum = 1
  c.train.learning_rate = 1e-3
  c.crd = crd_section()
  c.crd.num_train_times = 5
  c.crd.kl_cfg = 1.0
  c.crd.time_shift = 1.0
  # the raw-reward KL weight needs rewards in [0, 1] (the box indicator); linear / quadratic
  # rewards are unbounded
  c.crd.kl_weight = "reward" if parse_spec(spec)[1] == "box" else "advantage"
  return config_lib.finalize(c)
