"""Converts the LAION aesthetic predictor's pickled ``.pth`` state dict to safetensors, once.

  python -m didr_jax.convert.aesthetic sac+logos+ava1-l14-linearMSE.pth aesthetic.safetensors

The only place the project unpickles, and only through ``torch.load(weights_only=True)``
(tensors and plain containers, no code). The output keeps the torch names
(``layers.{0,2,4,6,7}.{weight,bias}``) in float32 and is what
``didr_jax.rewards.clip_rewards.load_aesthetic_mlp`` reads at run time.
"""

from __future__ import annotations

import sys

import numpy as np

from didr_jax.convert import core

KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


def pth_to_safetensors(src: str, dst: str) -> dict[str, np.ndarray]:
  """Reads the state dict (bare, or under "state_dict" as Lightning saves it), checks it holds
  exactly the predictor's ten tensors and writes them as float32 safetensors."""
  import torch
  sd = torch.load(src, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "state_dict" in sd:
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise core.ConversionError(f"{src}: expected a state dict, got {type(sd).__name__}")
  if set(sd) != set(KEYS):
    raise core.ConversionError(f"{src}: not the aesthetic predictor's MLP: expected keys "
                               f"{list(KEYS)}, got {sorted(sd)}")
  tensors = {k: sd[k].detach().to(torch.float32).numpy() for k in KEYS}
  core.save_safetensors(tensors, dst, metadata={"source": "improved-aesthetic-predictor"})
  return tensors


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m didr_jax.convert.aesthetic SRC.pth DST.safetensors")
    return 2
  try:
    pth_to_safetensors(*argv)
  except (core.ConversionError, OSError) as e:
    print(f"error: {e}")
    return 1
  print(f"wrote {argv[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
