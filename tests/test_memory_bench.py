"""benchmarks/memory.py on the tiny test models: its abstract state has the layout, dtypes and
shardings that the trainer's own ``init_state`` gives concrete arrays, and it compiles the
DDPO update to a per-device memory analysis."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from didr_jax.train import loop


def _bench():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "memory.py")
  spec = importlib.util.spec_from_file_location("memory_bench", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def _concrete(module):
  """``module`` with zeros in place of its abstract parameters, on their shardings."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params = jax.tree.map(
      lambda v: v.replace(jnp.zeros(v.shape, v.get_value().dtype,
                                    device=v.get_value().sharding)),
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, params, rest)


def _same_layout(abstract, real):
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  for (path, a), r in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                          jax.tree.leaves(real)):
    where = jax.tree_util.keystr(path)
    assert (a.shape, a.dtype) == (r.shape, r.dtype), where
    assert a.sharding.is_equivalent_to(r.sharding, len(r.shape)), (where, a.sharding,
                                                                   r.sharding)


@pytest.mark.parametrize("model,mode", [("tiny_sdxl", "full"), ("tiny_zimage", "lora")])
def test_abstract_state_is_init_state(model, mode):
  bench = _bench()
  s = bench.make_setup(model, mode=mode, dtype="float32", fsdp=4, batch=8)
  bb = bench.abstract_backbone(s.spec, "float32", bool(s.config.backbone.remat), s.mesh,
                               s.rules, scan_layers=bool(s.config.backbone.scan_layers))
  assert getattr(bb.model, "scan_layers", False) == (model == "tiny_zimage")  # the config's
  concrete = _concrete(bb.model)
  if s.spec.family == "sdxl":
    bb.unet = concrete
  else:
    bb.transformer = concrete
  trainer = loop.make_trainer(s.config, bb, s.mesh)
  _same_layout(s.state, trainer.init_state())
  if mode == "full":  # fsdp shards the parameters and both AdamW moments
    assert bench.tree_bytes(s.state["params"]) < bench.tree_bytes(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s.state["params"]))
  if s.ref_params is not None:  # the KL reference copy (Z-Image's config)
    assert jax.tree.structure(s.ref_params) == jax.tree.structure(trainer.ref_params)


def test_update_compiles_to_a_memory_analysis(tmp_path):
  bench = _bench()
  out = bench.main(["--models=tiny_zimage", "--fsdp=1,2", "--dtypes=float32", "--modes=lora",
                    "--what=update", "--compile=none", f"--out={tmp_path / 'm'}"])
  rows = out["rows"]
  assert [r["fsdp"] for r in rows] == [1, 2]
  # the adapters follow their kernels' sharding: they shrink with the base weights
  assert rows[1]["ratio"] < 0.75
  assert rows[1]["frozen_bytes"] < rows[0]["frozen_bytes"]
  assert len(out["notes"]) == 1 and "state at fsdp 2" in out["notes"][0]
  assert (tmp_path / "m.json").exists() and (tmp_path / "m.md").exists()
  s = bench.make_setup("tiny_zimage", mode="lora", dtype="float32", fsdp=2, batch=8)
  c = bench.compile_program(s, "update")
  assert c["argument_bytes"] > bench.tree_bytes(s.state) > 0
  assert c["temp_bytes"] > 0 and c["alias_bytes"] > 0  # the state is donated
  # leaves whose sharding the update changes: the count and its breakdown agree
  assert c["state_layout_changed"] == sum(v["leaves"]
                                          for v in c["state_layout_changes"].values())


def test_unknown_tpu_topology_is_one_clear_line():
  """``--topology`` compiles for TPU chips through libtpu (ahead of time, no TPU attached); a
  topology it cannot describe (or no libtpu at all, as in CI) stops with one line naming it."""
  bench = _bench()
  with pytest.raises(SystemExit, match=r"--topology=v0:2x4: .*libtpu"):
    bench.main(["--topology=v0:2x4", "--models=tiny_sdxl", "--fsdp=8", "--compile=none"])
  assert bench.TOPOLOGY == "v0:2x4"
  bench.TOPOLOGY = ""
