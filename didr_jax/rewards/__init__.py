"""Rewards: ``make(name)`` / ``from_config({name: weight})``; importing registers the built-ins."""

from didr_jax.rewards import clip_rewards, remote, toy  # noqa: F401  (register the built-ins)
from didr_jax.exact import problems as _exact_problems  # noqa: F401  (exact_* point rewards)
from didr_jax.rewards.base import (AsyncRewards, Reward, RewardError, from_config, make, names,
                                   register, weighted_sum)
