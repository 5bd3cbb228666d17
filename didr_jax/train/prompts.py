"""Prompt sources and a resumable, deterministic prompt stream.

A config names prompts as a file path (one prompt per line) or a built-in set ``toy:train`` /
``toy:heldout``. The stream shuffles with a seeded permutation per pass and records its position,
so a resumed run draws exactly the prompts the uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from didr_jax.errors import PromptError
from didr_jax.toy import shapes


def load_prompts(spec: str) -> list[str]:
  """The prompts of ``spec``: a built-in set (``toy:train`` / ``toy:heldout``) or a UTF-8 text
  file with one prompt per line (blank lines skipped)."""
  if spec.startswith("toy:"):
    which = spec[4:]
    if which == "train":
      return list(shapes.train_prompts())
    if which == "heldout":
      return list(shapes.heldout_prompts())
    raise PromptError(f"unknown built-in prompt set {spec!r}; use toy:train or toy:heldout")
  if not spec:
    raise PromptError("no prompt source given: a text file (one prompt per line), "
                      "toy:train or toy:heldout")
  if not os.path.isfile(spec):
    raise PromptError(f"prompt file {spec!r} does not exist" if not os.path.exists(spec) else
                      f"{spec!r} is not a file (one prompt per line)")
  try:
    with open(spec, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise PromptError(f"cannot read prompt file {spec!r}: {e}") from None
  if not prompts:
    raise PromptError(f"prompt file {spec!r} has no prompts (empty or only blank lines)")
  return prompts


class PromptStream:
  """Draws batches of prompts; ``repeat`` > 1 draws groups of identical prompts (per-prompt
  groups of K samples for group-relative advantages)."""

  def __init__(self, prompts: Sequence[str], seed: int = 0, position: int = 0):
    if not prompts:
      raise PromptError("empty prompt list")
    self.prompts = list(prompts)
    self.seed = seed
    self.position = position

  def _at(self, i: int) -> str:
    n = len(self.prompts)
    perm = np.random.default_rng([self.seed, i // n]).permutation(n)
    return self.prompts[perm[i % n]]

  def next(self, num_prompts: int, repeat: int = 1) -> list[str]:
    out = [self._at(self.position + i) for i in range(num_prompts)]
    self.position += num_prompts
    return [p for p in out for _ in range(repeat)]

  def state_dict(self) -> dict:
    return {"position": self.position, "seed": self.seed}

  def load_state_dict(self, d: dict) -> None:
    self.position = int(d["position"])
