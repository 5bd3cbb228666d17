"""TDM-R1 on SDXL: a 4-step deterministic student (DDIM eta 0 on the scheduler's 4-step grid)
reinforced with a reward that is never differentiated (PickScore here; any registered reward,
e.g. ``remote`` for OCR, object counts or a person's yes / no), through a surrogate reward
learned by group preference on its trajectories, plus TDM's distribution matching to the frozen
SDXL teacher.

  python -m didr_jax.main --config=configs/tdmr1_sdxl.py \
      --config.backbone.path=/models/sdxl-base-1.0 \
      --config.tdm.generator_path=/models/sdxl-tdm-4step-unet

Folders the user supplies (nothing is downloaded):
  - ``backbone.path``: the SDXL teacher, a local diffusers StableDiffusionXLPipeline folder (or our
    Orbax cache); frozen; the fake score and the surrogate start from it;
  - ``tdm.generator_path``: the 4-step TDM student to reinforce, a diffusers folder with SDXL's
    UNet architecture (a ``unet`` component folder or a pipeline folder), e.g. one distilled with
    ``--config.method=tdm`` on this config's ``tdm`` section. Empty: start from the teacher;
  - the reward: PickScore (``$DIDR_PICKSCORE``, ``$DIDR_PICKSCORE_TOKENIZER``).

Defaults (docs/methods.md §4): teacher CFG 8 in the normaliser (SDXL's DMD-style scale,
[reconstruction]), t_cfg scale derived from it
(``tdm_config.cfg_reward_scale``: w_cfg s = ref_cfg - 1, so that at phi = ref the targets add up to
the teacher at CFG 8; the authors' 3.5 pulled toward CFG 2.05), surrogate CFG 4.5, beta_dpo 10, t_min 300 / T, generator
AdamW lr 7.5e-5 betas (0, 0.999), fake 3e-4 (0, 0.999), surrogate 3e-4 (0.9, 0.999), wd 1e-4,
clip 1, M = 2 boundaries per iteration, groups of 24 (see ``recipes.tdmr1`` for the
batch).
"""

from didr_jax.train import config as config_lib
from didr_jax.train import recipes


def get_config():
  c = recipes.tdmr1("sdxl", ref_cfg=8.0, surrogate_cfg=4.5)
  c.tdm.generator_path = ""       # the 4-step student folder (see above)
  return config_lib.finalize(c)
