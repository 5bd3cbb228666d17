"""TDM-R1 on Z-Image: a 4-step deterministic student (flow Euler on the shift-3 grid
sig = 3u / (1 + 2u), u = 1, 3/4, 1/2, 1/4) reinforced with a reward that is never differentiated
(PickScore here; any registered reward, e.g. ``remote`` for OCR, object counts or a person's
yes / no), through a surrogate reward learned by group preference on its trajectories, plus
TDM's distribution matching to the frozen Z-Image teacher.

  python -m didr_jax.main --config=configs/tdmr1_zimage.py \
      --config.backbone.path=/models/Z-Image --config.tdm.generator_path=/models/Z-Image-TDM-4step

Folders the user supplies (nothing is downloaded):
  - ``backbone.path``: the Z-Image teacher, a local diffusers ZImagePipeline folder (or our Orbax
    cache); frozen; the fake score and the surrogate start from it;
  - ``tdm.generator_path``: the 4-step student to reinforce, a diffusers folder with the same
    transformer architecture (a ``transformer`` component folder or a pipeline folder), e.g. a
    TDM student distilled with ``--config.method=tdm``. Empty: start from the teacher;
  - the reward: PickScore (``$DIDR_PICKSCORE``, ``$DIDR_PICKSCORE_TOKENIZER``).

Defaults (docs/methods.md §4): teacher CFG 4.5 in the normaliser (standard CFG w; diffusers'
guidance_scale 3.5), t_cfg scale derived from it
(``tdm_config.cfg_reward_scale``: w_cfg s = ref_cfg - 1, so that at phi = ref the targets add up to
the teacher at CFG 4.5; the authors' 3.5 pulled toward CFG 2.05), surrogate CFG 4.5, beta_dpo 10, t_min sigma 0.3, generator
AdamW lr 7.5e-5 betas (0, 0.999), fake 3e-4 (0, 0.999), surrogate 3e-4 (0.9, 0.999), wd 1e-4,
clip 1, M = 2 boundaries per iteration, groups of 24 (see ``recipes.tdmr1``).
"""

from didr_jax.train import config as config_lib
from didr_jax.train import recipes


def get_config():
  c = recipes.tdmr1("zimage", ref_cfg=4.5, surrogate_cfg=4.5)
  c.tdm.generator_path = ""       # the 4-step student folder (see above)
  return config_lib.finalize(c)
