"""benchmarks/accelerator.py: its FLOP counting (loops, convolutions) and one tiny end-to-end run
(DDPO on a tiny random toy UNet, 2 samples, 2 sampling steps, one repeat)."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from didr_jax.testing import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location(
      "accelerator_bench", os.path.join(REPO, "benchmarks", "accelerator.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_rolled_scan_is_counted_at_its_trip_count(bench):
  x = jnp.ones((32, 32), jnp.float32)
  f = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=4)[0])
  f(x)
  body = 2.0 * 32 ** 3
  counting = bench.xla_loop_counting()
  a = bench.analyse(f, (x,), {}, counting, 1)
  assert a["gflop_jaxpr"] * 1e9 == pytest.approx(4 * body)
  assert a["gflop"] * 1e9 == pytest.approx(4 * body, rel=0.05)
  if counting == "once":   # XLA saw one body; the row says what was added
    assert a["gflop_xla"] * 1e9 == pytest.approx(body, rel=0.05)
    assert any("while-loop" in n for n in a["notes"])
  # unrolled: XLA sees every iteration, nothing is added
  g = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=4,
                                     unroll=True)[0])
  g(x)
  b = bench.analyse(g, (x,), {}, counting, 1)
  assert b["gflop"] == pytest.approx(b["gflop_xla"]) and not b["notes"]


def test_jaxpr_flops_of_dot_and_conv(bench):
  lhs = jnp.ones((2, 8, 8, 3))
  rhs = jnp.ones((3, 3, 3, 16))
  conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = bench.jaxpr_flops(jax.make_jaxpr(conv)(lhs, rhs))
  assert got["full"] == 2.0 * (2 * 8 * 8 * 16) * (3 * 3 * 3)
  mm = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
  got = bench.jaxpr_flops(jax.make_jaxpr(mm)(jnp.ones((4, 5, 6)), jnp.ones((4, 6, 7))))
  assert got["full"] == 2.0 * 4 * 5 * 6 * 7


def test_tiny_ddpo_run_reports_rates_and_mfu(bench, tmp_path):
  folder = tiny.save_tiny_toy(str(tmp_path / "toy"), sample_size=8)
  out = str(tmp_path / "bench")
  rows = bench.main(["--methods=ddpo", f"--backbone_path={folder}", "--batch=2",
                     "--repeats=1", "--set", "sample.num_steps=2", f"--out={out}"])
  units = {r["program"]: r for r in rows if not r["program"].startswith(" ")}
  assert set(units) == {"sample", "train step"}
  for r in units.values():
    assert r["samples_per_s"] > 0 and r["gflop"] > 0 and r["seconds"] > 0
    assert r["mfu"] is not None and r["mfu"] > 0          # CPU: the measured matmul peak
  programs = {r["program"].strip(): r for r in rows if r["program"].startswith(" ")}
  assert {"_sample", "_update"} <= set(programs)
  # the sampler is a rolled lax.scan: its FLOPs include the iterations XLA counts once
  s = programs["_sample"]
  assert s["gflop"] > s["gflop_xla"] and s["gflop"] == pytest.approx(s["gflop_jaxpr"], rel=0.1)
  saved = json.load(open(out + ".json"))
  assert saved["rows"] and saved["environment"]["backend"] == jax.default_backend()
  assert "| toy_ddpo | sample" in open(out + ".md").read()
