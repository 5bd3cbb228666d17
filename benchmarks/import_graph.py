"""The import graph of ``didr_jax``, read with ``ast`` (nothing is imported), against the
intended layering below.

  python benchmarks/import_graph.py [--root=didr_jax] [--markdown[=docs/import_graph.md]]

Every ``import`` / ``from ... import`` of a ``didr_jax`` module is an edge ``importer ->
imported`` (``from P import name`` reaches the submodule ``P.name`` when there is one, else the
package ``P``); importing ``a.b.c`` also runs the packages ``a.b`` and ``a`` that are not the
importer's own ancestors, so those are edges too (they count for the cycles only: a package is
never on a higher level than its modules). An import is *function-level* when it sits inside
a ``def`` (it runs on the first call), else *module-level*; imports under ``if TYPE_CHECKING:``
never run and are left out.

Each module belongs to one *part* (``PARTS``: the longest matching prefix) and each part to one
*level* of ``LAYERS`` (the ground floor first). An edge is *upward* when it goes from a part to a
part on a higher level; *cross-part* when the two parts differ. The rules that
``tests/test_import_graph.py`` checks:

- no import cycle among modules, function-level imports included (a strongly connected component
  of more than one module);
- every upward edge, and every function-level cross-part import, carries its reason on the import
  statement's lines: a comment ``# upward: <reason>`` (why a lower part needs a higher one) or
  ``# lazy: <reason>`` (the start-up time, or the import side effect, that the function-level
  import saves); either tag satisfies either rule.

The report prints the parts with their levels, the part-to-part edges, every upward edge with its
reason, the cycles, and the counts of import statements (all, function-level, function-level of a
``didr_jax`` module, function-level across parts).
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import io
import os
import re
import sys
import tokenize

# The intended layering, ground floor first: a part may import parts on its own level or below;
# an import of a higher level is an "upward" edge and needs a written reason.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),  # the user errors; imports nothing from the package
    ("convert", "diffusion", "parallel"),  # weight files (safetensors, Orbax); samplers; mesh
    ("models", "losses"),  # the networks; the methods' pure losses
    ("pipelines", "toy", "convert.lora_weights"),  # backbones and model folders; the toy
                                                   # world; LoRA adapters <-> PEFT weights
    ("exact",),  # the exact Gaussian-mixture benchmark: mixtures, tilts, its point backbone
    ("rewards",),  # the reward registry and the built-in rewards (toy, exact, CLIP, remote)
    ("train",),  # configs, trainers, the loop
    ("cli",),  # the command lines, run / LoRA export
    ("exact.config", "toy.pretrain", "testing"),  # on top of train: config heads, pretraining
]

# Part of a module: the value of the longest key that prefixes its name (after ``didr_jax.``);
# else the name's first component (``didr_jax.models.unet`` -> ``models``).
PARTS: dict[str, str] = {
    "": "root",  # didr_jax/__init__.py: environment defaults, no imports of the package
    "main": "cli",
    "evaluate": "cli",
    "sample": "cli",
    "export": "cli",
    "cli_util": "cli",
    "convert.__main__": "cli",
    "convert.run_export": "cli",
    "convert.lora_export": "cli",
    "convert.lora_weights": "convert.lora_weights",  # reads models' adapters: above models
    "exact.config": "exact.config",  # configs/exact_*.py's shared head (a train config)
    "toy.pretrain": "toy.pretrain",  # the toy backbones' pretraining stages (train's trainers)
}
GROUND = "root"  # imported by every import of a submodule; sits below every level

# Why the parts sit where they do (written into the Markdown report).
NOTES = """\
- `errors`: the user errors (`ConfigError`, `ConversionError`, `RewardError`, `PromptError`);
  every floor raises them, so they import nothing.
