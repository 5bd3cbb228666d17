"""Loads a ``configs/<name>.py`` of this repository with dotted-key overrides (tests and
benchmarks; the command line uses ``--config.a.b=v`` for the same)."""

from __future__ import annotations

import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def load_config(name: str, **overrides):
  """``configs/<name>.py``'s ``get_config()`` with ``overrides`` such as
  ``**{"train.batch_size": 8}`` applied (unknown keys raise, as the config is locked)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
