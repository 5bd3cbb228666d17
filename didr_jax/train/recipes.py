"""Recipes: the shared heads of the real-backbone configs (``configs/<method>_sdxl.py`` and
``_zimage.py``), unlocked ConfigDicts that those files finish and lock."""

from __future__ import annotations

import ml_collections

from didr_jax.train import config as config_lib, didr_config, tdm_config


def didr(kind: str, ref_cfg: float) -> ml_collections.ConfigDict:
  """The shared DIDR recipe of configs/didr_sdxl.py and configs/didr_zimage.py (unlocked):
  bfloat16 with remat, PickScore (host metric and differentiable reward), lr 5e-7 (full
  network), Adam beta1 0, 5 fake updates per generator update (DMD2's SDXL ratio), EMA 0.999,
  32 one-step samples per generator update, 8 updates per epoch."""
  c = config_lib.real_base("didr", kind, {"pickscore": 1.0}, num_epochs=100, eval_every=10)
  c.sample.num_steps = 1          # one-step generator (sampling ignores it)
  c.sample.batch_size = c.train.batch_size = 32
  c.sample.num_batches = 8
  c.train.learning_rate = 5e-7
  c.train.weight_decay = 0.0
  c.didr = didr_config.didr_section()
  c.didr.reward = {"pickscore": 1.0}
  c.didr.ref_cfg = ref_cfg
  c.didr.fake_updates = 5
  c.didr.ema_decay = 0.999
  c.eval.num_samples = 64
  c.eval.batch_size = 32
  return c


def tdmr1(kind: str, *, ref_cfg: float, surrogate_cfg: float) -> ml_collections.ConfigDict:
  """The shared TDM-R1 recipe of configs/tdmr1_sdxl.py and configs/tdmr1_zimage.py (unlocked):
  bfloat16 with remat, PickScore as the (host, never differentiated) reward with beta_dpo 10
  (the paper: 10 for OCR / HPS-like preference rewards), K = 4 student steps (flow shift 3), the
  authors' optimisers, groups of 24 samples per prompt. The paper's iteration is 48 prompts x 24
  = 1152 rollouts; these configs take 2 prompts (48 rollouts, one device's worth) per iteration
  and 8 iterations per epoch: raise ``sample.batch_size`` with the devices."""
  c = config_lib.real_base("tdmr1", kind, {"pickscore": 1.0}, num_epochs=100, eval_every=10)
  # any registered reward works as the (never differentiated) reward, e.g. "remote" for OCR
  c.sample.num_steps = 4          # the student's K (sampling ignores it: tdm.num_steps)
  c.sample.group_size = 24
  c.sample.batch_size = c.train.batch_size = 48
  c.sample.num_batches = 8
  c.tdm = tdm_config.tdmr1_section()
  c.tdm.ref_cfg = ref_cfg
  c.tdm.surrogate_cfg = surrogate_cfg
  c.tdm.beta_dpo = 10.0
  c.eval.num_samples = 64
  c.eval.batch_size = 32
  return c
