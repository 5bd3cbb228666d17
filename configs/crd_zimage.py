"""CRD (centered reward distillation, docs/methods.md §2) on Z-Image from a local diffusers
folder (set --config.backbone.path=/models/Z-Image, or the Orbax cache ``python -m
didr_jax.convert`` writes).

The authors' SD3.5-M recipe (a flow model, as Z-Image), their names in the comments: rollouts
from the sampling snapshot with the deterministic 10-step Euler ODE at CFG 1 (the KL anchor to
the CFG-4.5 reference teaches the policy to do without guidance); K = 24 images per prompt, 48
prompts = 1152 samples per epoch; 2 optimizer steps per epoch; advantages per prompt over the
global std, clipped to +-5, mapped to A / 10 + 1/2; MSE loss, c_beta 1; 20 forward-noised times
per sample (num_train_timesteps), flow sigmas shifted by 3 (time_shift) up to 0.99
(timestep_range); KL anchor beta 0.1 with strength 1e-3 + R (1 - 1e-3); snapshots old
"0-0.25-0.005-0.999", sampler "75-0.0-0.0075-0.999"; AdamW wd 1e-4, grad clip 1, bf16.
What does not carry over: the learning rate is 1e-5, since this trainer updates every
transformer weight (the authors' 3e-4 is for a rank-32 LoRA), and the KL strength follows the
raw reward in [0, 1] (crd.kl_weight "reward"; their port: "advantage"), see docs/methods.md §2.5.

Rewards must lie in [0, 1] for the reward-weighted KL (e.g. --config.rewards='{"toy_detector":
1.0}', or a GenEval / OCR scorer); prompts: a text file, one per line
(--config.prompts.train=/data/prompts.txt).
"""

from didr_jax.train import config as config_lib
from didr_jax.train.crd_config import crd_section


def get_config():
  c = config_lib.real_base("crd", "zimage", {"toy_detector": 1.0}, num_epochs=300,
                          eval_every=20)
  # bfloat16 with remat (authors: bf16)
  c.sample.num_steps = 10         # authors: 10-step ODE
  c.sample.guidance_scale = 1.0   # authors: CFG 1 in the rollouts
  c.sample.eta = 0.0              # deterministic Euler ODE
  c.sample.group_size = 24        # authors: K = 24 images per prompt
  c.sample.batch_size = 48        # 2 prompts x 24 per sampling call
  c.sample.num_batches = 24       # -> 48 prompts, 1152 samples per epoch
  c.train.batch_size = 48         # two whole groups per minibatch
  c.train.grad_accum = 12         # -> 576 samples per step, 2 optimizer steps per epoch
  c.train.num_inner_epochs = 1
  c.train.learning_rate = 1e-5    # full fine-tuning (authors: 3e-4 with a rank-32 LoRA)
  c.train.weight_decay = 1e-4
  c.train.max_grad_norm = 1.0
  c.crd = crd_section()           # the authors' defaults (train/crd_config.py)
  c.eval.num_samples = 64
  c.eval.batch_size = 32
  c.eval.num_steps = 10
  c.eval.eta = 0.0
  return config_lib.finalize(c)
