"""The exact benchmark's problems (a data mixture and its rewards' parameters) and their rewards
(``Problem.rewards``: functions of the points), which ``didr_jax.rewards.exact`` registers as
"exact_<problem>_<linear|quadratic|box>" (the registry names every reward; this module, below
it, imports nothing of it).

Samples are D-dimensional points; the rewards read them from the "images" (B, 1, D, 3) the exact
backbone's ``decode`` makes (``to_images`` / ``points``), as rewards take (B, H, W, 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.exact import kinds, mixture as mixture_lib, tilt as tilt_lib


@dataclasses.dataclass(frozen=True)
class Problem:
  """A benchmark problem: the data mixture and its rewards' parameters (the tilt strength beta
  belongs to each method's config: 1/beta = DIDR's reward_scale, DDPO's KL coefficient, ...)."""
  make_mixture: Callable[[], mixture_lib.GaussianMixture]
  linear_b: tuple
  quadratic_q: tuple
  quadratic_c: tuple
  box: tuple | None = None      # (lo, hi) of the indicator reward, 2-D only

  def rewards(self) -> dict[str, Callable]:
    out = {"linear": tilt_lib.linear_reward(np.asarray(self.linear_b)),
           "quadratic": tilt_lib.quadratic_reward(np.asarray(self.quadratic_q),
                                                  np.asarray(self.quadratic_c))}
    if self.box is not None:
      out["box"] = tilt_lib.box_reward(*map(np.asarray, self.box))
    return out

  def tilted(self, reward: str, beta: float):
    """The exact optimum p_ref e^{r/beta}/Z of reward ``reward`` (a mixture or a ``BoxTilt``)."""
    mix = self.make_mixture()
    if reward == "linear":
      return tilt_lib.tilt_linear(mix, np.asarray(self.linear_b), beta)
    if reward == "quadratic":
      return tilt_lib.tilt_quadratic(mix, np.asarray(self.quadratic_q),
                                     np.asarray(self.quadratic_c), beta)
    return tilt_lib.BoxTilt.create(mix, *self.box, beta)


PROBLEMS = {
    "ring2d": Problem(lambda: mixture_lib.ring_2d(num_prompts=2), linear_b=(1.0, 0.5),
                      quadratic_q=((1.0, 0.0), (0.0, 1.0)), quadratic_c=(3.0, 0.0),
                      box=((1.5, -1.0), (4.0, 1.2))),
    "mix16d": Problem(lambda: mixture_lib.random_mixture(dim=16, num_prompts=2),
                      linear_b=tuple([0.3] * 4 + [0.0] * 12),
                      quadratic_q=tuple(map(tuple, 0.1 * np.eye(16))),
                      quadratic_c=tuple([1.0] * 16)),
}


assert tuple(PROBLEMS) == kinds.PROBLEM_NAMES


def parse_kind(kind: str) -> tuple[str, str]:
  """"exact_<problem>[_flow]" -> (problem, family)."""
  name = kind.removeprefix("exact_")
  family = "flow" if name.endswith("_flow") else "vp"
  return name.removesuffix("_flow"), family


# ---------------------------------------------------------------------------------- images

def to_images(points: jax.Array) -> jax.Array:
  """(B, ..., D) points -> (B, 1, D, 3) "images" (the coordinates in each channel)."""
  x = points.reshape(points.shape[0], 1, -1, 1).astype(jnp.float32)
  return jnp.broadcast_to(x, x.shape[:3] + (3,))


def points(images) -> Any:
  """(B, 1, D, 3) "images" -> (B, D) points (NumPy in, NumPy out; JAX in, JAX out)."""
  return images[:, 0, :, 0]
