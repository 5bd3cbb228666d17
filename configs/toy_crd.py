"""CRD (centered reward distillation, docs/methods.md §2) on the toy shapes world with the
shipped pixel-space UNet base, rewarded by the toy detector (GenEval-like, non-differentiable).
Runs on a laptop CPU.

The authors' recipe (``train/crd_config.py``) scaled to the toy: rollouts from the sampling
snapshot with the deterministic sampler (DDIM eta 0; the authors: ODE, CFG 1), 10 steps, groups
of K = 8 images per prompt (authors 24), 8 prompts = 64 samples per epoch (the reward budget of
``toy_ddpo.py``'s epoch; authors 48 prompts), 2 optimizer steps per epoch (authors 2), mapped
advantages clipped to +-5, the MSE loss with c_beta 1, the KL anchor 0.1 to the frozen base with
CFG (3.0: the toy base's guidance scale, as in ``toy_ddpo.py``; authors 4.5 on SD3.5-M) weighted
by the raw reward, the authors' snapshot schedules. Rollouts use CFG 1 as the authors': the KL to
the guided reference teaches the policy to do without guidance. Differences for CPU cost: 5
forward times per sample and step (authors 20), full fine-tuning at lr 3e-5 (the toy DDPO rate;
authors 3e-4 for a rank-32 LoRA). Not tuned on the toy.

``get_config("dit")`` (``--config=configs/toy_crd.py:dit``) is the same recipe on the shipped toy
DiT (a tiny Z-Image: flow matching, Euler ODE rollouts, flow sigmas shifted by crd.time_shift 3).
"""

from didr_jax.train import config as config_lib
from didr_jax.train.crd_config import crd_section


def get_config(base: str = "unet"):
  if base not in ("unet", "dit"):
    raise ValueError(f"toy_crd.py:{base}: the toy bases are 'unet' and 'dit'")
  c = config_lib.base_config()
  c.method = "crd"
  c.backbone.kind = f"toy_{base}"
  c.rewards = {"toy_detector": 1.0}
  c.num_epochs = 30
  c.eval_every = 10
  c.sample.num_steps = 10         # authors: 10-step deterministic sampler
  c.sample.guidance_scale = 1.0   # authors: CFG 1 in the rollouts
  c.sample.eta = 0.0              # deterministic: DDIM (VP) / Euler ODE (flow)
  c.sample.batch_size = 32
  c.sample.num_batches = 2
  c.sample.group_size = 8         # K images per prompt (authors 24)
  c.train.batch_size = 16         # two whole groups per minibatch
  c.train.grad_accum = 2          # -> 2 optimizer steps per epoch (authors 2)
  c.train.num_inner_epochs = 1
  c.train.learning_rate = 3e-5
  c.train.weight_decay = 1e-4     # authors 1e-4
  c.train.max_grad_norm = 1.0     # authors 1
  c.crd = crd_section()
  c.crd.num_train_times = 5       # authors 20 (CPU cost)
  c.crd.kl_cfg = 3.0              # the toy base's CFG (authors 4.5)
  c.eval.num_samples = 256
  c.eval.batch_size = 64
  c.eval.eta = 0.0
  return config_lib.finalize(c)
