"""Reward -> advantage normalisation on the host, with the statistics gathered across hosts.

Two modes (docs/methods.md §5.1):
- ``per_prompt``: DDPO's per-prompt ring buffer (size ``buffer_size``) kept across epochs; a
  prompt with fewer than ``min_count`` stored rewards is normalised by the batch mean / std.
- ``group``: Flow-GRPO's groups of K images per prompt, cleared every epoch, normalised by the
  group mean and the std of the whole batch (the same formula as ``losses.common``).
Both see the *global* batch: callers pass rewards and prompts gathered from every process
(``gather_host``), so every host computes identical advantages and keeps its own slice.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import numpy as np


def gather_host(x: np.ndarray) -> np.ndarray:
  """Concatenates a per-process array over processes (identity on one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


class PerPromptStatTracker:
  def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6):
    self.buffer_size = buffer_size
    self.min_count = min_count
    self.eps = eps
    self.buffers: dict[str, collections.deque] = {}

  def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, np.float64)
    adv = np.empty_like(rewards)
    for p in dict.fromkeys(prompts):
      idx = np.array([i for i, q in enumerate(prompts) if q == p])
      buf = self.buffers.setdefault(p, collections.deque(maxlen=self.buffer_size))
      buf.extend(rewards[idx].tolist())
      if len(buf) < self.min_count:
        mean, std = rewards.mean(), rewards.std()
      else:
        mean, std = np.mean(buf), np.std(buf)
      adv[idx] = (rewards[idx] - mean) / (std + self.eps)
    return adv.astype(np.float32)

  def state_dict(self) -> dict:
    return {"buffer_size": self.buffer_size, "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()}}

  def load_state_dict(self, d: dict) -> None:
    self.buffers = {p: collections.deque(v, maxlen=self.buffer_size)
                    for p, v in d.get("buffers", {}).items()}


def group_advantages_np(prompts: Sequence[str], rewards: np.ndarray, eps: float = 1e-4,
                        std: str = "global") -> np.ndarray:
  """Host version of ``losses.common.group_advantages`` keyed by prompt text."""
  rewards = np.asarray(rewards, np.float64)
  ids = np.unique(np.asarray(prompts), return_inverse=True)[1]
  mean = np.bincount(ids, rewards) / np.bincount(ids)
  centered = rewards - mean[ids]
  if std == "global":
    scale = rewards.std()
  else:
    scale = np.sqrt((np.bincount(ids, centered ** 2) / np.bincount(ids)))[ids]
  return (centered / (scale + eps)).astype(np.float32)


class AdvantageNormalizer:
  """The config-selected mode with a checkpointable state."""

  def __init__(self, mode: str = "per_prompt", buffer_size: int = 32, min_count: int = 16,
               group_std: str = "global"):
    if mode not in ("per_prompt", "group"):
      raise ValueError(f"advantage mode must be 'per_prompt' or 'group', got {mode!r}")
    self.mode = mode
    self.group_std = group_std
    self.tracker = PerPromptStatTracker(buffer_size, min_count)

  def __call__(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
    if self.mode == "per_prompt":
      return self.tracker.update(prompts, rewards)
    return group_advantages_np(prompts, rewards, std=self.group_std)

  def state_dict(self) -> dict:
    return {"mode": self.mode, "tracker": self.tracker.state_dict()}

  def load_state_dict(self, d: dict) -> None:
    self.tracker.load_state_dict(d.get("tracker", {}))
