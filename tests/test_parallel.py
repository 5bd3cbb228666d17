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
