"""Rewards: ``make(name)`` / ``from_config({name: weight})``; importing registers the built-ins."""

from didr_jax.rewards import clip_rewards, exact, remote, toy  # noqa: F401  (the built-ins)
from didr_jax.errors import RewardError  # noqa: F401  (the rewards' user error)
from didr_jax.rewards.base import (AsyncRewards, Reward, from_config, make, names,  # noqa: F401
                                   register, weighted_sum)