- `convert` is the weight files every model reads (`core`: safetensors, torch layouts;
  `orbax_io`; `aesthetic`, the one-off MLP conversion); the command lines that convert whole
  pipelines and export runs or LoRA weights (`convert.__main__`, `run_export`, `lora_export`)
  are part `cli`; `convert.lora_weights` (a model's LoRA adapters in diffusers' PEFT format,
  merged pipelines) reads the models' adapters and sits beside `pipelines`.
- `pipelines`: `registry` sits above `sd` and `zimage`: the classes read a folder's
  `model_index.json` with `base.read_index` / `pipeline_kind` / `components`, and the registry
  picks between them (it named them before, and `sd` imported it back: a circle).
- `toy` is the toy world (shapes, detector, tokenizer, toy CLIP, fidelity): it imports only
  `models` (the CLIP towers and `models.clip.preprocess`, the CLIP image preprocessing the CLIP
  rewards share), nothing of `rewards` or `train`. Its pretraining stages (`toy.pretrain`) drive
  the trainers and sit at the top; they read `configs/toy_tdm.py` through `testing.configs`.
- `exact` is the exact benchmark: mixtures, tilts, metrics, problems and its point backbone (on
  `pipelines`). The rewards import it, not the other way: `rewards/exact.py` registers the
  benchmark's point rewards as `rewards/toy.py` registers the toy world's. The registry is the
  one place that names rewards, the benchmark's rewards are plain functions of the points, and
  every `rewards.make` by name then finds them; the benchmark registering itself would have
  needed `exact -> rewards` (upward) and an import of `exact` wherever rewards are built.
  `exact.config`, the head every `configs/exact_<method>.py` shares, is a training config: it
  sits above `train`.
- `rewards`: the registry and the built-in rewards (toy, exact, CLIP, remote).
- `train`, then the command lines (`cli`), then what is built on them (`toy.pretrain`,
  `testing`: the tiny test checkpoints and the loader of `configs/`, `exact.config`).
"""

REASON = re.compile(r"#.*?\b(upward|lazy):\s*(\S.*)$")


@dataclasses.dataclass(frozen=True)
class Edge:
  src: str  # importing module
  dst: str  # imported module (a didr_jax module)
  line: int  # line of the import statement in src
  function: bool  # inside a def
  implied: bool  # a parent package run by importing a submodule (not named in the statement)
  reason: tuple[str, str] | None  # ("upward" | "lazy", text) from the statement's comment


@dataclasses.dataclass
class Graph:
  modules: dict[str, str]  # module -> file path
  edges: list[Edge]
  statements: int  # import statements (any module, didr_jax or not), TYPE_CHECKING excluded
  function_statements: int  # of those, inside a def
  function_internal: int  # function-level statements that import a didr_jax module


def module_name(path: str, root: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(os.path.abspath(root)))
  parts = rel[:-3].split(os.sep)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def find_modules(root: str) -> dict[str, str]:
  out = {}
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        out[module_name(path, root)] = path
  return out


def part_of(module: str, package: str) -> str:
  rest = module[len(package) + 1:] if module != package else ""
  best = None
  for key in PARTS:
    if key and (rest == key or rest.startswith(key + ".")):
      best = key if best is None or len(key) > len(best) else best
  if best is not None:
    return PARTS[best]
  return PARTS[""] if not rest else rest.split(".")[0]


def level_of(part: str) -> int:
  if part == GROUND:
    return -1
  for i, layer in enumerate(LAYERS):
    if part in layer:
      return i
  raise KeyError(f"part {part!r} is not in LAYERS; add it to the layering")


def _comments(source: str) -> dict[int, str]:
  out = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = tok.string
  return out


def _reason(node: ast.stmt, comments: dict[int, str]) -> tuple[str, str] | None:
  for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
    m = REASON.search(comments.get(line, ""))
    if m:
      return m.group(1), m.group(2).strip()
  return None


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
  """Yields (import node, inside a def) for every import that runs (not under TYPE_CHECKING)."""
  def walk(node, in_def):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and _is_type_checking(child.test):
        for c in child.orelse:
          yield from walk(ast.Module(body=[c], type_ignores=[]), in_def)
        continue
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        yield child, in_def
      inner = in_def or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      yield from walk(child, inner)
  yield from walk(tree, False)


def _targets(node: ast.stmt, module: str, is_package: bool, modules) -> list[str]:
  """The didr_jax modules an import statement names."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if node.level:  # relative: resolve against the importer's package
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    name = ".".join(base + ([node.module] if node.module else []))
  else:
    name = node.module or ""
  out = []
  for a in node.names:
    sub = f"{name}.{a.name}"
    out.append(sub if sub in modules else name)
  return out


