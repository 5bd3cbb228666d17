"""DIDR on SDXL: a one-step generator (DMD2-style, conditioning timestep 399) trained toward the
PickScore-tilted SDXL reference. The design card's command:

  python -m didr_jax.main --config=configs/didr_sdxl.py \
      --config.backbone.path=/models/sdxl-base-1.0 \
      --config.didr.generator_path=/models/dmd2-sdxl-1step-unet

Folders the user supplies (nothing is downloaded):
  - ``backbone.path``: the SDXL reference, a local diffusers StableDiffusionXLPipeline folder (or
    our Orbax cache, ``python -m didr_jax.convert``); it is the frozen reference, and the fake
    score starts from it;
  - ``didr.generator_path``: the one-step generator, a diffusers folder with SDXL's UNet
    architecture: a ``unet`` component folder (config.json + safetensors, e.g. DMD2's
    ``dmd2_sdxl_1step_unet`` loaded into diffusers' UNet2DConditionModel and saved with
    ``save_pretrained``) or a whole pipeline folder. Empty: start from the teacher (the SDXL UNet
    read as a one-step generator, which is a poor start);
  - the reward: PickScore, a transformers CLIPModel folder (PickScore_v1) given by
    ``$DIDR_PICKSCORE``, with its tokenizer folder in ``$DIDR_PICKSCORE_TOKENIZER``
    (CLIP-ViT-H-14-laion2B) when the model folder has none.

Defaults (docs/methods.md §3, [reconstruction] where the paper is not public): reference CFG 8,
t ~ U[0.02, 0.98] T, Adam beta1 0 for the generator (and the fake score), lr 5e-7 (full UNet),
5 fake-score updates per generator update (DMD2's SDXL ratio), 1/beta = 1 (sweep {1, 10, 100} /
reward std). The DRP is K = 2 ancestral steps (drp_eta 1; see didr_config.py for why not the
deterministic K = 2). Mode ``di`` gives DI* (no reward), ``dipp`` DI++.
"""

from didr_jax.train import config as config_lib
from didr_jax.train import recipes


def get_config():
  c = recipes.didr("sdxl", ref_cfg=8.0)
  c.didr.generator_path = ""      # the one-step generator folder (see above)
  return config_lib.finalize(c)
