"""The package's import graph keeps its layering (``benchmarks/import_graph.py``, read with
``ast``: nothing is imported): no import cycle, function-level imports included, and a reason
written beside every upward import and every function-level import across parts.

``CHECKED`` is the whole package."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import import_graph as ig  # noqa: E402

CHECKED = ("didr_jax",)  # the whole package


@pytest.fixture(scope="module")
def report():
  return ig.analyse(os.path.join(ROOT, "didr_jax"))


def test_checked_parts_keep_the_layering(report):
  """No cycle through a checked module; each upward or function-level cross-part import of a
  checked module carries a ``# upward:`` / ``# lazy:`` reason (the list names each break)."""
  assert report.violations(CHECKED) == []


def test_every_module_has_a_level(report):
  """A new top-level module or package must be placed in ``LAYERS`` (``analyse`` raises
  otherwise); the ground floor imports nothing of the package."""
  assert all(p == ig.GROUND or p in sum(ig.LAYERS, ()) for p in report.parts)
  assert not [e for e in report.graph.edges if report.part(e.src) == "errors"]


def _write(folder, files):
  for name, text in files.items():
    path = os.path.join(folder, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)


def test_finds_cycles_upward_imports_and_reasons(tmp_path, monkeypatch):
  """On a made-up package: a circle hidden in a function, a parent package run by a submodule
  import, an upward import without and one with a reason, a TYPE_CHECKING import (ignored)."""
  monkeypatch.setattr(ig, "LAYERS", [("low",), ("high",)])
  monkeypatch.setattr(ig, "PARTS", {"": "root"})
  pkg = tmp_path / "pkg"
  _write(str(pkg), {
      "__init__.py": "",
      "low/__init__.py": "from pkg.low import a  # noqa\n",
      "low/a.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg.high import c\n"
                   "def f():\n  from pkg.high import b\n"),
      "low/d.py": "from pkg.high import c  # upward: c's table is read at import\n",
      "high/__init__.py": "",
      "high/b.py": "from pkg.low import d\nfrom pkg.low.a import f\n",
      "high/c.py": "import os\n",
  })
  rep = ig.analyse(str(pkg))
  assert rep.circles == [["pkg.high.b", "pkg.low", "pkg.low.a"]]
  assert rep.parts == {"root": -1, "low": 0, "high": 1}
  up = {(e.src, e.dst): e for e in rep.upward}
  assert set(up) == {("pkg.low.a", "pkg.high.b"), ("pkg.low.d", "pkg.high.c")}
  assert up["pkg.low.a", "pkg.high.b"].function and up["pkg.low.a", "pkg.high.b"].reason is None
  assert up["pkg.low.d", "pkg.high.c"].reason == ("upward", "c's table is read at import")
  assert ig.analyse(str(pkg)).violations(("pkg.high",)) == [
      "cycle: pkg.high.b <-> pkg.low <-> pkg.low.a"]
  assert rep.violations(("pkg.low.d",)) == []
  assert len(rep.violations()) == 2  # the cycle; a.py's upward import (named once)
  assert rep.graph.function_statements == 1 and rep.graph.statements == 7
