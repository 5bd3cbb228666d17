"""CRD on the toy shapes world with the shipped pixel-space DiT base (a tiny Z-Image: flow
matching, Euler ODE rollouts); the recipe of ``toy_crd.py``. Runs on a laptop CPU."""

import os
import runpy


def get_config():
  toy = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_crd.py"))
  return toy["get_config"]("dit")
