"""Rewards of the exact benchmark: "exact_<problem>_<linear|quadratic|box>" for each problem of
``didr_jax.exact.problems.PROBLEMS`` and each of its ``Problem.rewards()``.

The benchmark's reward functions read points (B, D); a reward here reads them back from the
"images" (B, 1, D, 3) of the exact backbone (``problems.points``):

  r(images, prompts) = f(points(images))      (the prompts are ignored)

The linear and quadratic rewards are differentiable (``jax_fn``: no module, no prompt features);
the box indicator is a host reward. The registry imports the benchmark as it imports the toy
world (``rewards.toy``): the benchmark sits below the rewards and knows nothing of them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from didr_jax.exact.problems import PROBLEMS, points
from didr_jax.rewards.base import Reward, register


def _reward(pname: str, rname: str) -> Reward:
  """The reward ``exact_<pname>_<rname>``, its function built when the reward is made (building
  it runs JAX computations, which importing the registry must not: the compile cache and the
  devices are configured after the imports)."""
  fn = PROBLEMS[pname].rewards()[rname]

  def jax_fn(module, images, features):
    del module, features
    return fn(points(images))

  def host_fn(images, prompts):
    del prompts
    return np.asarray(fn(jnp.asarray(points(images))))

  diff = rname != "box"
  return Reward(f"exact_{pname}_{rname}", host_fn, diff, jax_fn if diff else None)


def _register_rewards() -> None:
  for pname, problem in PROBLEMS.items():
    for rname in ("linear", "quadratic") + (("box",) if problem.box is not None else ()):
      register(f"exact_{pname}_{rname}")(
          lambda pname=pname, rname=rname: _reward(pname, rname))


_register_rewards()
