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


def _register_rewards() -> None:
  for pname, problem in PROBLEMS.items():
    for rname, fn in problem.rewards().items():
      name = f"exact_{pname}_{rname}"

      def jax_fn(module, images, features, fn=fn):
        del module, features
        return fn(points(images))

      def host_fn(images, prompts, fn=fn):
        del prompts
        return np.asarray(fn(jnp.asarray(points(images))))

      make = (lambda name=name, host_fn=host_fn, jax_fn=jax_fn, diff=rname != "box":
              Reward(name, host_fn, diff, jax_fn if diff else None))
      register(name)(make)


_register_rewards()
