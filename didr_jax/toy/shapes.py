"""The toy shapes world: a deterministic, tiny text-to-image world for CPU-sized experiments.

An image (``size`` x ``size`` RGB, 32 by default) shows 1 to 3 flat objects -- circles, squares
and upright triangles in a palette of well-separated colours -- on a plain light-grey background.
Objects never overlap: their bounding boxes are at least ``MIN_GAP`` pixels apart, so a
connected-component detector (``didr_jax.toy.detector``) sees each one separately.

Prompt grammar (lower case, canonical spelling is what :func:`prompt_of` prints)::

    prompt := clause | clause " and " clause
    clause := count " " colour " " noun
    count  := "a" (1) | "two" (2) | "three" (3)     ("one" is accepted by the parser too)
    noun   := shape if count == 1 else shape + "s"

The two clauses of a prompt name different (colour, shape) pairs and at most 3 objects in all,
e.g. "a red circle", "three yellow triangles", "two blue squares and a green circle".
:func:`all_prompts` enumerates the grammar once per unordered clause pair (canonical order: by
palette index, then shape index); the parser also accepts the other order and keeps it.

Everything is NumPy; each image is a pure function of its scene and an integer seed (or a
``np.random.Generator``), so datasets are reproducible item by item.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from typing import NamedTuple, Sequence

import numpy as np

# Colours are far apart in RGB and every colour-to-background blend (anti-aliased edges) stays
# more than 110 units from every *other* palette colour, so a nearest-colour detector with a
# distance threshold never mistakes an edge pixel for another colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (180, 50, 200),
}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MAX_OBJECTS = 3
MIN_GAP = 2  # pixels between object bounding boxes (and 1 to the image border)
OBJECT_SIZE = (7.0, 11.0)  # side / diameter range in pixels at 32 px; scales with the image size

_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
_WORD_NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3}


class Clause(NamedTuple):
  """``count`` objects of one ``colour`` and ``shape``."""
  count: int
  colour: str
  shape: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a prompt describes: one or two clauses with distinct (colour, shape), 1-3 objects."""
  clauses: tuple[Clause, ...]

  def __post_init__(self):
    clauses = tuple(Clause(*c) for c in self.clauses)
    object.__setattr__(self, "clauses", clauses)
    if not 1 <= len(clauses) <= 2:
      raise ValueError(f"a scene has 1 or 2 clauses, got {len(clauses)}")
    for c in clauses:
      if c.colour not in PALETTE:
        raise ValueError(f"unknown colour {c.colour!r}; known: {', '.join(COLOURS)}")
      if c.shape not in SHAPES:
        raise ValueError(f"unknown shape {c.shape!r}; known: {', '.join(SHAPES)}")
      if not 1 <= c.count <= MAX_OBJECTS:
        raise ValueError(f"clause count must be 1..{MAX_OBJECTS}, got {c.count}")
    if len({(c.colour, c.shape) for c in clauses}) != len(clauses):
      raise ValueError(f"clauses must name different (colour, shape) pairs: {clauses}")
    if self.num_objects > MAX_OBJECTS:
      raise ValueError(f"a scene has at most {MAX_OBJECTS} objects, got {self.num_objects}")

  @property
  def num_objects(self) -> int:
    return sum(c.count for c in self.clauses)

  def objects(self) -> list[tuple[str, str]]:
    """The (colour, shape) of every object, clause by clause."""
    return [(c.colour, c.shape) for c in self.clauses for _ in range(c.count)]


# ----------------------------------------------------------------------------- prompts


def _clause_text(c: Clause) -> str:
  return f"{_NUMBER_WORDS[c.count]} {c.colour} {c.shape}{'s' if c.count > 1 else ''}"


def prompt_of(scene: Scene | Sequence[Clause]) -> str:
  """The canonical prompt of a scene (or of a sequence of clauses), clauses in their order."""
  if not isinstance(scene, Scene):
    scene = Scene(tuple(scene))
  return " and ".join(_clause_text(c) for c in scene.clauses)


