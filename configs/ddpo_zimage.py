"""Flow-GRPO-style DDPO on Z-Image from a local diffusers folder
(set --config.backbone.path=/models/Z-Image, or the Orbax cache ``python -m didr_jax.convert``
writes).

The policy is the flow SDE of Flow-GRPO (``diffusion.flow``: noise level a = sample.eta = 0.7,
10 steps, CFG w = 4.5 in training and sampling; the last step is a deterministic Euler step, so
9 steps are the MDP and all 9 are trained), group-relative advantages over sample.group_size
images per prompt (mean of the group, std of the batch: ddpo.advantage_std), a PPO clip of 1e-4,
and Flow-GRPO's KL penalty 0.04 ||mu_theta - mu_ref||^2 / (2 sig_t^2) to the frozen initial
model, sig_t = a sqrt(sig / (1 - sig)) the SDE's noise coefficient. Flow-GRPO-Fast-style
training: --config.sample.sde_window='(-1, 2)' (2 stochastic steps at a random place per
batch); coefficients-preserving sampling: --config.sample.sde_type=cps.
Evaluation samples with the deterministic ODE (eta 0).

Guidance is standard CFG w (1 = off) as everywhere in didr_jax; diffusers' ZImagePipeline
guidance_scale g is w - 1. The learning rate is 1e-5: this trainer updates every transformer
weight (Flow-GRPO's 3e-4 is for its rank-32 LoRA). Reward: JPEG compressibility (dense, no
model needed), e.g. --config.rewards='{"toy_detector": 1.0}' for the GenEval-like toy detector;
prompts: a text file, one per line (--config.prompts.train=/data/prompts.txt).
Images are trained at the pipeline's default resolution (the VAE config's sample_size).
"""

from didr_jax.train import config as config_lib
from didr_jax.train.ddpo_config import ddpo_section


def get_config():
  c = config_lib.real_base("ddpo", "zimage", {"jpeg_compressibility": 1.0}, num_epochs=100,
                          eval_every=10)
  c.sample.num_steps = 10
  c.sample.guidance_scale = 4.5
  c.sample.eta = 0.7              # Flow-GRPO's SDE noise level a
  c.sample.batch_size = 32
  c.sample.group_size = 16        # images per prompt (group-relative advantages)
  c.sample.num_batches = 4
  c.train.batch_size = 16
  c.train.grad_accum = 4          # -> 2 optimizer steps per epoch of 128 samples
  c.train.timestep_fraction = 0.9  # Flow-GRPO trains on int(10 * 0.99) = 9 of the 10 steps
  c.train.learning_rate = 1e-5     # full fine-tuning (Flow-GRPO: 3e-4 with LoRA)
  c.train.weight_decay = 1e-4
  c.train.max_grad_norm = 1.0
  c.train.cfg = True
  c.ddpo = ddpo_section()
  c.ddpo.advantage = "group"
  c.ddpo.clip_range = 1e-4
  c.ddpo.adv_clip_max = 5.0
  c.ddpo.kl_beta = 0.04
  c.eval.num_samples = 64
  c.eval.batch_size = 32
  c.eval.num_steps = 40           # ODE evaluation, as Flow-GRPO's 40-step test sampler
  c.eval.eta = 0.0
  return config_lib.finalize(c)
