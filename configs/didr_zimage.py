"""DIDR on Z-Image: a one-step generator (the DiT at flow sigma 1: x0 = z - v) trained toward the
PickScore-tilted Z-Image reference.

  python -m didr_jax.main --config=configs/didr_zimage.py \
      --config.backbone.path=/models/Z-Image --config.didr.generator_path=/models/Z-Image-Turbo

Folders the user supplies (nothing is downloaded):
  - ``backbone.path``: the Z-Image reference, a local diffusers ZImagePipeline folder (or our
    Orbax cache); frozen, and the fake score starts from it;
  - ``didr.generator_path``: the generator's initialisation, a diffusers folder with the same
    transformer architecture (the paper's: Z-Image-Turbo; a pipeline folder or its ``transformer``
    component folder). Empty: start from the reference;
  - the reward: PickScore (``$DIDR_PICKSCORE``, ``$DIDR_PICKSCORE_TOKENIZER``).

Defaults (docs/methods.md §3, [reconstruction]): reference CFG 4.5 (standard CFG w; diffusers'
guidance_scale 3.5), flow sigmas u ~ U[0.02, 0.98] through the scheduler's static shift, Adam
beta1 0, lr 5e-7 (full transformer), 5 fake updates per generator update, K = 2 ancestral DRP.
"""

from didr_jax.train import config as config_lib
from didr_jax.train import recipes


def get_config():
  c = recipes.didr("zimage", ref_cfg=4.5)
  c.didr.generator_path = ""      # the one-step generator folder (see above)
  return config_lib.finalize(c)
