"""What the loop needs from a method's trainer: the phases of an epoch, which the loop runs.

The loop (``train.loop``) owns the epoch: the RNG, the prompts, the rewards, the timing, the
stops, logging and progress. Per epoch it does

    k_batches, k_update = trainer.epoch_keys(fold_in(key(seed), epoch))
    for b in range(sample.num_batches):
      prompts = next prompts (sample.batch_size / group_size prompts x group_size)
      state, images, data = trainer.rollout(state, prompts, fold_in(k_batches, b))
      future = rewarder.submit(images, prompts)        # scored on the host, in a thread
      state, data = trainer.after_rollout(state, data, future)
    rewards = every host's rewards, in batch order
    state, metrics = trainer.update(state, [data], prompts, rewards, k_update)

and adds ``reward_mean``, ``reward_std`` and the timings to the method's own metrics. Methods
differ in where they change the state: DDPO and CRD only in ``update`` (after the whole epoch is
sampled and scored), DIDR in ``rollout`` (its one-step samples come out of the generator update),
TDM and TDM-R1 in ``after_rollout`` (TDM-R1 waits there for the batch's rewards).
``updates_each_batch`` says which: a stop request abandons the epoch while the state is still
the input state (before any batch, or before the update when only ``update`` changes it).

``state`` is a pytree of arrays (everything Orbax saves); the trainer may keep host state
(advantage statistics, the non-finite guard) that it exposes as JSON for the checkpoint.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Sequence

import jax
import numpy as np


class Trainer:
  """Base class of the trainers: the phases (above) and their defaults.

  Subclasses set ``self.guard`` (a ``common.NonFiniteGuard``) and implement ``init_state``,
  ``policy_params``, ``sample``, ``rollout`` and ``update``."""

  updates_each_batch: bool = False      # True: rollout / after_rollout change the state
  progress_keys: tuple[str, ...] = ("reward_mean", "loss", "nonfinite")  # the progress line's

  def init_state(self) -> Any:
    """The initial state (parameters, optimizer states, EMA, step); called once."""
    raise NotImplementedError

  def host_state(self) -> dict:
    """JSON-able host state saved with each checkpoint (keys other than 'stream'/'history'):
    by default the non-finite guard's count."""
    return {"nonfinite": self.guard.state_dict()}

  def load_host_state(self, d: dict) -> None:
    """Restores ``host_state()`` from a checkpoint's host dict."""
    self.guard.load_state_dict(d.get("nonfinite", {}))

  def policy_params(self, state: Any) -> Any:
    """The parameters to sample / evaluate with."""
    raise NotImplementedError

  def sample(self, params: Any, prompts: Sequence[str], rng: jax.Array, **kw) -> tuple:
    """(trajectory, images (B, H, W, 3) in [0, 1], cond, uncond) for ``prompts``; the
    multi-step policies (``methods.Method.policy``) take ``num_steps``, ``eta``, ``guidance``."""
    raise NotImplementedError

  def epoch_keys(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the key the batches' keys are folded from, the update's key) of an epoch's key."""
    k_batches, k_update = jax.random.split(rng)
    return k_batches, k_update

  def rollout(self, state: Any, prompts: Sequence[str], rng: jax.Array) -> tuple:
    """One sampling batch -> (state, images (B, H, W, 3) in [0, 1] to score, data)."""
    raise NotImplementedError

  def after_rollout(self, state: Any, data: Any, rewards: Future) -> tuple[Any, Any]:
    """What a method does with a batch before the next one (``rewards``: the future of this
    batch's rewards, this host's rows) -> (state, data). Default: nothing."""
    del rewards
    return state, data

  def update(self, state: Any, batches: list, prompts: list[str], rewards: np.ndarray,
             rng: jax.Array) -> tuple[Any, dict]:
    """The end of an epoch -> (state, this method's scalar metrics). ``batches`` are the
    ``data`` of every batch, ``prompts`` and ``rewards`` (all hosts') in the same order.
    Default, for the methods that update per batch (their ``data`` is the batch's metrics):
    the last step's non-finite check, then each metric averaged over the batches."""
    del prompts, rewards, rng
    self.guard.flush()
    return state, {k: float(np.mean([float(m[k]) for m in batches])) for k in batches[0]}
