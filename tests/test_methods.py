"""The method registry (``train.methods``): a method added by one ``register`` line, with no
edit anywhere else, is validated, built, trained by the loop and read back like the shipped
ones."""

import json
import os

import ml_collections
import numpy as np
import pytest

from didr_jax.errors import ConfigError, require
from didr_jax.testing import tiny
from didr_jax.testing.configs import load_config
from didr_jax.train import config as config_lib, loop, methods
from didr_jax.train.ddpo import DDPOTrainer


def dummy_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"offset": 0.25})


def validate_dummy(c, family: str) -> dict:
  require(c.dummy.offset >= 0, "dummy.offset", f"must be >= 0, got {c.dummy.offset}")
  return {"dummy_family": family}


class DummyTrainer(DDPOTrainer):
  """DDPO's sampler and state, an update that only counts its steps and reports the shifted
  mean reward (no update step to compile: the test is about the method's plumbing)."""

  def update(self, state, batches, prompts, rewards, rng):
    del batches, prompts, rng
    shifted = float(np.mean(rewards)) + self.c.dummy.offset
    return {**state, "step": state["step"] + 1}, {"dummy_offset": float(self.c.dummy.offset),
                                                   "shifted_reward": shifted, "loss": 0.0}


@pytest.fixture
def dummy(monkeypatch):
  method = methods.Method("dummy", ("dummy", dummy_section), validate_dummy, DummyTrainer,
                          policy=True)
  monkeypatch.setitem(methods._REGISTRY, "dummy", method)  # noqa: SLF001 (undone after)
  return method


def _config(folder, **kw):
  c = load_config("toy_ddpo", **{
      "backbone.path": folder, "sample.batch_size": 8, "sample.num_batches": 1,
      "sample.num_steps": 3, "train.batch_size": 8, "train.timestep_fraction": 0.4,
      "eval.num_samples": 0, "num_epochs": 1, "log_images": 0, "async_checkpoint": False})
  with c.unlocked():
    c.method = "dummy"
    c.dummy = dummy_section()
    for k, v in kw.items():
      c.dummy[k] = v
  return c


def test_a_registered_method_is_validated_trained_and_read_back(dummy, tmp_path):
  folder = tiny.save_tiny_toy(str(tmp_path / "toy"))
  assert "dummy" in methods.names()
  with pytest.raises(ConfigError, match=r"config\.dummy\.offset: must be >= 0"):
    config_lib.validate(_config(folder, offset=-1.0), 1)
  bare = _config(folder)
  with bare.unlocked():
    del bare["dummy"]
  with pytest.raises(ConfigError, match=r"config\.dummy: method 'dummy' needs the dummy section"):
    config_lib.validate(bare, 1)
  c = _config(folder)
  assert config_lib.validate(c, 1)["dummy_family"] == "vp"
  workdir = str(tmp_path / "run")
  loop.train(c, workdir)
  hist = json.load(open(os.path.join(workdir, "history.json")))
  assert [h["dummy_offset"] for h in hist if "dummy_offset" in h] == [0.25]
  last = hist[-1]
  assert abs(last["shifted_reward"] - last["reward_mean"] - 0.25) < 1e-6
  # a run's saved config written before the section had a key is completed with its default
  saved = json.load(open(os.path.join(workdir, "config.json")))
  del saved["dummy"]["offset"]
  assert config_lib.with_defaults(saved).dummy.offset == 0.25


def test_an_unknown_method_names_the_registered_ones(tmp_path):
  c = load_config("toy_ddpo")
  with c.unlocked():
    c.method = "ppo2"
  with pytest.raises(ConfigError, match=r"config\.method: 'ppo2' is not one of \('ddpo', 'crd'"):
    config_lib.validate(c, 1)


# ----------------------------------------------------------------- every network's optimizer

def test_each_network_takes_train_settings_and_its_own_overrides():
  from didr_jax.train import optim
  c = load_config("toy_didr")
  gen = optim.settings(c.train, c.didr, "generator")
  fake = optim.settings(c.train, c.didr, "fake")
  assert gen["learning_rate"] == c.train.learning_rate and gen["adam_b1"] == 0.0
  assert fake["learning_rate"] == c.didr.fake_learning_rate and fake["adam_b1"] == 0.0
  assert gen["adam_b2"] == fake["adam_b2"] == c.train.adam_b2
  with c.unlocked():
    c.didr.fake_learning_rate = -1.0         # -1: train's
    c.didr.fake_weight_decay = 0.5           # any <network>_<key> may be added
  fake = optim.settings(c.train, c.didr, "fake")
  assert fake["learning_rate"] == c.train.learning_rate and fake["weight_decay"] == 0.5
  with c.unlocked():
    c.didr.fake_adam_b1 = 1.0
  with pytest.raises(ConfigError, match=r"^config\.didr\.fake_adam_b1: must be in \[0, 1\)"):
    config_lib.validate(c, 1, training=False)
  # the shipped TDM-R1 toy keeps the values of the names before the scheme
  t = load_config("toy_tdmr1")
  got = {n: optim.settings(t.train, t.tdm, n) for n in ("generator", "fake", "surrogate")}
  assert [(g["learning_rate"], g["adam_b1"], g["adam_b2"], g["weight_decay"], g["max_grad_norm"])
          for g in got.values()] == [(5e-5, 0.0, 0.999, 0.0, 1.0), (3e-4, 0.0, 0.999, 0.0, 1.0),
                                     (3e-5, 0.9, 0.999, 0.0, 1.0)]


def test_old_optimizer_names_are_refused_with_the_new_one_and_old_runs_read():
  c = load_config("toy_tdmr1")
  with c.unlocked():
    c.tdm.gen_lr = 1e-3
  with pytest.raises(ConfigError, match=r"^config\.tdm\.gen_lr was renamed: set "
                                        r"config\.tdm\.generator_learning_rate"):
    config_lib.validate(c, 1, training=False)
  with c.unlocked():
    del c.tdm["gen_lr"]
    c.tdm.surrogate_step = 2
  with pytest.raises(ConfigError, match=r"^config\.tdm\.surrogate_step: not a key of the tdm"):
    config_lib.validate(c, 1, training=False)
  saved = {"method": "tdmr1", "tdm": {"gen_lr": 1e-3, "gen_betas": [0.5, 0.99],
                                      "weight_decay": 0.0}}
  old = config_lib.with_defaults(saved)
  assert (old.tdm.generator_learning_rate, old.tdm.generator_adam_b1, old.tdm.generator_adam_b2,
          old.train.weight_decay) == (1e-3, 0.5, 0.99, 0.0)
  assert "gen_lr" not in old.tdm
