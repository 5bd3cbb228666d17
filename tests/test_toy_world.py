"""The toy shapes world: rendering, prompt grammar and splits, detector reward, Frechet distance."""

import hashlib

import numpy as np
import pytest
import scipy.linalg

from didr_jax.toy import detector, fidelity, shapes
from didr_jax.toy.shapes import Clause, Scene


@pytest.fixture(scope="module")
def data():
  """300 rendered images, prompts drawn from the whole grammar."""
  return shapes.dataset(300, seed=11, prompts=shapes.all_prompts())


# ----------------------------------------------------------------------------- rendering


def test_render_deterministic_per_seed():
  scene = Scene((Clause(2, "red", "circle"), Clause(1, "blue", "triangle")))
  a, b, c = (shapes.render(scene, s) for s in (5, 5, 6))
  assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert shapes.render(scene, 3, size=48).shape == (48, 48, 3)
  (x1, p1), (x2, p2) = shapes.dataset(12, seed=3), shapes.dataset(12, seed=3)
  np.testing.assert_array_equal(x1, x2)
  assert p1 == p2 and set(p1) <= set(shapes.train_prompts())
  assert not np.array_equal(shapes.dataset(12, seed=4)[0], x1)
  # Item i depends only on (seed, i): a shorter dataset is a prefix of a longer one.
  np.testing.assert_array_equal(shapes.dataset(5, seed=3)[0], x1[:5])
  assert shapes.sample_scene(9) == shapes.sample_scene(9)
  assert shapes.prompt_of(shapes.sample_scene(9)) in shapes.all_prompts()
  assert shapes.sample_scene(0, "two green squares") == Scene((Clause(2, "green", "square"),))


def test_hard_edges_palette_area_and_bbox():
  """antialias=1 draws only palette and background colours; detect() finds each object's exact
  pixel set (bbox and area), colour and shape."""
  for seed in range(20):
    colour, shape = shapes.COLOURS[seed % 5], shapes.SHAPES[seed % 3]
    img = shapes.render(Scene(((1, colour, shape),)), seed, antialias=1)
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert colours == {shapes.BACKGROUND, shapes.PALETTE[colour]}
    ys, xs = np.nonzero(np.any(img != shapes.BACKGROUND, axis=-1))
    (det,) = detector.detect(img)
    assert (det.colour, det.shape) == (colour, shape)
    assert det.bbox == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    assert det.area == pytest.approx(len(ys), abs=1e-4)


# ----------------------------------------------------------------------------- prompts and splits


def test_parse_print_round_trip():
  prompts = shapes.all_prompts()
  assert len(prompts) == len(set(prompts)) == 5 * 3 * 3 + 105 * 3
  for p in prompts:
    clauses = shapes.parse_prompt(p)
    assert shapes.prompt_of(clauses) == p
    assert 1 <= Scene(clauses).num_objects <= 3
  assert shapes.parse_prompt("  A Yellow   TRIANGLE and two blue squares. ") == (
      Clause(1, "yellow", "triangle"), Clause(2, "blue", "square"))
  assert shapes.parse_prompt("one red circle") == (Clause(1, "red", "circle"),)
  bad = {"a orange circle": "unknown colour 'orange'", "a red hexagon": "unknown shape 'hexagon'",
         "four red circles": "unknown count word 'four'", "two red circle": "does not agree",
         "a red circles": "does not agree", "two red circles and two blue squares": "at most 3",
         "a red circle and a red circle": "different", "a red circle and": "not '<count>",
         "a red circle and a blue square and a green triangle": "1 or 2 clauses", "": "empty"}
  for text, message in bad.items():
    with pytest.raises(ValueError, match=message):
      shapes.parse_prompt(text)


def test_splits_disjoint_deterministic_covering():
  train, heldout = shapes.train_prompts(), shapes.heldout_prompts()
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == sorted(shapes.all_prompts())
  assert len(heldout) == round(0.2 * len(shapes.all_prompts()))
  assert shapes._split.__wrapped__() == (train, heldout)  # recomputed, not cached
  seen = {(c.colour, c.shape) for p in train for c in shapes.parse_prompt(p)}
  assert seen == {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES}
  # Held-out prompts span counts and single/two-clause forms, not one corner of the grammar.
  assert {len(shapes.parse_prompt(p)) for p in heldout} == {1, 2}
  assert {c.count for p in heldout for c in shapes.parse_prompt(p)} == {1, 2, 3}
  # The split depends only on SHA-256 of the texts: pinned so it never silently changes.
  digest = hashlib.sha256("\n".join(heldout).encode()).hexdigest()[:16]
  assert digest == HELDOUT_DIGEST


HELDOUT_DIGEST = "c5d7e85abe8c9cfd"


# ----------------------------------------------------------------------------- detector reward