def _parse_clause(text: str, prompt: str) -> Clause:
  words = text.split()
  if len(words) != 3:
    raise ValueError(f"clause {text!r} of prompt {prompt!r} is not '<count> <colour> <shape>'")
  number, colour, noun = words
  if number not in _WORD_NUMBERS:
    raise ValueError(f"unknown count word {number!r} in prompt {prompt!r}; "
                     f"known: {', '.join(_WORD_NUMBERS)}")
  if colour not in PALETTE:
    raise ValueError(f"unknown colour {colour!r} in prompt {prompt!r}; known: {', '.join(COLOURS)}")
  count = _WORD_NUMBERS[number]
  shape = noun[:-1] if noun.endswith("s") else noun
  if shape not in SHAPES:
    raise ValueError(f"unknown shape {noun!r} in prompt {prompt!r}; known: {', '.join(SHAPES)}")
  if (count > 1) != noun.endswith("s"):
    raise ValueError(f"count {number!r} does not agree with {noun!r} in prompt {prompt!r}")
  return Clause(count, colour, shape)


@functools.lru_cache(maxsize=4096)
def parse_prompt(text: str) -> tuple[Clause, ...]:
  """Parse a prompt of the grammar into its clauses (case, extra spaces and a final '.' ignored).

  Raises ``ValueError`` naming the offending word for anything outside the grammar, and for
  clause combinations that are not a valid :class:`Scene`.
  """
  norm = " ".join(text.lower().strip().rstrip(".").split())
  if not norm:
    raise ValueError("empty prompt")
  clauses = tuple(_parse_clause(part, text) for part in norm.split(" and "))
  try:
    Scene(clauses)
  except ValueError as e:
    raise ValueError(f"invalid prompt {text!r}: {e}") from None
  return clauses


@functools.lru_cache(maxsize=None)
def all_prompts() -> tuple[str, ...]:
  """Every prompt of the grammar once (two-clause prompts in canonical clause order)."""
  pairs = list(itertools.product(COLOURS, SHAPES))
  out = [_clause_text(Clause(n, c, s)) for c, s in pairs for n in range(1, MAX_OBJECTS + 1)]
  for (c1, s1), (c2, s2) in itertools.combinations(pairs, 2):
    for n1, n2 in itertools.product(range(1, MAX_OBJECTS), repeat=2):
      if n1 + n2 <= MAX_OBJECTS:
        out.append(prompt_of([Clause(n1, c1, s1), Clause(n2, c2, s2)]))
  return tuple(out)


