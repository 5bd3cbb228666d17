"""Rewards: ``make(name)`` / ``from_config({name: weight})``; importing registers the built-ins."""

from didr_jax.rewards import clip_rewards, remote, toy  # noqa: F401  (register the built-ins)
from didr_jax.rewards.base import (AsyncRewards, Reward, RewardError, from_config, make, names,
                                   register, weighted_sum)
