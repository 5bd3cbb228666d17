"""Run logging: TensorBoard through clu writers, image grids, progress lines, reward plots."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Sequence

import jax
import numpy as np


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
  """(N, H, W, 3) floats in [0, 1] -> one (rows*(H+pad), cols*(W+pad), 3) uint8 grid."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)


class RunLogger:
  """Writes scalars and images to TensorBoard (process 0 only), keeps a JSON history and a
  reward-curve PNG in the workdir, and prints progress with rate and ETA."""

  def __init__(self, workdir: str, total_epochs: int, history: list | None = None):
    self.workdir = workdir
    self.total = total_epochs
    self.history = list(history or [])
    self.epoch_times: list[float] = []
    self.is_main = jax.process_index() == 0
    self.writer = None
    if self.is_main:
      from clu import metric_writers
      self.writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                         just_logging=False)

  def scalars(self, step: int, values: Mapping[str, float], record: bool = True):
    values = {k: float(v) for k, v in values.items()}
    if self.writer is not None:
      self.writer.write_scalars(step, values)
    if record:
      self.history.append({"step": step, **values})

  def images(self, step: int, images: Mapping[str, np.ndarray]):
    if self.writer is not None:
      self.writer.write_images(step, {k: image_grid(v)[None] for k, v in images.items()})

  def progress(self, epoch: int, seconds: float, extra: Mapping[str, float]):
    """Prints 'epoch e/N | k=v ... | s/epoch | ETA'. The rate is the mean epoch time, leaving
    out the first epoch of this process (it includes compilation) once others exist."""
    self.epoch_times.append(seconds)
    times = self.epoch_times[1:] or self.epoch_times
    rate = sum(times) / len(times)
    eta = rate * (self.total - epoch)
    parts = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
    if self.is_main:
      print(f"epoch {epoch}/{self.total} | {parts} | {seconds:.1f} s (mean {rate:.1f} s/epoch) "
            f"| ETA {eta / 60:.1f} min", flush=True)

  def flush(self, plot_keys: Sequence[str] = ("reward_mean", "eval/toy_detector")):
    if not self.is_main:
      return
    if self.writer is not None:
      self.writer.flush()
    with open(os.path.join(self.workdir, "history.json"), "w") as f:
      json.dump(self.history, f)
    self.plot(plot_keys)

  def plot(self, keys: Sequence[str]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {k: [(h["step"], h[k]) for h in self.history if k in h] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
      return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k, pts in series.items():
      x, y = zip(*pts)
      ax.plot(x, y, marker="o" if len(x) < 30 else None, label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(self.workdir, "reward_curve.png"))
    plt.close(fig)

  def close(self):
    self.flush()
    if self.writer is not None:
      self.writer.close()
