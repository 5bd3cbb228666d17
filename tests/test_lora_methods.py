"""LoRA for CRD, DIDR and TDM-R1 (DDPO's is in test_lora.py): one epoch of each method's toy
config through the training loop on a tiny random toy folder, with adapters on. Every trained
network (policy; generator, fake score, surrogate) is a set of adapters on the one frozen base:
the optimizer states and the checkpoint hold adapters only, the trained networks moved, the
base did not, the reference is the base (B = 0), and the run exports as a PEFT file whose
adapters are the ones the run evaluates (DIDR / TDM: the generator EMA)."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from didr_jax.convert import core, lora_export, lora_weights
from didr_jax.models import lora
from didr_jax.testing import tiny
from didr_jax.testing.configs import load_config
from didr_jax.train import loop

SMALL = {"sample.batch_size": 8, "sample.num_batches": 1, "train.batch_size": 8,
         "eval.num_samples": 0, "eval.batch_size": 8, "log_images": 2, "num_epochs": 1,
         "async_checkpoint": False, "lora.enabled": True, "lora.rank": 2, "lora.alpha": 4.0}
METHODS = {
    "toy_crd": {"sample.group_size": 2, "sample.num_steps": 2, "train.grad_accum": 1,
                "crd.num_train_times": 1, "train.learning_rate": 1e-3},
    "toy_didr": {"didr.generator_path": "", "didr.fake_updates": 1, "didr.drp_steps": 1, "train.learning_rate": 1e-3,
                 "didr.fake_learning_rate": 1e-3},
    "toy_tdmr1": {"tdm.generator_path": "", "sample.group_size": 2,
                  "tdm.boundaries_per_iter": 1, "tdm.generator_learning_rate": 1e-3,
                  "tdm.fake_learning_rate": 1e-3,
                  "tdm.surrogate_learning_rate": 1e-3, "tdm.ema_decay": 0.5},
}


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
  return tiny.save_tiny_toy(str(tmp_path_factory.mktemp("toy")), sample_size=8)


def _names(tree) -> set:
  return {str(getattr(p[-1], "key", p[-1])) for p, _ in jax.tree_util.tree_flatten_with_path(
      tree)[0]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_adapters_only_and_exports(name, toy_folder, tmp_path):
  c = load_config(name, **{**SMALL, "backbone.path": toy_folder, **METHODS[name]})
  workdir = str(tmp_path / "run")
  loop.train(c, workdir)

  # the checkpoint: adapters only, for every trained network and snapshot
  step = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  saved = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  assert _names(saved["params"]) == {"lora_a", "lora_b"}
  assert _names(saved.get("ema", {"x": {"lora_a": 0}})) <= {"lora_a", "lora_b"}
  n_params = {k: sum(np.size(x) for x in jax.tree.leaves(v)) for k, v in saved["params"].items()}
  n_opt = sum(np.size(x) for x in jax.tree.leaves(saved["opt"]) if np.ndim(x) > 0)
  assert n_opt == 2 * sum(n_params.values())          # Adam's mu and nu of the adapters only

  # the base the adapters sit on is the folder's, untouched; B = 0 there gives the reference
  pipe = loop.build_backbone(c, None)
  base = nnx.to_pure_dict(nnx.state(pipe.model, nnx.Param))
  n_base = sum(np.size(x) for x in jax.tree.leaves(base))
  assert sum(n_params.values()) < n_base / 5
  trained = saved["params"]["policy" if "policy" in saved["params"] else "generator"]
  assert max(float(np.abs(np.asarray(x)).max())
             for p, x in jax.tree_util.tree_flatten_with_path(trained)[0]
             if str(getattr(p[-1], "key", p[-1])) == "lora_b") > 0     # moved off B = 0

  # export: the PEFT file holds the evaluated adapters (lora_B = (alpha / r) B^T)
  lora_export.export_run(workdir, str(tmp_path / "export"))
  tensors = core.SafetensorsFile(os.path.join(tmp_path / "export", lora_weights.WEIGHT_NAME))
  lora.from_config(pipe.model, c.lora)
  assert len(tensors) == 2 * len(lora.adapters(pipe.model))
  # what the run evaluates: CRD's policy, DIDR's / TDM-R1's generator EMA (both keep one here)
  want = saved["ema"]["generator"] if "generator" in saved.get("ema", {}) else (
      saved["params"]["policy"])
  flat = {tuple(str(getattr(e, "key", e)) for e in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
  b_keys = [k for k in tensors if k.endswith(".lora_B.weight")]
  some = b_keys[0][: -len(".lora_B.weight")].split(".")[1:]
  b = flat[tuple(some) + ("lora_b",)]
  np.testing.assert_allclose(tensors[b_keys[0]], 2.0 * b.T, rtol=1e-6)