def _stable_unit(text: str) -> float:
  """A hash of ``text`` in [0, 1) that, unlike ``hash()``, is the same in every process."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


@functools.lru_cache(maxsize=None)
def _split(heldout_fraction: float = 0.2) -> tuple[tuple[str, ...], tuple[str, ...]]:
  prompts = all_prompts()
  # "a <colour> <shape>" for every pair always trains, so every colour, shape and their pairing is
  # seen in training; held-out prompts test new *compositions* and counts of seen concepts.
  anchors = {_clause_text(Clause(1, c, s)) for c in COLOURS for s in SHAPES}
  candidates = sorted((p for p in prompts if p not in anchors), key=_stable_unit)
  heldout = set(candidates[:round(heldout_fraction * len(prompts))])
  return (tuple(p for p in prompts if p not in heldout), tuple(p for p in prompts if p in heldout))


def train_prompts() -> tuple[str, ...]:
  """About 80% of :func:`all_prompts`, fixed forever by a SHA-256 hash of the text."""
  return _split()[0]


def heldout_prompts() -> tuple[str, ...]:
  """The other ~20%: disjoint from :func:`train_prompts`; never a single-object prompt."""
  return _split()[1]


# ----------------------------------------------------------------------------- scenes and images


def sample_scene(rng: np.random.Generator | int, prompt: str | None = None) -> Scene:
  """The scene of ``prompt``, or of a prompt drawn uniformly from :func:`all_prompts`."""
  rng = np.random.default_rng(rng)
  if prompt is None:
    prompts = all_prompts()
    prompt = prompts[rng.integers(len(prompts))]
  return Scene(parse_prompt(prompt))


def _layout(n: int, size: int, rng: np.random.Generator, max_tries: int = 1000):
  """``n`` non-overlapping axis-aligned boxes as (centre_y, centre_x, half_side), by rejection."""
  lo, hi = (s * size / 32.0 for s in OBJECT_SIZE)
  for _ in range(max_tries):
    boxes = []
    for _ in range(n):
      r = rng.uniform(lo, hi) / 2
      cy, cx = rng.uniform(1 + r, size - 1 - r, size=2)
      # Boxes are separated when their gap along y or along x is at least MIN_GAP.
      if all(max(abs(cy - y) - r - q, abs(cx - x) - r - q) >= MIN_GAP for y, x, q in boxes):
        boxes.append((cy, cx, r))
      else:
        break
    if len(boxes) == n:
      return boxes
  raise RuntimeError(f"could not place {n} objects in a {size}x{size} image")


def _coverage(shape: str, cy: float, cx: float, r: float, y: np.ndarray, x: np.ndarray):
  """Boolean inside-test at sample points (y, x); shapes have side / diameter 2r, centred."""
  dy, dx = y - cy, x - cx
  if shape == "circle":
    return dy * dy + dx * dx <= r * r
  if shape == "square":
    return (np.abs(dy) <= r) & (np.abs(dx) <= r)
  # Upright isosceles triangle, apex at the top, base 2r wide at the bottom: its half width
  # grows linearly from 0 at dy = -r to r at dy = r, so it fills half its bounding box.
  return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)


def render(scene: Scene, rng: np.random.Generator | int, size: int = 32, antialias: int = 4,
           background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
  """Draw ``scene`` at random positions and sizes; returns uint8 (size, size, 3).

  Each pixel is ``(1 - a) * background + a * colour`` where ``a`` is the fraction of its
  ``antialias x antialias`` sub-pixel samples inside the object (``antialias=1``: hard edges).
  """
  rng = np.random.default_rng(rng)
  objects = scene.objects()
  boxes = _layout(len(objects), size, rng)
  # Sub-pixel sample centres in pixel units (pixel i covers [i, i + 1)).
  t = (np.arange(size * antialias) + 0.5) / antialias
  y, x = t[:, None], t[None, :]
  img = np.broadcast_to(np.asarray(background, np.float64), (size, size, 3)).copy()
  for (colour, shape), (cy, cx, r) in zip(objects, boxes):
    inside = _coverage(shape, cy, cx, r, y, x)
    a = inside.reshape(size, antialias, size, antialias).mean(axis=(1, 3))[..., None]
    img = (1 - a) * img + a * np.asarray(PALETTE[colour], np.float64)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def dataset(num: int, seed: int, prompts: Sequence[str] | None = None, size: int = 32,
            ) -> tuple[np.ndarray, list[str]]:
  """``num`` (image, prompt) pairs for pretraining: uint8 (num, size, size, 3) and the prompts.

  Item ``i`` depends only on ``(seed, i)`` (its own ``default_rng([seed, i])``), so any slice of
  a dataset can be regenerated alone. Prompts are drawn uniformly from ``prompts``, by default
  :func:`train_prompts` (held-out prompts stay unseen in pretraining).
  """
  prompts = train_prompts() if prompts is None else tuple(prompts)
  images = np.empty((num, size, size, 3), np.uint8)
  chosen = []
  for i in range(num):
    rng = np.random.default_rng([seed, i])
    prompt = prompts[rng.integers(len(prompts))]
    images[i] = render(sample_scene(rng, prompt), rng, size=size)
    chosen.append(prompt)
  return images, chosen
