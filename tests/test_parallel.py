"""Mesh construction and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from didr_jax.parallel import mesh as mesh_lib


def test_make_mesh_sizes_and_errors():
  m = mesh_lib.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 2)])
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  with pytest.raises(ValueError, match="at most one size may be -1"):
    mesh_lib.make_mesh([("data", -1), ("fsdp", -1)])
  with pytest.raises(ValueError, match="need 16 devices"):
    mesh_lib.make_mesh([("data", 4), ("fsdp", 4)])
  with pytest.raises(ValueError, match="not divisible by 3"):
    mesh_lib.make_mesh([("data", -1), ("fsdp", 3)])


def test_logical_rules_and_divisibility_fallback():
  m = mesh_lib.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = mesh_lib.DEFAULT_RULES
  assert mesh_lib.logical_to_spec(("embed", "mlp"), rules, m, (8, 8)) == P("fsdp", "tensor")
  # a dimension the axis does not divide is replicated instead of failing
  assert mesh_lib.logical_to_spec(("embed", "mlp"), rules, m, (3, 8)) == P(None, "tensor")
  # batch maps to two axes; each mesh axis is used once per spec
  assert mesh_lib.logical_to_spec(("batch", None), rules, m, (8, 3)) == P(("data", "fsdp"))
  assert mesh_lib.logical_to_spec(("embed", "embed"), rules, m, (8, 8)) == P("fsdp")
  custom = (("mlp", "fsdp"),) + rules
  assert mesh_lib.logical_to_spec(("embed", "mlp"), custom, m, (8, 8)) == P("fsdp")
  assert mesh_lib.batch_sharding(m, 4, rules, 6).spec == P("data")  # 6 % 4 != 0


def test_cpu_device_count_takes_one_device_per_core_as_the_batches_allow():
  count = mesh_lib.cpu_device_count
  assert count(3, [8, 4], cores=2) == 3                   # asked for: taken as it is
  assert count(0, [8, 4], cores=2) == 2
  assert count(0, [8, 6], cores=4) == 2                   # 4 and 3 do not divide both
  assert count(0, [8, 3], cores=2) == 1
  assert count(0, [16], cores=1) == 1
  assert count(0, [32], [("data", -1), ("fsdp", 2)], cores=8) == 8
  assert count(0, [32], [("data", -1), ("fsdp", 2)], cores=3) == 2   # fsdp 2 must divide it
  assert count(0, [32], [("data", 1), ("fsdp", 8)], cores=2) == 1    # a fixed 8-device mesh
  assert count(0, [32], [("data", 1), ("fsdp", 4)], cores=8) == 4


def test_config_cpu_devices_counts_the_batches_the_run_shards():
  from didr_jax.testing.configs import load_config
  from didr_jax.train import config as config_lib
  c = load_config("toy_ddpo", **{"sample.batch_size": 24, "train.batch_size": 12,
                                 "eval.batch_size": 4, "eval.num_samples": 8})
  assert config_lib.device_batches(c) == {"sample.batch_size": 24, "train.batch_size": 12,
                                          "eval.batch_size": 4}
  with c.unlocked():
    c.eval.num_samples = 0                               # no evaluation: its batch is free
  assert "eval.batch_size" not in config_lib.device_batches(c)
  assert mesh_lib.cpu_device_count(0, config_lib.device_batches(c).values(), cores=6) == 6
  with c.unlocked():
    c.cpu_devices = 5
  assert config_lib.cpu_devices(c) == 5
  with pytest.raises(config_lib.ConfigError, match="sample.batch_size: 24 is not divisible by "
                     "the 5 devices"):
    config_lib.validate(c, num_devices=5)
  with c.unlocked():
    c.cpu_devices = -1
  with pytest.raises(config_lib.ConfigError, match="cpu_devices"):
    config_lib.validate(c, num_devices=1)


_SPLIT = """
import jax
from didr_jax.parallel import mesh as mesh_lib
first = mesh_lib.split_cpu(2)
n = jax.device_count()
print(first, n, mesh_lib.split_cpu(3), jax.device_count())
"""


@pytest.mark.parametrize("env, want", [
    ({}, "True 2 False 2"),                                  # too late once JAX has started
    ({"JAX_NUM_CPU_DEVICES": "3"}, "False 3 False 3"),       # the environment's choice wins
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, "False 4 False 4"),
])
def test_split_cpu_before_jax_starts_unless_the_environment_chose(env, want):
  import os
  import subprocess
  import sys
  base = {k: v for k, v in os.environ.items()
          if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  r = subprocess.run([sys.executable, "-c", _SPLIT], env={**base, "JAX_PLATFORMS": "cpu", **env},
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split("\n")[-2] == want


def test_constrain_batch_only_inside_an_activation_sharding_context():
  import jax.numpy as jnp
  from didr_jax.models import layers
  x = jnp.zeros((8, 4))
  assert layers.constrain_batch(x) is x                           # no context
  with layers.activation_sharding(mesh_lib.make_mesh(devices=jax.devices()[:1])):
    assert layers.constrain_batch(x) is x                         # one device
  with layers.activation_sharding(mesh_lib.make_mesh()):
    assert layers.constrain_batch(jnp.zeros((3, 4))).shape == (3, 4)   # 8 does not divide 3
    y = jax.jit(layers.constrain_batch)(x)
  assert layers.constrain_batch(x) is x                           # the context has ended
  assert y.sharding.spec[0] in ("data", ("data",)), y.sharding


def test_fsdp_sampler_runs_every_convolution_on_the_device_batch(tmp_path):
  """Compiled on 8 devices with fsdp 8 (weights sharded, batch over data x fsdp), the DDPO
  sampler of a tiny SDXL (UNet with CFG + VAE decoder) convolves only each device's rows: 2
  (CFG doubles the 8 / 8) in the UNet, 1 in the VAE. Without the blocks' batch constraints
  (``layers.activation_sharding``) XLA gathered the batch for half the UNet's convolutions
  (batch 16) and the whole decoder (batch 8), with 3x the temp memory."""
  import re
  import jax.numpy as jnp
  from didr_jax.testing import tiny
  from didr_jax.testing.configs import load_config
  from didr_jax.train import loop
  folder = str(tmp_path / "sdxl")
  tiny.save_tiny_sd(folder, kind="sdxl", seed=0, sample_size=32)
  c = load_config("ddpo_sdxl", **{
      "backbone.path": folder, "backbone.kind": "sdxl", "backbone.dtype": "float32",
      "sample.batch_size": 8, "train.batch_size": 8, "sample.num_steps": 2,
      "eval.num_samples": 0, "mesh.axes": (("data", -1), ("fsdp", 8), ("tensor", 1))})
  mesh = mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  tr = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = tr.init_state()
  x = jax.device_put(jax.random.normal(jax.random.key(0), tr.bb.latent_shape(8)),
                     mesh_lib.batch_sharding(mesh, 4, tr.rules, 8))
  hlo = tr._sample.lower(
      tr.policy_params(state), tr.bb.frozen(), tr.bb.encode(["a red circle"] * 8),
      tr.bb.negative(1), x, jax.random.key(1), jnp.float32(5.0),
      jnp.asarray(tr.levels(c.sample.eta, 2)), num_steps=2).compile().as_text()
  batches = [int(b) for b in re.findall(r"= f32\[(\d+),\d+,\d+,\d+\]\{[^}]*\} convolution\(",
                                        hlo)]
  assert len(batches) > 20
  assert set(batches) == {1, 2}, sorted(set(batches))


def _returned_bytes(fn, *args, **kwargs) -> tuple[int, int]:
  """(bytes per device the compiled ``fn`` returns, bytes per device of the arrays a call gives
  back, plus 8 per output for XLA's tuple of pointers)."""
  outs = jax.tree.leaves(fn(*args, **kwargs))
  got = fn.lower(*args, **kwargs).compile().memory_analysis().output_size_in_bytes
  return got, sum(o.addressable_shards[0].data.nbytes + 8 for o in outs)


def test_samplers_return_their_outputs_and_no_copy_of_the_weights(tmp_path):
  """The trainers' and pipelines' samplers take modules (the frozen VAE, a LoRA run's base
  weights) as pytree arguments of ``jax.jit``: ``nnx.jit`` also returned every variable of
  them as outputs, a copy of all frozen weights per call (the real SDXL LoRA sampler at
  fsdp 1: 9.90 GiB of outputs per device, 25 MiB without)."""
  import jax.numpy as jnp
  from didr_jax.pipelines import sd
  from didr_jax.testing import tiny
  from didr_jax.testing.configs import load_config
  from didr_jax.train import loop
  folder = str(tmp_path / "sdxl")
  tiny.save_tiny_sd(folder, kind="sdxl", seed=0, sample_size=32)
  c = load_config("ddpo_sdxl", **{
      "backbone.path": folder, "backbone.kind": "sdxl", "backbone.dtype": "float32",
      "sample.batch_size": 8, "train.batch_size": 8, "sample.num_steps": 2,
      "eval.num_samples": 0, "lora.enabled": True, "lora.rank": 2})
  mesh = mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  tr = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = tr.init_state()
  x = jax.device_put(jax.random.normal(jax.random.key(0), tr.bb.latent_shape(8)),
                     mesh_lib.batch_sharding(mesh, 4, tr.rules, 8))
  cond = tr.bb.encode(["a red circle"] * 8)
  got, expected = _returned_bytes(
      tr._sample, tr.policy_params(state), tr.bb.frozen(), cond, tr.bb.negative(1), x,
      jax.random.key(1), jnp.float32(5.0), jnp.asarray(tr.levels(c.sample.eta, 2)), num_steps=2)
  assert got == expected, (got, expected)
  pipe = sd.SDPipeline.from_pretrained(folder)
  got, expected = _returned_bytes(
      sd._sample, pipe.unet, pipe.vae, cond, tr.bb.negative(8), jnp.zeros((8, 4, 4, 4)),
      jax.random.key(1), pipe.schedule, 2, 5.0, 1.0, mesh=pipe.mesh())
  assert got == expected, (got, expected)
