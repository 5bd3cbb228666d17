"""The method registry: one entry per method names its config section, its checks and its
trainer; the config, the loop, the export and the command lines read it, and nothing else in
the package branches on a method's name.

A method is three files -- its mathematics (``didr_jax/losses/<name>.py``), its config section
and checks (``train/<name>_config.py``) and its trainer (``train/<name>.py``, implementing
``loop.Trainer``) -- plus one ``register(Method(...))`` line below (or in the user's code, before
the config is validated)."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import ml_collections

from didr_jax.errors import ConfigError
from didr_jax.train import crd_config, ddpo_config, didr_config, tdm_config


@dataclasses.dataclass(frozen=True)
class Method:
  """A trainable method.

  name:       ``config.method``.
  section:    (key, default-section function): the method reads ``config.<key>`` (two methods may
              share a key, as TDM and TDM-R1 share ``tdm``).
  validate:   ``validate(config, family) -> dict`` checks what the method needs of the whole
              config beyond the shared checks (``family`` is the backbone's "vp" or "flow") and
              returns figures for the start-up line (e.g. ``timesteps_trained_per_sample``);
              raises ``errors.ConfigError``.
  trainer:    the trainer class, or "module:Class" -- imported only when a run builds it (lazy:
              a trainer pulls in the models and pipelines, which validating a config or
              ``--help`` should not pay for).
  policy:     True when the evaluated sampler is the base's multi-step sampler (DDPO, CRD):
              ``sample`` then takes --steps / --eta / --guidance, and the export is the base's
              scheduler at the evaluation settings; False for a generator that samples with its
              own fixed steps (DIDR's one step, TDM's few).
  """
  name: str
  section: tuple[str, Callable[[], ml_collections.ConfigDict]]
  validate: Callable[[ml_collections.ConfigDict, str], dict]
  trainer: type | str
  policy: bool

  def trainer_class(self) -> type:
    if not isinstance(self.trainer, str):
      return self.trainer
    module, name = self.trainer.split(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds (or replaces) ``method`` under its name."""
  _REGISTRY[method.name] = method
  return method


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Method:
  """The method called ``name``; ``ConfigError`` naming the registered ones otherwise."""
  if name not in _REGISTRY:
    raise ConfigError(f"config.method: {name!r} is not one of {names()}")
  return _REGISTRY[name]


register(Method("ddpo", ("ddpo", ddpo_config.ddpo_section), ddpo_config.validate,
                "didr_jax.train.ddpo:DDPOTrainer", policy=True))
register(Method("crd", ("crd", crd_config.crd_section), crd_config.validate,
                "didr_jax.train.crd:CRDTrainer", policy=True))
register(Method("didr", ("didr", didr_config.didr_section), didr_config.validate,
                "didr_jax.train.didr:DIDRTrainer", policy=False))
register(Method("tdm", ("tdm", tdm_config.tdm_section), tdm_config.validate,
                "didr_jax.train.tdm:TDMTrainer", policy=False))
register(Method("tdmr1", ("tdm", tdm_config.tdmr1_section), tdm_config.validate_tdmr1,
                "didr_jax.train.tdm_r1:TDMR1Trainer", policy=False))
