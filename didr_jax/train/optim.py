"""Every trained network's optimizer, under one naming scheme.

Each network (DDPO's and CRD's policy; DIDR's generator and fake score; TDM's generator and
fake score, and TDM-R1's surrogate) is trained by AdamW with global-norm gradient clipping. Its
settings are the keys ``KEYS`` of ``config.train``, which every network uses, overridden per
network in the method's own section as ``<network>_<key>``:

    didr.generator_adam_b1, didr.fake_learning_rate, didr.fake_adam_b1,
    tdm.generator_learning_rate, tdm.generator_adam_b1, tdm.fake_learning_rate,
    tdm.fake_adam_b1, tdm.surrogate_learning_rate, tdm.surrogate_adam_b1, ...

Any ``<network>_<key>`` of ``KEYS`` may be added to a section; the value -1 (``INHERIT``) takes
``train.<key>``. The names used before this scheme are refused with the new name (``RENAMED``),
and a run saved under them is read with them renamed (``upgrade``).
"""

from __future__ import annotations

import math

import ml_collections
import optax

from didr_jax.errors import ConfigError

KEYS = ("learning_rate", "adam_b1", "adam_b2", "adam_eps", "weight_decay", "max_grad_norm")
INHERIT = -1.0

# old key -> new key(s); a pair of betas became two keys
RENAMED = {
    "didr.generator_b1": ("didr.generator_adam_b1",),
    "didr.fake_b1": ("didr.fake_adam_b1",),
    "tdm.gen_lr": ("tdm.generator_learning_rate",),
    "tdm.gen_betas": ("tdm.generator_adam_b1", "tdm.generator_adam_b2"),
    "tdm.fake_lr": ("tdm.fake_learning_rate",),
    "tdm.fake_betas": ("tdm.fake_adam_b1", "tdm.fake_adam_b2"),
    "tdm.surrogate_lr": ("tdm.surrogate_learning_rate",),
    "tdm.surrogate_betas": ("tdm.surrogate_adam_b1", "tdm.surrogate_adam_b2"),
    "tdm.weight_decay": ("train.weight_decay",),
    "tdm.max_grad_norm": ("train.max_grad_norm",),
}


def make_optimizer(learning_rate: float, *, adam_b1: float = 0.9, adam_b2: float = 0.999,
                   adam_eps: float = 1e-8, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
  """AdamW after global-norm clipping (``max_grad_norm`` 0 / None: no clipping)."""
  parts = []
  if max_grad_norm:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                           weight_decay=weight_decay))
  return optax.chain(*parts)


def settings(train: ml_collections.ConfigDict, section: ml_collections.ConfigDict | None = None,
             network: str | None = None) -> dict:
  """``network``'s optimizer settings: ``train.<key>``, or ``section.<network>_<key>`` where
  that is present and not -1."""
  out = {k: float(train[k]) for k in KEYS}
  if section is not None and network is not None:
    for k in KEYS:
      v = section.get(f"{network}_{k}")
      if v is not None and float(v) != INHERIT:
        out[k] = float(v)
  return out


def for_network(train, section=None, network=None) -> optax.GradientTransformation:
  """The optimizer of ``network`` (``settings``)."""
  return make_optimizer(**settings(train, section, network))


_RANGES = {"learning_rate": ("> 0", lambda v: v > 0),
           "adam_b1": ("in [0, 1)", lambda v: 0 <= v < 1),
           "adam_b2": ("in [0, 1)", lambda v: 0 <= v < 1),
           "adam_eps": ("> 0", lambda v: v > 0),
           "weight_decay": (">= 0", lambda v: v >= 0),
           "max_grad_norm": (">= 0 (0: no clipping)", lambda v: v >= 0)}


def check(train, section=None, name: str = "", networks: tuple[str, ...] = (None,)) -> None:
  """Ranges of each network's settings, named by the key that set them (``config.train.<key>``
  or ``config.<name>.<network>_<key>``)."""
  for network in networks:
    for k, v in settings(train, section, network).items():
      own = None if network is None else section.get(f"{network}_{k}")
      key = f"train.{k}" if own is None or float(own) == INHERIT else f"{name}.{network}_{k}"
      want, ok = _RANGES[k]
      if not (math.isfinite(v) and ok(v)):
        raise ConfigError(f"config.{key}: must be {want}, got {v}")


def renamed(key: str) -> str | None:
  """The one-line hint for an old key name (``"tdm.gen_lr"``), None for any other key."""
  new = RENAMED.get(key)
  if new is None:
    return None
  return (f"config.{key} was renamed: set config.{' and config.'.join(new)} (one naming scheme "
          "for every network's optimizer: didr_jax/train/optim.py)")


def upgrade(saved: dict) -> dict:
  """A run's saved config with the old optimizer keys renamed (values kept)."""
  saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  for old, new in RENAMED.items():
    sec, key = old.split(".")
    if not isinstance(saved.get(sec), dict) or key not in saved[sec]:
      continue
    value = saved[sec].pop(key)
    values = list(value) if len(new) == 2 else [value]
    for target, v in zip(new, values):
      tsec, tkey = target.split(".")
      saved.setdefault(tsec, {})[tkey] = v
  return saved
