"""A GenEval-like object detector and reward for the toy shapes world (host-side NumPy/SciPy).

Detection of one RGB image, in pixel units with values on the 0..255 scale:

1. **Colour segmentation.** Each pixel goes to its nearest reference colour among the palette and
   the background (Euclidean RGB). It is a *core* pixel of palette colour ``k`` when that nearest
   colour is ``k`` and it lies within ``max_dist`` of it; background-nearest pixels are ignored.
2. **Objects.** 4-connected components of each colour's core mask (``scipy.ndimage.label``);
   components with fewer than ``min_area`` core pixels are specks and dropped.
3. **Soft mask.** Anti-aliased edges hold partial coverage, so each object is measured on a soft
   mask over its core dilated by one pixel: ``a = clip(<p - bg, c_k - bg> / |c_k - bg|^2, 0, 1)``,
   the fraction of colour ``k`` in the pixel when it is a blend of background and ``c_k``.
   ``area = sum(a)``.
4. **Shape** from normalised central moments of ``a`` (``x' = (x - mean x) / std x``, same for
   ``y``; expectations weighted by ``a``), all scale-invariant:

   - ``skew = max(|E[x'^3]|, |E[y'^3]|)``: 0 for the symmetric circle and square, about 0.57 for
     a triangle (mass piles up towards its base) -> ``triangle`` when ``skew > skew_threshold``;
   - otherwise ``rho = (E[x'^4] + E[y'^4]) / (2 E[x'^2 y'^2])``: 9/5 for any filled rectangle
     (x and y independent), 3 for a filled disc (and for a Gaussian blob) -> ``square`` when
     ``rho < rho_threshold`` else ``circle``;
   - ``unknown`` when ``std x / std y`` is beyond ``max_aspect`` either way (elongated blobs).

   On rendered shapes (7-11 px at 32 px, also with noise of std 20) the measured ranges are
   skew <= 0.09 vs >= 0.35 and rho <= 1.96 vs >= 2.69, so the thresholds 0.22 and 2.3 sit in wide
   margins.

Reward (:func:`score`) of an image for a prompt with clauses ``(n_k, colour_k, shape_k)``::

    score = mean_k 1[#detected(colour_k, shape_k) == n_k] / (1 + #extra)

where ``#extra`` counts detected objects whose (colour, shape) no clause names (``unknown``
shapes included). It is 1 exactly when the image shows precisely what the prompt asks for, 0
when no clause holds, and every unrequested object halves, thirds, ... what is left.
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from didr_jax.toy.shapes import BACKGROUND, COLOURS, PALETTE, parse_prompt

# Reference colours: the palette, then the background as the last row.
_REFS = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], np.float32)
_BG = _REFS[-1]
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)  # 4-connectivity
_EIGHT = np.ones((3, 3), bool)


class Detection(NamedTuple):
  """One detected object: bbox = (y0, x0, y1, x1) of its core pixels, ends exclusive."""
  colour: str
  shape: str
  bbox: tuple[int, int, int, int]
  area: float


def _as_rgb255(image) -> np.ndarray:
  """float32 (H, W, 3) on the 0..255 scale from uint8/int images or floats in [0, 1]."""
  img = np.asarray(image)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
  if np.issubdtype(img.dtype, np.floating):
    return np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0
  return img.astype(np.float32)


def _classify(a: np.ndarray, skew_threshold: float, rho_threshold: float,
              max_aspect: float) -> str:
  """Shape name from the normalised moments of the soft mask ``a`` (see the module docstring)."""
  mass = a.sum()
  y, x = np.indices(a.shape, dtype=np.float64)
  y -= (a * y).sum() / mass
  x -= (a * x).sum() / mass
  vy, vx = (a * y * y).sum() / mass, (a * x * x).sum() / mass
  if min(vx, vy) <= 1e-6 or not 1 / max_aspect <= np.sqrt(vx / vy) <= max_aspect:
    return "unknown"
  y /= np.sqrt(vy)
  x /= np.sqrt(vx)
  skew = max(abs((a * x**3).sum()), abs((a * y**3).sum())) / mass
  if skew > skew_threshold:
    return "triangle"
  rho = ((a * x**4).sum() + (a * y**4).sum()) / (2 * (a * x * x * y * y).sum())
  return "square" if rho < rho_threshold else "circle"


def detect(image, *, max_dist: float = 60.0, min_area: float | None = None,
           skew_threshold: float = 0.22, rho_threshold: float = 2.3,
           max_aspect: float = 1.5) -> list[Detection]:
  """Objects in one image (uint8, or float in [0, 1]), ordered by colour then position.

  ``min_area`` (core pixels) defaults to 8 at 32 x 32 and scales with the image area.
  """
  img = _as_rgb255(image)
  h, w, _ = img.shape
  if min_area is None:
    min_area = 8.0 * h * w / 1024.0
  d2 = ((img[:, :, None, :] - _REFS) ** 2).sum(-1)
  nearest = d2.argmin(-1)
  nearest[d2.min(-1) >= max_dist**2] = len(COLOURS)  # too far from everything: background
  found = []
  for k in np.unique(nearest):
    if k == len(COLOURS):
      continue
    labels, _ = ndimage.label(nearest == k, structure=_FOUR)
    counts = np.bincount(labels.ravel())
    direction = _REFS[k] - _BG
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
      if sl is None or counts[i] < min_area:
        continue
      # One pixel of margin around the core: objects are >= 2 px apart, so it only reaches
      # this object's own anti-aliased edge.
      win = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, (h, w)))
      soft = ndimage.binary_dilation(labels[win] == i, structure=_EIGHT)
      a = np.clip((img[win] - _BG) @ direction / (direction @ direction), 0.0, 1.0) * soft
      shape = _classify(a.astype(np.float64), skew_threshold, rho_threshold, max_aspect)
      bbox = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
      found.append(Detection(COLOURS[k], shape, bbox, float(a.sum())))
  return found


def score(image, prompt: str, **detect_kwargs) -> float:
  """The reward of ``image`` for ``prompt`` in [0, 1] (formula in the module docstring)."""
  clauses = parse_prompt(prompt)
  counts = collections.Counter((d.colour, d.shape) for d in detect(image, **detect_kwargs))
  hits = sum(counts[(c.colour, c.shape)] == c.count for c in clauses)
  named = {(c.colour, c.shape) for c in clauses}
  extra = sum(n for key, n in counts.items() if key not in named)
  return hits / len(clauses) / (1 + extra)


def _paired(images, prompts: Sequence[str]) -> np.ndarray:
  """The (B, H, W, 3) batch as an array, checked to hold one image per prompt."""
  images = np.asarray(images)
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
  return images


def batch_score(images, prompts: Sequence[str], **detect_kwargs) -> np.ndarray:
  """:func:`score` of each (B, H, W, 3) image (uint8, or float in [0, 1]) for its prompt: (B,) f32."""
  images = _paired(images, prompts)
  return np.array([score(im, p, **detect_kwargs) for im, p in zip(images, prompts)], np.float32)


def shape_accuracy(images, prompts: Sequence[str], **detect_kwargs) -> float:
  """How often a detected object has the shape its prompt asks of its colour: over all detected
  objects whose colour the prompt names with exactly one shape, the fraction that has that shape
  (NaN when there are none). Rendered images score ~1; a base that draws blobs of the right
  colours but no legible shape scores near chance (1/4: square, circle, triangle, unknown)."""
  right = total = 0
  for image, prompt in zip(_paired(images, prompts), prompts):
    asked = collections.defaultdict(set)
    for c in parse_prompt(prompt):
      asked[c.colour].add(c.shape)
    for d in detect(image, **detect_kwargs):
      if len(asked[d.colour]) == 1:
        total += 1
        right += d.shape in asked[d.colour]
  return right / total if total else float("nan")
