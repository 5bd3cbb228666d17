"""DDPO (Flow-GRPO style) on the toy shapes world with the shipped pixel-space DiT base (a tiny
Z-Image: the same transformer, Qwen3 text encoder and flow sampler as ``ddpo_zimage.py``),
rewarded by the toy detector; the recipe of ``toy_ddpo.py`` with the flow SDE policy (noise
level a = 0.7). Runs on a laptop CPU."""

import os
import runpy


def get_config():
  toy = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_ddpo.py"))
  return toy["get_config"]("dit")
