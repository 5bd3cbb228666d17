"""DDPO (``--config.ddpo.objective=rwr``: RWR) on the exact Gaussian-mixture benchmark
(``didr_jax.exact``, issue 27): the policy (exact reference + zero-initialised residual MLP)
sampled by DDIM eta 1 (VP) or the Flow-GRPO SDE (flow), group advantages, the trajectory KL to
the frozen reference (``ddpo.kl_beta``). ``--config=configs/exact_ddpo.py:ring2d:box[:flow]``."""

from didr_jax.exact.config import exact_base
from didr_jax.train import config as config_lib
from didr_jax.train.ddpo_config import ddpo_section


def get_config(spec: str = "ring2d:linear"):
  c = exact_base("ddpo", spec)
  c.sample.num_steps = 10
  c.sample.eta = 0.7 if c.backbone.kind.endswith("_flow") else 1.0
  c.sample.group_size = 8
  c.train.batch_size = 32
  c.train.timestep_fraction = 1.0
  c.train.learning_rate = 1e-3
  c.ddpo = ddpo_section()
  c.ddpo.advantage = "group"
  c.ddpo.clip_range = 0.2
  c.ddpo.kl_beta = 0.01
  c.eval.eta = c.sample.eta      # judge the stochastic policy it is trained as
  return config_lib.finalize(c)
