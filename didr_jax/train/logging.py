"""Run logging: TensorBoard through clu writers, image grids, progress lines, reward plots."""

from __future__ import annotations

import functools
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


class CompileClock:
  """Wall time JAX spent tracing, lowering and compiling, from ``jax.monitoring``'s compile
  events (their time spans are merged, so nested traces count once). ``seconds(t0, t1)`` is
  the compile time inside the window [t0, t1] (time.time() values)."""

  _spans: list = []
  _registered = False

  @classmethod
  def install(cls):
    if cls._registered:
      return
    def on_span(event, start, end, **kw):
      if event.startswith("/jax/core/compile/"):
        cls._spans.append((start, end))
    jax.monitoring.register_event_time_span_listener(on_span)
    cls._registered = True

  @classmethod
  def seconds(cls, t0: float, t1: float) -> float:
    spans = sorted((max(a, t0), min(b, t1)) for a, b in cls._spans if b > t0 and a < t1)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in spans:
      if cur_b is None or a > cur_b:
        total += 0.0 if cur_b is None else cur_b - cur_a
        cur_a, cur_b = a, b
      else:
        cur_b = max(cur_b, b)
    return total + (0.0 if cur_b is None else cur_b - cur_a)


def log_compiles(name: str, fn):
  """``fn`` (a jitted function) that prints ``compiled NAME in X s`` after each call during
  which JAX compiled (its first call, or a recompilation, which this makes visible), with X
  the compile time inside the call (``CompileClock``; nothing is printed before
  ``CompileClock.install()``, e.g. outside the training loop)."""
  @functools.wraps(fn)
  def call(*args, **kw):
    t0 = time.time()
    out = fn(*args, **kw)
    seconds = CompileClock.seconds(t0, time.time())
    if seconds > 0 and jax.process_index() == 0:
      print(f"compiled {name} in {seconds:.1f} s", flush=True)
    return out
  for attr in ("lower", "trace"):
    if hasattr(fn, attr):
      setattr(call, attr, getattr(fn, attr))
  return call


def captioned_grid(images: np.ndarray, prompts: Sequence[str], cols: int,
                   min_tile: int = 160, pad: int = 4) -> np.ndarray:
  """(N, H, W, 3) floats in [0, 1] -> a uint8 grid whose tiles are upscaled (nearest) to at
  least ``min_tile`` pixels wide, each with its prompt written under it (wrapped)."""
  import textwrap
  from PIL import Image, ImageDraw, ImageFont
  images = np.asarray(images)
  n, h, w, _ = images.shape
  k = max(1, -(-min_tile // w))
  tw, th = w * k, h * k
  font = ImageFont.load_default()
  width = max(8, tw // 6)                       # characters per caption line
  lines = [textwrap.wrap(str(p), width)[:3] or [""] for p in prompts[:n]]
  lines += [[""]] * (n - len(lines))
  cap = 12 * max(len(ln) for ln in lines) + pad
  rows = -(-n // cols)
  canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + cap + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    x, y = pad + q * (tw + pad), pad + r * (th + cap + pad)
    tile = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8).repeat(k, 0).repeat(k, 1)
    canvas.paste(Image.fromarray(tile), (x, y))
    for j, text in enumerate(lines[i]):
      draw.text((x, y + th + 2 + 12 * j), text, fill="black", font=font)
  return np.asarray(canvas)


def save_grid_png(path: str, images: np.ndarray, prompts: Sequence[str]) -> None:
  """Writes the evaluation grid as a PNG, each tile upscaled to a visible size with its prompt
  under it (``captioned_grid``), and beside it (same name, ``.txt``) the prompt of each image
  in grid order (row-major), one per line as ``row,col: prompt``."""
  from PIL import Image
  images = np.asarray(images)
  cols = int(math.ceil(math.sqrt(len(images))))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(captioned_grid(images, prompts, cols)).save(path)
  with open(os.path.splitext(path)[0] + ".txt", "w") as f:
    for i, p in enumerate(prompts[: len(images)]):
      f.write(f"{i // cols},{i % cols}: {p}\n")


class RunLogger:
  """Writes scalars and images to TensorBoard (process 0 only), keeps a JSON history and a
  reward-curve PNG in the workdir, and prints progress with rate and ETA."""

  def __init__(self, workdir: str, total_epochs: int, history: list | None = None):
    self.workdir = workdir
    self.total = total_epochs
    self.history = list(history or [])
    self.epoch_times: list[float] = []
    self.eval_times: list[float] = []   # evaluations' seconds without compiling
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
    """Each non-empty set of images as one grid (``log_images`` 0: none)."""
    grids = {k: image_grid(v)[None] for k, v in images.items() if len(v)}
    if self.writer is not None and grids:
      self.writer.write_images(step, grids)

  def eval_grid(self, step: int, images: np.ndarray, prompts: Sequence[str]):
    """An evaluation's grid as ``eval_samples/epoch_NNNN.png`` (+ ``.txt`` with its prompts)."""
    if self.is_main and len(images):
      save_grid_png(os.path.join(self.workdir, "eval_samples", f"epoch_{step:04d}.png"),
                    images, prompts)

  def evaluated(self, seconds: float, compile_seconds: float = 0.0):
    """Records an evaluation's time (without compiling) for the ETA."""
    self.eval_times.append(max(seconds - compile_seconds, 0.0))

  def progress(self, epoch: int, seconds: float, extra: Mapping[str, float],
               compile_seconds: float = 0.0, evals_left: int = 0):
    """Prints 'epoch e/N | k=v ... | s/epoch | ETA'. The rate is the mean epoch time without
    the time spent compiling (``compile_seconds``, measured by ``CompileClock``), so the
    first epoch's ETA is not inflated by compilation; the ETA adds ``evals_left`` evaluations
    at their mean recorded time."""
    self.epoch_times.append(max(seconds - compile_seconds, 1e-3))
    rate = sum(self.epoch_times) / len(self.epoch_times)
    per_eval = sum(self.eval_times) / len(self.eval_times) if self.eval_times else 0.0
    eta = rate * (self.total - epoch) + per_eval * evals_left
    parts = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
    comp = f", {compile_seconds:.0f} s of it compiling" if compile_seconds >= 1 else ""
    if self.is_main:
      print(f"epoch {epoch}/{self.total} | {parts} | {seconds:.1f} s{comp} (mean "
            f"{rate:.1f} s/epoch) | ETA {eta / 60:.1f} min", flush=True)

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
