"""The embedded default: DDPO on the toy shapes world with the shipped pixel-space UNet base,
rewarded by the toy detector (GenEval-like, non-differentiable). Runs on a laptop CPU.

Groups of 8 images per prompt with group-relative advantages (the toy has 288 training prompts,
so a per-prompt buffer would rarely fill); four optimizer steps per epoch at lr 3e-5 (1e-4 rises
as fast but is less steady: one of four runs fell back below the base). 30 epochs: the held-out
score rises for 20-30 epochs and can then drift while the training reward holds (one of two
40-epoch runs fell from 0.27 at epoch 30 to 0.21 at 40). The policy is the
eta = 1 DDIM sampler it is trained as, so evaluation samples with it too.

``get_config("dit")`` (``--config=configs/toy_ddpo.py:dit``, or ``configs/toy_ddpo_dit.py``) is
the same recipe on the shipped toy DiT: a tiny Z-Image with the flow SDE policy (Flow-GRPO's
noise level a = 0.7, deterministic last step, 5 of the 9 stochastic steps trained per
micro-batch) evaluated with the deterministic ODE sampler (eval.eta 0), so held-out numbers are
not blurred by exploration noise."""

from didr_jax.train import config as config_lib
from didr_jax.train.ddpo_config import ddpo_section


def get_config(base: str = "unet"):
  if base not in ("unet", "dit"):
    raise ValueError(f"toy_ddpo.py:{base}: the toy bases are 'unet' and 'dit'")
  c = config_lib.base_config()
  c.method = "ddpo"
  c.backbone.kind = f"toy_{base}"
  c.rewards = {"toy_detector": 1.0}
  c.num_epochs = 30
  c.eval_every = 10
  c.sample.num_steps = 10
  c.sample.guidance_scale = 3.0
  c.sample.eta = 1.0 if base == "unet" else 0.7  # DDIM eta / flow SDE noise level a
  c.sample.batch_size = 32
  c.sample.num_batches = 2
  c.sample.group_size = 8
  c.train.batch_size = 16
  c.train.grad_accum = 1
  c.train.num_inner_epochs = 1
  c.train.timestep_fraction = 0.5
  c.train.learning_rate = 3e-5
  c.ddpo = ddpo_section()
  c.ddpo.clip_range = 1e-4
  c.ddpo.advantage = "group"
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  c.eval.eta = 1.0 if base == "unet" else 0.0  # flow: judge the policy by its ODE sampler
  return config_lib.finalize(c)
