"""DIDR on Z-Image: a one-step generator (the DiT at flow sigma 1: x0 = z - v) trained toward the
PickScore-tilted Z-Image reference.

  python -m didr_jax.main --config=configs/didr_zimage.py \
      --config.backbone.path=/models/Z-Image --config.didr.generator_path=/models/Z-Image-Turbo

Folders the user supplies (nothing is downloaded):
  - ``backbone.path``: the Z-Image reference, a local diffusers ZImagePipeline folder (or our
    Orbax cache); frozen, and the fake score starts from it;
  - ``didr.generator_path``: the generator's initialisation, a diffusers folder with the same
    transformer architecture (METHODS: Z-Image-Turbo; a pipeline folder or its ``transformer``
    component folder). Empty: start from the reference;
  - the reward: PickScore (``$DIDR_PICKSCORE``, ``$DIDR_PICKSCORE_TOKENIZER``).

Defaults (METHODS section 3, [reconstruction]): reference CFG 4.5 (standard CFG w; diffusers'
guidance_scale 3.5), flow sigmas u ~ U[0.02, 0.98] through the scheduler's static shift, Adam
beta1 0, lr 5e-7 (full transformer), 5 fake updates per generator update, K = 2 ancestral DRP.
"""

from didr_jax.train import config as config_lib
from didr_jax.train.didr_config import didr_section


def get_config():
  c = config_lib.base_config()
  c.method = "didr"
  c.backbone.kind = "zimage"
  c.backbone.path = ""            # required: the Z-Image reference folder
  c.backbone.dtype = "bfloat16"
  c.backbone.remat = True
  c.rewards = {"pickscore": 1.0}
  c.prompts.train = "toy:train"   # replace with a prompt file for real runs
  c.prompts.eval = "toy:heldout"
  c.num_epochs = 100
  c.checkpoint_every = 5
  c.eval_every = 10
  c.sample.num_steps = 1
  c.sample.batch_size = 32
  c.sample.num_batches = 8
  c.sample.group_size = 1
  c.train.batch_size = 32
  c.train.learning_rate = 5e-7
  c.train.weight_decay = 0.0
  c.didr = didr_section()
  c.didr.generator_path = ""      # e.g. a Z-Image-Turbo folder (see above)
  c.didr.reward = {"pickscore": 1.0}
  c.didr.ref_cfg = 4.5
  c.didr.fake_updates = 5
  c.didr.ema_decay = 0.999
  c.eval.num_samples = 64
  c.eval.batch_size = 32
  return config_lib.finalize(c)
