"""Rewards of the embedded toy world: the GenEval-like detector (host, non-differentiable) and
the toy CLIP (differentiable). The toy world sits below the rewards and knows nothing of them."""

from didr_jax.rewards.base import Reward, register
from didr_jax.toy import toy_clip as tc


@register("toy_detector")
def toy_detector() -> Reward:
  """Fraction of the prompt's (count, colour, shape) clauses that the detector finds, divided
  by 1 + the number of unrequested objects (see ``didr_jax.toy.detector.score``)."""
  from didr_jax.toy import detector  # lazy: its scipy.ndimage (~0.25 s) only when built
  return Reward("toy_detector", lambda images, prompts: detector.batch_score(images, prompts))


@register("toy_clip")
def toy_clip(folder: str | None = None) -> Reward:
  """exp(logit_scale) * cos(text, image) of the shipped toy CLIP (differentiable: ``jax_fn``
  takes (model, images, input_ids); ``prompt_features`` gives the input_ids)."""
  m = tc.load(folder) if folder else tc.load()
  return Reward("toy_clip", m, differentiable=True, jax_fn=tc.score, module=m.model,
                prompt_features=m.ids)
