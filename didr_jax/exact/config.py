"""The head every ``configs/exact_<method>.py`` shares: the exact benchmark's backbone, reward,
prompts and small batch sizes (CPU minutes). ``spec`` = "problem[:reward[:flow]]", e.g.
"ring2d:linear", "ring2d:box:flow", "mix16d:quadratic"."""

from __future__ import annotations

from didr_jax.exact import backbone
from didr_jax.train import config as config_lib


def parse_spec(spec: str) -> tuple[str, str, str]:
  """"problem[:reward[:flow|vp]]" -> (problem, reward, family); ValueError names the part."""
  parts = (spec or "ring2d").split(":")
  problem = parts[0]
  reward = parts[1] if len(parts) > 1 else "linear"
  family = parts[2] if len(parts) > 2 else "vp"
  if problem not in backbone.PROBLEMS:
    raise ValueError(f"exact problem {problem!r} is not one of {sorted(backbone.PROBLEMS)}")
  if reward not in backbone.PROBLEMS[problem].rewards():
    known = sorted(backbone.PROBLEMS[problem].rewards())
    raise ValueError(f"reward {reward!r} is not one of {known} for {problem}")
  if family not in ("vp", "flow") or len(parts) > 3:
    raise ValueError(f"{spec!r}: expected problem[:reward[:vp|flow]]")
  return problem, reward, family


def exact_base(method: str, spec: str = ""):
  """``base_config()`` on the exact backbone of ``spec`` (not finalized: the method's config
  fills in its section)."""
  problem, reward, family = parse_spec(spec)
  c = config_lib.base_config()
  c.method = method
  c.backbone.kind = f"exact_{problem}" + ("_flow" if family == "flow" else "")
  c.rewards = {f"exact_{problem}_{reward}": 1.0}
  c.prompts.train = c.prompts.eval = backbone.PROMPTS_FILE
  c.num_epochs = 20
  c.eval_every = 0
  c.log_images = 4               # points drawn as 1 x D images in TensorBoard (0: none)
  c.cpu_devices = 1
  c.sample.guidance_scale = 1.0   # the target is the tilt of each prompt's conditional law
  c.sample.batch_size = 64
  c.sample.num_batches = 2
  c.train.batch_size = 32
  c.train.weight_decay = 0.0
  c.eval.num_samples = 512
  c.eval.batch_size = 256
  return c
