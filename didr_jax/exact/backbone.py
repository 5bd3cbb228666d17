"""A point-cloud backbone with the image backbones' protocol (``pipelines.base.Backbone``), whose
reference model is the exact Gaussian-mixture denoiser: every method's trainer runs on it through
the shared loop (``backbone.kind`` "exact_<problem>" for VP / epsilon, "exact_<problem>_flow" for
flow matching; ``PROBLEMS``).

- Samples are D-dimensional points carried as NHWC latents (B, 1, 1, D); ``decode`` turns them
  into "images" (B, 1, D, 3) holding the coordinates in every channel (not in [0, 1]), because
  rewards and the loop's evaluation take (B, H, W, 3). ``points`` reads them back.
- Prompts are "group <p>" (conditioning: the components of prompt p); "" is the unconditional
  mixture (CFG's negative). ``encode`` gives int32 ids (B,), a batch-leading pytree.
- The trainable network ``ExactDenoiser`` = the exact denoiser (frozen arrays, ``Frozen``
  variables: not in the trained params) + a residual MLP whose last layer starts at zero, so at
  initialisation every copy of it (policy, generator, fake score) equals the reference exactly.
- The samplers, log-probabilities and training pairs are the SD (VP) and Z-Image (flow)
  pipelines' own methods, reused unchanged.
- Rewards per problem: "exact_<problem>_<linear|quadratic|box>" (``problems``, registered with
  the built-in rewards).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.errors import ConfigError
from didr_jax.diffusion import flow as flow_lib, guidance
from didr_jax.diffusion.schedules import VPSchedule
from didr_jax.exact import mixture as mixture_lib
from didr_jax.exact.problems import PROBLEMS, parse_kind, points, to_images  # noqa: F401
from didr_jax.pipelines import sd, zimage

PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "prompts.txt")


# ---------------------------------------------------------------------------------- network

class Frozen(nnx.Variable):
  """Fixed arrays of the exact model: not trainable, never in the trainers' params."""


def _time_features(u: jax.Array, num: int = 4) -> jax.Array:
  """[u, sin(pi k u), cos(pi k u)] (k = 1..num) of the process fraction u in [0, 1]."""
  k = jnp.arange(1, num + 1, dtype=jnp.float32)
  return jnp.concatenate([u[:, None], jnp.sin(jnp.pi * k * u[:, None]),
                          jnp.cos(jnp.pi * k * u[:, None])], axis=-1)


class ExactDenoiser(nnx.Module):
  """f(x, t, prompt) = exact(x, t, prompt) + MLP([x, time features, prompt one-hot]), the MLP's
  output layer zero at initialisation. VP: t integer timesteps, the exact part from the
  schedule's abar (``abar``); flow: t = sigma. Output in ``prediction_type``."""

  def __init__(self, mix: mixture_lib.GaussianMixture, prediction_type: str, abar=None, *,
               hidden: int = 64, rngs: nnx.Rngs):
    f32 = lambda a: Frozen(jnp.asarray(a, jnp.float32))
    self.log_weights, self.means, self.covs = (f32(mix.log_weights), f32(mix.means),
                                               f32(mix.covs))
    self.eigvals, self.eigvecs = f32(mix.eigvals), f32(mix.eigvecs)
    self.prompt_masks = Frozen(jnp.asarray(mix.prompt_masks))
    self.abar = None if abar is None else f32(abar)
    self.prediction_type = prediction_type
    self.dim, self.num_prompts = mix.dim, mix.num_prompts
    width = self.dim + 9 + self.num_prompts + 1
    self.hidden1 = nnx.Linear(width, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, self.dim, kernel_init=nnx.initializers.zeros,
                           bias_init=nnx.initializers.zeros, rngs=rngs)

  def mixture(self) -> mixture_lib.GaussianMixture:
    return mixture_lib.GaussianMixture(
        self.log_weights[...], self.means[...], self.covs[...], self.eigvals[...],
        self.eigvecs[...], self.prompt_masks[...])

  def alpha_sigma_fraction(self, t: jax.Array):
    """(alpha, sigma, u) with u the fraction of the process (t / T for VP, sigma for flow)."""
    if self.abar is None:
      sig = t.astype(jnp.float32)
      return 1.0 - sig, sig, sig
    abar = self.abar[...]
    a = abar[jnp.clip(t, 0, abar.shape[0] - 1)]
    return jnp.sqrt(a), jnp.sqrt(1.0 - a), t.astype(jnp.float32) / abar.shape[0]

  def __call__(self, x: jax.Array, t: jax.Array, prompt: jax.Array) -> jax.Array:
    b = x.shape[0]
    x2 = x.reshape(b, self.dim).astype(jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    prompt = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (b,))
    alpha, sigma, u = self.alpha_sigma_fraction(t)
    # flow velocity = (x_t - x0) / sigma: keep sigma off 0 (the samplers never query 0)
    exact = mixture_lib.denoise(self.mixture(), x2, alpha, jnp.maximum(sigma, 1e-5),
                                self.prediction_type, prompt)
    feats = jnp.concatenate([x2, _time_features(u),
                             jax.nn.one_hot(prompt + 1, self.num_prompts + 1)], axis=-1)
    h = nnx.silu(self.hidden1(feats))
    h = nnx.silu(self.hidden2(h))
    return (exact + self.head(h)).reshape(x.shape).astype(x.dtype)