def _ancestors(module: str) -> list[str]:
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def build(root: str) -> Graph:
  root = root.rstrip(os.sep)
  package = os.path.basename(root)
  modules = find_modules(root)
  edges, statements, fn_statements, fn_internal = [], 0, 0, 0
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      source = f.read()
    comments = _comments(source)
    is_package = path.endswith("__init__.py")
    own = set(_ancestors(module)) | ({module} if is_package else set())
    for node, in_def in _imports(ast.parse(source, path)):
      statements += 1
      fn_statements += in_def
      reason = _reason(node, comments)
      seen, internal = set(), False
      for target in _targets(node, module, is_package, modules):
        if target != package and not target.startswith(package + "."):
          continue
        internal = True
        named = [target] if target in modules else []
        implied = [a for a in _ancestors(target) if a not in own and a in modules]
        for dst, imp in [(d, False) for d in named] + [(d, True) for d in implied]:
          if (dst, imp) in seen or dst == module:
            continue
          seen.add((dst, imp))
          edges.append(Edge(module, dst, node.lineno, in_def, imp, reason))
      fn_internal += in_def and internal
  return Graph(modules, edges, statements, fn_statements, fn_internal)


def cycles(graph: Graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), over every edge."""
  succ = collections.defaultdict(set)
  for e in graph.edges:
    succ[e.src].add(e.dst)
  index, low, stack, on, out = {}, {}, [], set(), []
  sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(succ[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph.modules):
    if v not in index:
      visit(v)
  return sorted(out)


@dataclasses.dataclass
class Report:
  graph: Graph
  package: str
  parts: dict[str, int]  # part -> level
  part_edges: dict[tuple[str, str], list[Edge]]  # cross-part edges by (src part, dst part)
  upward: list[Edge]
  cross_function: list[Edge]  # function-level edges across parts (implied ones left out)
  circles: list[list[str]]

  def part(self, module: str) -> str:
    return part_of(module, self.package)

  def violations(self, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """The rule breaks whose importer starts with one of ``prefixes`` (module names)."""
    mine = lambda m: any(m == p or m.startswith(p + ".") or not p for p in prefixes)
    out = []
    for comp in self.circles:
      if any(mine(m) for m in comp):
        out.append("cycle: " + " <-> ".join(comp))
    for e in self.upward + self.cross_function:
      if mine(e.src) and e.reason is None:
        kind = "upward" if e in self.upward else "function-level cross-part"
        out.append(f"{kind} import without a reason: {e.src}:{e.line} -> {e.dst} "
                   f"({self.part(e.src)} -> {self.part(e.dst)})")
    return sorted(set(out))


def analyse(root: str) -> Report:
  graph = build(root)
  package = os.path.basename(root.rstrip(os.sep))
  parts = {}
  for m in graph.modules:
    p = part_of(m, package)
    parts[p] = level_of(p)
  part_edges = collections.defaultdict(list)
  upward, cross_function = [], []
  for e in graph.edges:
    a, b = part_of(e.src, package), part_of(e.dst, package)
    if a == b or e.implied:  # a parent package is never above the module it holds
      continue
    part_edges[(a, b)].append(e)
    if level_of(b) > level_of(a):
      upward.append(e)
    if e.function and not e.implied:
      cross_function.append(e)
  return Report(graph, package, parts, dict(part_edges), upward, cross_function, cycles(graph))


def _rel(report: Report, module: str) -> str:
  return module[len(report.package) + 1:] or report.package


def render(report: Report, markdown: bool) -> str:
  g, out = report.graph, []
  h = (lambda s: f"\n## {s}\n") if markdown else (lambda s: f"\n{s}\n{'-' * len(s)}")
  item = "- " if markdown else "  "
  code = (lambda s: f"`{s}`") if markdown else (lambda s: s)
  levels = collections.defaultdict(list)
  for p, lv in report.parts.items():
    if p != GROUND:
      levels[lv].append(p)
  n_levels = len(levels)
  up_pairs = sorted({k for k in report.part_edges if level_of(k[1]) > level_of(k[0])})
  if markdown:
    out.append("# The import graph of didr_jax\n")
    out.append("Written by `python benchmarks/import_graph.py --markdown` (read with `ast`,\n"
               "nothing imported); `tests/test_import_graph.py` checks the rules: no import\n"
               "cycle (function-level imports included), and a reason beside every upward\n"
               "import (`# upward: ...`) and every function-level import across parts\n"
               "(`# lazy: ...`: the start-up time or import side effect it saves). The layering\n"
               "is `LAYERS` at the top of the script.\n")
    out.append("## The layering and its reasons\n")
    out.append(NOTES.rstrip("\n"))
  out.append(h("Summary"))
  out.append(f"{item}{len(g.modules)} modules, {len(report.parts) - 1} parts on {n_levels} levels")
  out.append(f"{item}{len(report.part_edges)} part-to-part edges, {len(up_pairs)} of them upward "
             f"({len(report.upward)} module edges)")
  out.append(f"{item}{len(report.circles)} import cycle{'' if len(report.circles) == 1 else 's'}")
  out.append(f"{item}{g.statements} import statements, {g.function_statements} inside functions; "
             f"{g.function_internal} of those import a {report.package} module, "
             f"{len({(e.src, e.line) for e in report.cross_function})} across parts")
  out.append(h("Levels (ground floor first)"))
  for lv in sorted(levels):
    out.append(f"{item}{lv}: " + ", ".join(code(p) for p in sorted(levels[lv])))
  out.append(h("Part-to-part edges"))
  for (a, b), es in sorted(report.part_edges.items(), key=lambda kv: (level_of(kv[0][0]),
                                                                       kv[0])):
    tag = " (upward)" if level_of(b) > level_of(a) else ""
    fn = sum(e.function for e in es)
    out.append(f"{item}{code(a)} -> {code(b)}{tag}: {len(es)} imports"
               + (f", {fn} function-level" if fn else ""))
  for title, edges, level_tag in (("Upward edges and their reasons", report.upward, True),
                                  ("Function-level imports across parts",
                                   report.cross_function, False)):
    out.append(h(title))
    if not edges:
      out.append(f"{item}none")
    for e in sorted(edges, key=lambda e: (e.src, e.line, e.dst)):
      where = f" ({'function' if e.function else 'module'}-level)" if level_tag else ""
      why = f"{e.reason[0]}: {e.reason[1]}" if e.reason else "NO REASON GIVEN"
      out.append(f"{item}{code(_rel(report, e.src))}:{e.line} -> {code(_rel(report, e.dst))}"
                 f"{where} -- {why}")
  out.append(h("Import cycles (function-level imports included)"))
  if not report.circles:
    out.append(f"{item}none")
  for comp in report.circles:
    out.append(f"{item}" + ", ".join(code(_rel(report, m)) for m in comp))
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--root", default=os.path.join(here, "didr_jax"))
  ap.add_argument("--markdown", nargs="?", const=os.path.join(here, "docs", "import_graph.md"),
                  default=None, help="write the report as Markdown to this file")
  args = ap.parse_args(argv)
  report = analyse(args.root)
  print(render(report, markdown=False), end="")
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(render(report, markdown=True))
    print(f"\nwrote {args.markdown}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
