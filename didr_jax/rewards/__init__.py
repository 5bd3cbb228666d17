"""Rewards: ``make(name)`` / ``from_config({name: weight})``; importing registers the built-ins."""

from didr_jax.rewards import clip_rewards  # noqa: F401  (registers pickscore, aesthetic)
from didr_jax.rewards import toy  # noqa: F401  (registers toy rewards)
from didr_jax.rewards.base import (AsyncRewards, Reward, from_config, make, names, register,
                                   weighted_sum)