def guided(model: ExactDenoiser, x, t, cond, uncond, scale) -> jax.Array:
  """The backbone's ``denoise``: model(x, t, cond), or CFG uncond + scale (cond - uncond) with
  ``uncond`` (batch 1 or B) broadcast to the batch."""
  out = model(x, t, cond)
  if uncond is None:
    return out
  return guidance.cfg(model(x, t, jnp.broadcast_to(uncond, cond.shape)), out, scale)


# ---------------------------------------------------------------------------------- backbone

@dataclasses.dataclass
class _ExactBase:
  """The parts shared by both families (``pipelines.base.Backbone``)."""
  model: ExactDenoiser
  mixture: mixture_lib.GaussianMixture
  problem: str
  kind: str

  vae = None
  folder = None
  denoise = staticmethod(guided)
  decode = staticmethod(lambda frozen, latents: to_images(latents))

  @property
  def dim(self) -> int:
    return self.mixture.dim

  def latent_shape(self, batch: int) -> tuple[int, ...]:
    return (batch, 1, 1, self.dim)

  def frozen(self):
    return None

  def encode(self, prompts: Sequence[str]) -> jax.Array:
    """"group <p>" -> p, "" -> -1 (unconditional); anything else raises ValueError."""
    ids = []
    for p in prompts:
      text = p.strip()
      if text == "":
        ids.append(-1)
        continue
      head, _, num = text.partition(" ")
      if head != "group" or not num.isdigit() or int(num) >= self.mixture.num_prompts:
        raise ValueError(f"exact backbone: prompt {p!r} is not 'group <p>' with p < "
                         f"{self.mixture.num_prompts} (or '' for the unconditional law)")
      ids.append(int(num))
    return jnp.asarray(ids, jnp.int32)

  def negative(self, batch: int) -> jax.Array:
    return jnp.full((batch,), -1, jnp.int32)

  def warn_long_prompts(self, prompts, what: str = "prompts", max_tokens=None) -> int:
    return 0

  def mesh(self):
    return None


@dataclasses.dataclass
class ExactVP(_ExactBase):
  schedule: VPSchedule = None
  family = "vp"
  prediction_type = sd.SDPipeline.prediction_type


@dataclasses.dataclass
class ExactFlow(_ExactBase):
  scheduler: flow_lib.FlowMatchConfig = None
  family = "flow"
  prediction_type = "flow"
  sigmas = zimage.ZImagePipeline.sigmas


# the samplers, log-probabilities, KL scales and training pairs of the image pipelines, unchanged
for _name in ("rollout", "log_prob", "kl_std", "training_pair", "train_times", "alpha_sigma"):
  setattr(ExactVP, _name, getattr(sd.SDPipeline, _name))
  setattr(ExactFlow, _name, getattr(zimage.ZImagePipeline, _name))


def vp_schedule() -> VPSchedule:
  """SD's scaled-linear epsilon schedule without x0 clipping (points are not in [-1, 1])."""
  return VPSchedule.from_diffusers(dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False,
                                        timestep_spacing="trailing"))


def from_config(c):
  """``build`` for a training config; raises ``ConfigError`` when a reward (``rewards``, and
  ``didr.reward`` of a DIDR config) is not one of this problem's ``exact_<problem>_*``: other
  rewards read images, and another problem's points have another dimension."""
  problem, _ = parse_kind(c.backbone.kind)
  sections = {"rewards": dict(c.rewards)}
  for key, section in c.items():  # a method's own reward spec (DIDR's differentiable didr.reward)
    if hasattr(section, "get") and hasattr(section.get("reward"), "items"):
      sections[f"{key}.reward"] = dict(section.reward)
  for key, spec in sections.items():
    bad = sorted(n for n, w in spec.items() if w != 0 and not n.startswith(f"exact_{problem}_"))
    if bad:
      raise ConfigError(f"config.{key}: {bad} do not score {problem} points; backbone.kind "
                        f"{c.backbone.kind!r} takes exact_{problem}_<reward> rewards "
                        f"({', '.join(sorted(PROBLEMS[problem].rewards()))})")
  return build(c.backbone.kind, seed=c.seed)


def build(kind: str, *, seed: int = 0, hidden: int = 64):
  """The backbone of ``kind`` ("exact_<problem>" or "exact_<problem>_flow")."""
  problem, family = parse_kind(kind)
  if problem not in PROBLEMS:
    raise ValueError(f"unknown exact problem {problem!r}; known: {sorted(PROBLEMS)}")
  mix = PROBLEMS[problem].make_mixture()
  rngs = nnx.Rngs(seed)
  if family == "vp":
    sched = vp_schedule()
    model = ExactDenoiser(mix, sched.prediction_type, np.asarray(sched.alphas_cumprod),
                          hidden=hidden, rngs=rngs)
    return ExactVP(model, mix, problem, kind, schedule=sched)
  model = ExactDenoiser(mix, "flow", hidden=hidden, rngs=rngs)
  return ExactFlow(model, mix, problem, kind, scheduler=flow_lib.FlowMatchConfig())