def test_detector_scores_own_prompts(data):
  images, prompts = data
  own = detector.batch_score(images, prompts)
  mismatched = detector.batch_score(images, prompts[1:] + prompts[:1])
  print(f"own: exact {np.mean(own == 1):.4f} mean {own.mean():.4f}; "
        f"mismatched: exact {np.mean(mismatched == 1):.4f} mean {mismatched.mean():.4f}")
  assert np.mean(own == 1.0) >= 0.98
  assert mismatched.mean() < 0.25


def test_shape_accuracy(data):
  """Rendered images have the shapes their prompts ask for; the same images judged against
  prompts with every shape swapped (same colours and counts) have none of them."""
  images, prompts = data
  assert detector.shape_accuracy(images, prompts) >= 0.98
  other = {"circle": "square", "square": "triangle", "triangle": "circle"}
  swapped = [shapes.prompt_of([c._replace(shape=other[c.shape]) for c in shapes.parse_prompt(p)])
             for p in prompts]
  assert detector.shape_accuracy(images, swapped) <= 0.02
  blank = np.full((2, 32, 32, 3), shapes.BACKGROUND, np.uint8)
  assert np.isnan(detector.shape_accuracy(blank, prompts[:2]))


def test_detector_robust_to_noise(data):
  images, prompts = data
  noise = np.random.default_rng(0).normal(0.0, 10.0, images.shape)  # std 10 of 255
  noisy = np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)
  scores = detector.batch_score(noisy, prompts)
  print(f"noisy (std 10/255): exact {np.mean(scores == 1):.4f}")
  assert np.mean(scores == 1.0) >= 0.95


def test_score_definition():
  """mean over clauses of 1[count matches], divided by 1 + number of unrequested objects."""
  img = shapes.render(Scene(((1, "red", "circle"), (1, "blue", "square"))), 2)
  cases = {"a red circle and a blue square": 1.0, "a blue square and a red circle": 1.0,
           "a red circle": 0.5, "two red circles": 0.0, "a red circle and a blue triangle": 0.25,
           "a red circle and two blue squares": 0.5, "a green circle": 0.0}
  for prompt, expected in cases.items():
    assert detector.score(img, prompt) == pytest.approx(expected), prompt
  blank = np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)
  assert detector.detect(blank) == [] and detector.score(blank, "a red circle") == 0.0
  # Specks below min_area are ignored.
  speck = blank.copy()
  speck[3:5, 3:5] = shapes.PALETTE["green"]
  assert detector.detect(speck) == []


def test_batch_score_equals_score(data):
  images, prompts = data[0][:24], list(data[1][:24])
  prompts[::3] = prompts[1::3]  # a third mismatched, for a spread of values
  batch = detector.batch_score(images, prompts)
  assert batch.dtype == np.float32 and batch.shape == (24,)
  single = np.array([detector.score(im, p) for im, p in zip(images, prompts)], np.float32)
  np.testing.assert_array_equal(batch, single)
  assert len(set(batch.tolist())) > 1
  # Floats in [0, 1] are the same images.
  np.testing.assert_array_equal(detector.batch_score(images / 255.0, prompts), batch)


# ----------------------------------------------------------------------------- Frechet distance


def test_gaussian_stats_and_self_distance():
  x = np.random.default_rng(1).normal(size=(50, 6)) @ np.random.default_rng(2).normal(size=(6, 6))
  mu, cov = fidelity.gaussian_stats(x)
  np.testing.assert_allclose(mu, x.mean(0), atol=1e-12)
  np.testing.assert_allclose(cov, np.cov(x, rowvar=False), atol=1e-12)
  assert fidelity.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
  # Singular covariance (N < D): still ~0 with itself, and a pure shift gives |shift|^2.
  y = np.random.default_rng(3).normal(size=(10, 32))
  mu, cov = fidelity.gaussian_stats(y)
  assert fidelity.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)
  shift = np.linspace(-1, 1, 32)
  mu2, cov2 = fidelity.gaussian_stats(y + shift)
  assert fidelity.frechet_distance(mu, cov, mu2, cov2) == pytest.approx(shift @ shift, rel=1e-6)


def test_frechet_closed_forms():
  rng = np.random.default_rng(4)
  d = 8
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  # Diagonal covariances: sum_i (mu1_i - mu2_i)^2 + (sqrt(v1_i) - sqrt(v2_i))^2.
  expected = np.sum((mu1 - mu2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = fidelity.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-10)
  # Full covariances against the textbook formula with scipy's general sqrtm of C1 C2.
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
  textbook = (np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
              - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2)).real)
  assert fidelity.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(textbook, rel=1e-8)
  # Symmetric in its arguments.
  assert fidelity.frechet_distance(mu2, c2, mu1, c1) == pytest.approx(textbook, rel=1e-8)
  with pytest.raises(ValueError, match="shape mismatch"):
    fidelity.frechet_distance(mu1, c1, mu2[:-1], c2)
