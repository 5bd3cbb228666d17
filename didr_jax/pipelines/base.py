"""The backbone API every trainer uses (SD/SDXL: ``sd.SDPipeline``; Z-Image: ``zimage``).

Trainers never touch model internals: they split ``model`` into graph + params, and call the
pure functions below inside their jitted steps. Conditioning objects are pytrees whose leaves
have the batch as leading axis (so trainers can concatenate, shuffle and shard them).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import jax


class Backbone(Protocol):
  family: str              # "vp" (DDIM policy) or "flow" (Flow-GRPO SDE policy)
  model: Any               # the trainable denoiser (an nnx.Module)

  def encode(self, prompts: Sequence[str]) -> Any:
    """Prompt conditioning for a batch (a pytree, batch-leading leaves)."""

  def negative(self, batch: int) -> Any:
    """The unconditional (negative-prompt) conditioning for CFG."""

  def latent_shape(self, batch: int) -> tuple[int, ...]:
    """NHWC shape of the initial noise for ``batch`` samples."""

  def frozen(self) -> Any:
    """Frozen modules ``decode`` needs, passed into jitted functions as arguments."""

  @staticmethod
  def denoise(model, x: jax.Array, t: jax.Array, cond: Any, uncond: Any | None,
              scale) -> jax.Array:
    """The (CFG-guided when ``uncond`` is given) model output the sampler consumes."""

  @staticmethod
  def decode(frozen, latents: jax.Array) -> jax.Array:
    """Latents -> images (B, H, W, 3) in [0, 1]."""

  def rollout(self, denoise_fn, x_init: jax.Array, *, num_steps: int, eta, rng):
    """A ``diffusion.ddim.SampleOutput`` trajectory with per-step log-probabilities."""

  def log_prob(self, output, x_t, x_next, t, t_next, *, eta):
    """(log p(x_next | x_t), mean, std) of one stored transition under ``output``."""

  def training_pair(self, rng: jax.Array, x0: jax.Array):
    """(x_t, t, target) for a denoising / flow-matching loss on clean latents ``x0``."""
