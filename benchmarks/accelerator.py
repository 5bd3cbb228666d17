"""Samples/s and model-FLOP utilisation of each method's sampler and train step, on any backend.

  python benchmarks/accelerator.py [--methods=ddpo,crd,didr,tdm,tdmr1] [--batch=N]
      [--repeats=5] [--config=configs/X.py[:arg] ...] [--set key=value ...]
      [--backbone_path=DIR] [--tiny] [--num_devices=1] [--peak_tflops=X] [--out=PATH]

Each config (default: the toy config of each of ``--methods``; ``--config`` replaces them, e.g.
``--config=configs/didr_sdxl.py --backbone_path=/models/sdxl``) is built as the training loop
builds it (``loop.build_backbone`` / ``loop.make_trainer``) on ``--num_devices`` devices
(default one: figures per chip), and two *units* are timed:
  sample      ``trainer.sample(policy params, prompts, rng)``: the method's own sampler at the
              batch (DDPO / CRD: the config's multi-step rollout with CFG; DIDR: the one-step
              generator; TDM / TDM-R1: the K-step student), text encoding included;
  train step  one optimizer step of the method, called as its epoch calls it:
                DDPO  one ``_update`` (train.batch_size x grad_accum trajectories, their
                      k trained steps each) on a minibatch laid out by ``_prepare`` from real
                      rollouts with random advantages (an epoch's rollouts are the sample
                      unit; its host rewards and its one ``_prepare`` are not timed);
                CRD   one ``_update`` (train.batch_size x grad_accum samples at
                      crd.num_train_times forward times) on real rollouts, random rewards;
                DIDR  ``train_step``: didr.fake_updates fake-score updates + one generator
                      update (DRP included);
                TDM   ``train_step``: the iteration's student rollout + M x (fake, generator)
                      updates; TDM-R1 adds M surrogate (DGPO) updates and waits for the
                      rollout's rewards, here random numbers from a stub rewarder (the host
                      reward model is not an accelerator program).
Each unit is called once to warm up (compilation, or a persistent-cache load: the "first call"
column) and once more (up to 3 more while a call still compiles; compilation inside a timed
call is reported), then ``--repeats`` times; seconds per call are the median. Every jitted
program a unit runs (the trainer's jitted functions and the pipeline module's, e.g. the text
encoder) is recorded; ``--repeats`` more calls of the unit then time each program alone
(blocking after each call), giving one row per program with its calls per unit.

FLOPs are XLA's: ``jitted.lower(*the recorded args).compile().cost_analysis()["flops"]`` of the
very program that ran (after the call the lowering and the executable come from JAX's caches, no
second compilation). XLA's HloCostAnalysis counts the body of a while loop once, not times its
trip count (checked in every run on a scan of matmuls: "loop counting" in the header), and the
samplers are ``lax.scan`` loops. So each program's jaxpr is walked too, counting the matmul and
convolution FLOPs (dot_general, conv_general_dilated; scans times their length), once with
loops at their trip counts ("GFLOP jaxpr") and once as XLA counts them; when the compiled
program has while loops and XLA counts bodies once, the difference (the matmul / conv FLOPs of
the iterations XLA did not see) is added to XLA's count and the row says so. If XLA's count is
below half the jaxpr's (e.g. convolutions lowered to library custom calls it cannot cost) the
jaxpr count is used instead, also said. The jaxpr count is the matmul / conv work of the program
as written (rematerialised forwards included); XLA's adds elementwise work. XLA costs an SPMD
program per device: with ``--num_devices`` N its count is multiplied by N.

MFU = FLOPs per call / seconds per call / peak. The peak is dense FLOP/s per device from a table
(TPU v4 / v5e / v5p / v6e, NVIDIA H100 / H200 / A100), times the devices used, for the config's
dtype: bfloat16 -> the bf16 peak; float32 -> on TPUs the bf16 peak (XLA's default precision runs
f32 matmuls as single bf16 passes), on NVIDIA the TF32 tensor-core peak (the default precision)
or the plain FP32 peak under ``jax_default_matmul_precision=highest``. On CPU the "peak" is
measured in the same run: the best of 5 jitted 2048 x 2048 float32 matmuls. Unknown devices:
FLOP/s are printed and MFU is left blank. ``--peak_tflops`` overrides the peak (per device).

Prints the backend, device kind and count, jax version and load average, then a markdown table;
``--out=PATH`` writes PATH.json (every number, the command) and PATH.md.
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIGS = {"ddpo": "toy_ddpo", "crd": "toy_crd", "didr": "toy_didr", "tdm": "toy_tdm",
               "tdmr1": "toy_tdmr1"}

# --------------------------------------------------------------------------------- peaks

# Dense (no sparsity) peak TFLOP/s per device (one jax device = one chip on these). NVIDIA:
# SXM parts unless the name says PCIe / NVL; "tf32" is the tensor-core rate XLA:GPU uses for
# float32 dots at the default precision, "fp32" the CUDA-core rate (precision "highest").
# TPUs have no separate f32 matmul rate: at the default precision XLA runs f32 matmuls as
# single bf16 MXU passes, so f32 programs are rated against the bf16 peak.
PEAKS = [  # (lower-case substrings of device_kind, all required) -> TFLOP/s
    (("tpu v4",), {"bf16": 275.0, "tf32": 275.0, "fp32": 275.0}),
    (("tpu v5 lite",), {"bf16": 197.0, "tf32": 197.0, "fp32": 197.0}),
    (("tpu v5e",), {"bf16": 197.0, "tf32": 197.0, "fp32": 197.0}),
    (("tpu v5p",), {"bf16": 459.0, "tf32": 459.0, "fp32": 459.0}),
    (("tpu v5",), {"bf16": 459.0, "tf32": 459.0, "fp32": 459.0}),   # v5p reports "TPU v5"
    (("tpu v6 lite",), {"bf16": 918.0, "tf32": 918.0, "fp32": 918.0}),
    (("tpu v6e",), {"bf16": 918.0, "tf32": 918.0, "fp32": 918.0}),
    (("h200", "nvl"), {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (("h200",), {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("h100", "pcie"), {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (("h100", "nvl"), {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (("h100",), {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("a100",), {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def table_peak(device_kind: str) -> dict | None:
  kind = device_kind.lower()
  for keys, peak in PEAKS:
    if all(k in kind for k in keys):
      return peak
  return None


def measured_cpu_peak(n: int = 2048, tries: int = 5) -> float:
  """FLOP/s of the best of ``tries`` jitted n x n float32 matmuls on the first device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.dot)
  mm(a, b).block_until_ready()
  best = math.inf
  for _ in range(tries):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def resolve_peak(dtype: str, num_devices: int, override: float | None,
                 cpu_peak: float | None) -> tuple[float | None, str]:
  """(peak FLOP/s of the devices used, or None; where it comes from)."""
  dev = jax.devices()[0]
  if override:
    return override * 1e12 * num_devices, f"--peak_tflops={override:g} per device"
  if dev.platform == "cpu":
    return cpu_peak * num_devices, ("measured: best of 5 jitted 2048^2 float32 matmuls in this "
                                    "run, on the same shared CPU")
  peak = table_peak(dev.device_kind)
  if peak is None:
    return None, f"no peak known for {dev.device_kind!r} (pass --peak_tflops): MFU left blank"
  if dtype == "bfloat16":
    key = "bf16"
  else:
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    key = "fp32" if precision in ("highest", "float32") and dev.platform == "gpu" else "tf32"
  name = {"bf16": "bf16", "tf32": "TF32 (f32 at default precision)" if dev.platform == "gpu"
          else "bf16 (f32 matmuls run as bf16 passes)", "fp32": "FP32"}[key]
  return peak[key] * 1e12 * num_devices, f"table: {dev.device_kind} {name} {peak[key]:g} TFLOP/s"


# --------------------------------------------------------------------------------- FLOPs


def _subjaxprs(params: dict):
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(x, "eqns"):
        yield x
      elif hasattr(getattr(x, "jaxpr", None), "eqns"):
        yield x.jaxpr


def _shape(v) -> tuple:
  return tuple(getattr(v.aval, "shape", ()))


def jaxpr_flops(jaxpr) -> dict:
  """Matmul + convolution FLOPs of a jaxpr: ``full`` with every loop at its trip count (scan
  length; a while_loop's unknown trip count as 1), ``once`` as XLA's cost analysis counts
  them (a rolled loop's body once: a scan unrolled u times contributes u bodies), and the
  number of rolled scans and while loops."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  full = once = 0.0
  rolled = whiles = 0
  for e in jaxpr.eqns:
    name = e.primitive.name
    if name == "dot_general":
      (lc, rc), (lb, rb) = e.params["dimension_numbers"]
      rhs = _shape(e.invars[1])
      free = math.prod(d for i, d in enumerate(rhs) if i not in tuple(rc) + tuple(rb))
      f = 2.0 * math.prod(_shape(e.invars[0])) * free
      full, once = full + f, once + f
    elif name == "conv_general_dilated":
      rhs = _shape(e.invars[1])
      out_feature = e.params["dimension_numbers"].rhs_spec[0]
      f = 2.0 * math.prod(_shape(e.outvars[0])) * math.prod(rhs) / rhs[out_feature]
      full, once = full + f, once + f
    elif name == "scan":
      sub = jaxpr_flops(e.params["jaxpr"])
      length = int(e.params["length"])
      unroll = e.params.get("unroll", 1)
      unroll = length if unroll is True else max(1, int(unroll))
      seen = min(unroll, length)
      full += length * sub["full"]
      once += seen * sub["once"]
      rolled += sub["rolled"] + (1 if seen < length else 0)
      whiles += sub["whiles"]
    elif name == "while":
      body, cond = jaxpr_flops(e.params["body_jaxpr"]), jaxpr_flops(e.params["cond_jaxpr"])
      full += body["full"] + cond["full"]
      once += body["once"] + cond["once"]
      rolled += body["rolled"] + cond["rolled"]
      whiles += 1 + body["whiles"] + cond["whiles"]
    elif name == "cond":
      subs = [jaxpr_flops(b) for b in e.params["branches"]]
      full += max(s["full"] for s in subs)
      once += max(s["once"] for s in subs)
      rolled += max(s["rolled"] for s in subs)
      whiles += max(s["whiles"] for s in subs)
    else:  # pjit, remat, custom_jvp / custom_vjp calls, shard_map, ...
      for sj in _subjaxprs(e.params):
        sub = jaxpr_flops(sj)
        full, once = full + sub["full"], once + sub["once"]
        rolled, whiles = rolled + sub["rolled"], whiles + sub["whiles"]
  return {"full": full, "once": once, "rolled": rolled, "whiles": whiles}


def xla_cost(compiled) -> dict:
  """{"flops", "bytes"} of a compiled program (cost_analysis is a dict, or a list of dicts in
  older jax versions: summed)."""
  ca = compiled.cost_analysis()
  parts = ca if isinstance(ca, (list, tuple)) else [ca]
  parts = [p for p in parts if p]
  get = lambda k: float(sum(p.get(k, 0.0) for p in parts)) if parts else float("nan")
  return {"flops": get("flops"), "bytes": get("bytes accessed")}


def hlo_while_loops(compiled) -> int:
  try:
    text = compiled.as_text() or ""
  except Exception:  # noqa: BLE001 (some backends cannot print the executable)
    return -1
  return len(re.findall(r"\bwhile\(", text))


def xla_loop_counting() -> str:
  """'once' when XLA's cost analysis counts a rolled loop's body once (not times its trip
  count), 'trips' when it multiplies: measured on a rolled scan of 4 matmuls."""
  x = jnp.ones((64, 64), jnp.float32)
  step = lambda c, _: (jnp.tanh(c @ c), None)
  f = jax.jit(lambda x: jax.lax.scan(step, x, None, length=4)[0])
  flops = xla_cost(f.lower(x).compile())["flops"]
  body = 2.0 * 64 ** 3
  return "trips" if flops >= 3.0 * body else "once"


def _jaxpr(fn, args, kw):
  """The jaxpr of ``fn(*args, **kw)`` traced over the array leaves only (strings, ints and
  other static leaves stay constants, as the jitted function's static arguments)."""
  leaves, treedef = jax.tree.flatten((args, kw))
  idx = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray, np.generic))]

  def f(*arrays):
    full = list(leaves)
    for i, a in zip(idx, arrays):
      full[i] = a
    a, k = jax.tree.unflatten(treedef, full)
    return fn(*a, **k)
  return jax.make_jaxpr(f)(*[leaves[i] for i in idx])


def analyse(fn, args, kw, loop_counting: str, num_devices: int) -> dict:
  """XLA's and the jaxpr's FLOP counts of ``fn(*args, **kw)`` (a jitted function that has
  already run with these arguments: lowering and compiling come from JAX's caches) and the
  FLOPs per call used for MFU, with a note when they are not XLA's count as it is."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args, **kw).compile()
  cost = xla_cost(compiled)
  # SPMD programs are costed per device
  xla = cost["flops"] * num_devices
  whiles = hlo_while_loops(compiled)
  try:
    jx = jaxpr_flops(_jaxpr(fn, args, kw))
  except Exception as e:  # noqa: BLE001 (tracing can fail on exotic arguments: keep XLA's)
    jx = {"full": float("nan"), "once": float("nan"), "rolled": 0, "whiles": 0,
          "error": f"{type(e).__name__}: {e}"}
  flops, notes = xla, []
  missing = jx["full"] - jx["once"]
  if whiles > 0 and loop_counting == "once" and missing > 0:
    flops = xla + missing
    notes.append(f"XLA counts each of its {whiles} while-loop bodies once: +{missing / 1e9:.3g} "
                 "GFLOP matmul/conv of the other iterations (jaxpr)")
    if 0 < whiles < jx["rolled"]:
      notes.append(f"XLA unrolled some of the {jx['rolled']} rolled scans: the correction may "
                   "overcount")
  if not math.isnan(jx["full"]) and (math.isnan(flops) or flops < 0.5 * jx["full"]):
    notes.append(f"XLA's count ({xla / 1e9:.3g} GFLOP) is below half the jaxpr's matmul/conv "
                 "count (custom calls?): MFU uses the jaxpr count")
    flops = jx["full"]
  if jx["whiles"]:
    notes.append(f"{jx['whiles']} while_loop(s) of unknown trip count counted once in the jaxpr")
  return {"gflop": flops / 1e9, "gflop_xla": xla / 1e9, "gflop_jaxpr": jx["full"] / 1e9,
          "gbytes_xla": cost["bytes"] * num_devices / 1e9, "hlo_while_loops": whiles,
          "jaxpr_rolled_scans": jx["rolled"], "notes": notes,
          "analysis_s": round(time.perf_counter() - t0, 2),
          **({"jaxpr_error": jx["error"]} if "error" in jx else {})}


# --------------------------------------------------------------------------------- recording


def _signature(args, kw) -> tuple:
  """A hashable key of a call's argument shapes and dtypes (and static values)."""
  out = []
  for leaf in jax.tree.leaves((args, kw), is_leaf=lambda x: x is None):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      out.append((tuple(leaf.shape), str(leaf.dtype)))
    elif isinstance(leaf, (int, float, str, bool)) or leaf is None:
      out.append(repr(leaf))
    else:
      out.append(type(leaf).__name__)
  return tuple(out)


class Recorder:
  """Wraps jitted functions (trainer attributes, pipeline-module functions) so that each call
  is logged (program key) while a log is open, each distinct program keeps the arguments of its
  first call (for its cost analysis), and, in profile mode, each call is blocked on and timed."""

  def __init__(self):
    self.programs: dict[tuple, dict] = {}
    self.log: list | None = None
    self.profile = False
    self.durations: dict[tuple, list] = collections.defaultdict(list)

  def wrap(self, name: str, fn):
    def call(*args, **kw):
      key = (name, _signature(args, kw))
      if key not in self.programs:
        self.programs[key] = {"name": name, "fn": fn, "args": args, "kw": kw}
      if self.log is not None:
        self.log.append(key)
      if not self.profile:
        return fn(*args, **kw)
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kw))
      self.durations[key].append(time.perf_counter() - t0)
      return out
    call.lower = fn.lower
    call.__wrapped__ = fn
    return call


RECORDER = Recorder()
_WRAPPED_MODULES: dict = {}   # module name -> [(module, attribute, original function)]


def _unwrap_modules() -> None:
  """Puts the pipeline modules' own jitted functions back (``main`` ends with it)."""
  for wrapped in _WRAPPED_MODULES.values():
    for mod, name, fn in wrapped:
      setattr(mod, name, fn)
  _WRAPPED_MODULES.clear()
  RECORDER.programs.clear()


def _record_trainer(trainer) -> None:
  for name, v in list(vars(trainer).items()):
    if callable(v) and hasattr(v, "lower") and not getattr(v, "_recorded", False):
      w = RECORDER.wrap(name, v)
      w._recorded = True
      setattr(trainer, name, w)
  # the pipeline module's jitted functions (text encoders, ...), wrapped once per module
  mod = sys.modules.get(type(trainer.bb).__module__)
  if mod is not None and mod.__name__ not in _WRAPPED_MODULES:
    wrapped = _WRAPPED_MODULES[mod.__name__] = []
    short = mod.__name__.rsplit(".", 1)[-1]
    for name, v in list(vars(mod).items()):
      if callable(v) and hasattr(v, "lower") and not isinstance(v, type) \
          and not getattr(v, "_recorded", False):
        w = RECORDER.wrap(f"{short}.{name}", v)
        w._recorded = True
        setattr(mod, name, w)
        wrapped.append((mod, name, v))


def time_unit(call, repeats: int) -> dict:
  """Warm-up calls (a second one, and up to 2 more while a call still compiles), ``repeats``
  timed calls (logging the programs of each), then ``repeats`` profiled calls (each program
  call blocked on and timed). ``call(i)`` runs the unit once."""
  from didr_jax.train.logging import CompileClock
  CompileClock.install()
  t0 = time.perf_counter()
  jax.block_until_ready(call(0))
  first = time.perf_counter() - t0
  # a second call can still compile (e.g. inputs committed to other shardings after the first
  # update): warm up until a call compiles nothing (at most 3 more)
  w0, offset = time.time(), 1
  for _ in range(3):
    w0 = time.time()
    jax.block_until_ready(call(offset))
    offset += 1
    if CompileClock.seconds(w0, time.time()) == 0:
      break
  times, logs, compile_s = [], [], 0.0
  for i in range(repeats):
    RECORDER.log = []
    w0, t0 = time.time(), time.perf_counter()
    jax.block_until_ready(call(offset + i))
    times.append(time.perf_counter() - t0)
    compile_s += CompileClock.seconds(w0, time.time())
    logs.append(RECORDER.log)
    RECORDER.log = None
  RECORDER.durations.clear()
  RECORDER.profile = True
  try:
    for i in range(repeats):
      jax.block_until_ready(call(offset + repeats + i))
  finally:
    RECORDER.profile = False
  counts = collections.Counter(logs[-1])
  same = all(collections.Counter(lg) == counts for lg in logs)
  return {"first_s": first, "seconds": statistics.median(times), "times": times,
          "counts": counts, "order": list(dict.fromkeys(logs[-1])),
          "compile_in_timing_s": compile_s, "same_programs": same,
          "program_s": {k: statistics.median(v) for k, v in RECORDER.durations.items()}}


# --------------------------------------------------------------------------------- configs


def _parse_value(raw: str):
  low = raw.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def load_config_file(spec: str, sets: list[str]):
  """``configs/X.py[:arg]``'s ``get_config([arg])`` with ``key=value`` overrides."""
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO, path)
  name = os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(f"_bench_config_{name}", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  c = mod.get_config(arg) if arg else mod.get_config()
  for item in sets:
    key, eq, raw = item.partition("=")
    if not eq:
      raise SystemExit(f"error: --set {item!r}: expected key=value")
    node = c
    *parents, leaf = key.split(".")
    if parents and parents[0] not in c:   # a method section this config has not (e.g. tdm.*)
      print(f"[{name}] --set {key}: no section {parents[0]!r} in this config, skipped",
            flush=True)
      continue
    for p in parents:
      node = node[p]
    node[leaf] = _parse_value(raw)   # the configs are locked: an unknown key raises
  return name + (f":{arg}" if arg else ""), c


def apply_batch(c, batch: int) -> None:
  """Sets the sample and train batch to ``batch`` (groups shrunk to divide it, one sampling
  batch per optimizer step's micro-batch)."""
  s, t = c.sample, c.train
  s.batch_size = batch
  t.batch_size = batch
  g = math.gcd(int(s.group_size), batch)
  if c.method in ("crd", "tdmr1") and g < 2:
    raise SystemExit(f"error: --batch={batch}: method {c.method!r} needs groups of >= 2 "
                     "samples per prompt: use an even batch")
  s.group_size = g
  s.num_batches = int(t.grad_accum)


def tiny_backbone(c, root: str) -> None:
  """A tiny random backbone folder of the config's kind (and tiny PickScore / aesthetic
  reward models where their environment variables are unset)."""
  from didr_jax.testing import tiny, tiny_zimage
  kind = c.backbone.kind
  folder = os.path.join(root, kind)
  if not os.path.isdir(folder):
    if kind in ("sd", "sdxl"):
      tiny.save_tiny_sd(folder, kind=kind, seed=5)
    elif kind == "zimage":
      tiny_zimage.save_tiny_zimage(folder, seed=2)
    else:
      raise SystemExit(f"error: --tiny: no tiny folder for backbone kind {kind!r}")
  c.backbone.path = folder
  if not os.environ.get("DIDR_PICKSCORE"):
    tiny.save_tiny_pickscore(os.path.join(root, "pickscore"),
                             words=("red", "blue", "circle", "square"))
    os.environ["DIDR_PICKSCORE"] = os.path.join(root, "pickscore")
  if not os.environ.get("DIDR_AESTHETIC_CLIP"):
    tiny.save_tiny_aesthetic(os.path.join(root, "aesthetic"))
    os.environ["DIDR_AESTHETIC_CLIP"] = os.path.join(root, "aesthetic", "clip")
    os.environ["DIDR_AESTHETIC_MLP"] = os.path.join(root, "aesthetic", "mlp.safetensors")


# --------------------------------------------------------------------------------- units


class RandomRewards:
  """A rewarder stub: ``submit`` returns a done future of standard-normal rewards."""

  def __init__(self, seed: int = 0):
    self.rng = np.random.default_rng(seed)

  def submit(self, images, prompts):
    f = concurrent.futures.Future()
    f.set_result(self.rng.standard_normal(len(prompts)).astype(np.float32))
    return f


def _prompts(c, n: int) -> list[str]:
  from didr_jax.train import prompts as prompts_lib
  ps = prompts_lib.load_prompts(c.prompts.train)
  g = int(c.sample.group_size)
  return [ps[(i // g) % len(ps)] for i in range(n)]


def _ddpo_minibatch(tr, state, rng):
  """One optimizer step's minibatch from real rollouts (random advantages), as ``epoch``
  lays it out."""
  c = tr.c
  n = int(c.train.batch_size) * int(c.train.grad_accum)
  b = int(c.sample.batch_size)
  parts, uncond, traj = [], None, None
  window = np.random.default_rng(0)
  for i in range(n // b):
    prompts = _prompts(c, b)
    levels = tr.levels(c.sample.eta, c.sample.num_steps, tr.window_start(window))
    traj, _, cond, uncond = tr.sample(tr.policy_params(state), prompts,
                                      jax.random.fold_in(rng, i), levels=levels)
    parts.append({"latents": jnp.swapaxes(traj.latents, 0, 1),
                  "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond,
                  "levels": jnp.broadcast_to(traj.levels, (b,) + traj.levels.shape),
                  "stochastic": jnp.broadcast_to(traj.stochastic, (b,) + traj.stochastic.shape)})
  cat = lambda k: jnp.concatenate([p[k] for p in parts])
  data = {"latents": cat("latents"), "log_probs": cat("log_probs"), "levels": cat("levels"),
          "stochastic": cat("stochastic"),
          "cond": jax.tree.map(lambda *x: jnp.concatenate(x), *[p["cond"] for p in parts]),
          "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
          "advantages": jax.random.normal(jax.random.key(7), (n,)),
          "rewards": jax.random.normal(jax.random.key(8), (n,))}
  batches = tr._prepare(jax.random.key(9), data)
  return jax.tree.map(lambda x: x[0], batches), uncond


def _crd_minibatch(tr, state, rng):
  from didr_jax.losses import crd as crd_losses
  c = tr.c
  n = int(c.train.batch_size) * int(c.train.grad_accum)
  b = int(c.sample.batch_size)
  x0, conds = [], []
  for i in range(n // b):
    traj, _, cond, _ = tr.sample(state["ema"]["sampler"], _prompts(c, b),
                                 jax.random.fold_in(rng, i))
    x0.append(traj.sample)
    conds.append(cond)
  rewards = jax.random.normal(jax.random.key(8), (n,))
  groups = jnp.arange(n, dtype=jnp.int32) // tr.group
  adv, _ = crd_losses.reward_to_advantage(rewards, groups, n // tr.group, clip=c.crd.adv_clip,
                                          std=c.crd.adv_std)
  data = {"x0": jnp.concatenate(x0), "cond": jax.tree.map(lambda *x: jnp.concatenate(x), *conds),
          "adv": adv, "rewards": rewards}
  batches = tr._prepare(jax.random.key(9), data)
  return jax.tree.map(lambda x: x[0], batches)


def train_unit(tr, state):
  """(call(state, i) -> (state, outputs), samples per call, description) of one train step."""
  c = tr.c
  m = c.method
  b = int(c.sample.batch_size)
  if m == "ddpo":
    mb, uncond = _ddpo_minibatch(tr, state, jax.random.key(3))
    g = jnp.float32(c.sample.guidance_scale)
    call = lambda st, i: tr._update(st, mb, uncond, tr.ref_params, g, jax.random.key(i))
    n = int(c.train.batch_size) * int(c.train.grad_accum)
    return call, n, (f"one optimizer step: {n} trajectories, {tr.num_train_t} trained step(s) each "
                     f"({tr.steps_per_call()} per network call)")
  if m == "crd":
    mb = _crd_minibatch(tr, state, jax.random.key(3))
    call = lambda st, i: tr._update(st, mb, tr.uncond(), tr.ref_params, jax.random.key(i))
    n = int(c.train.batch_size) * int(c.train.grad_accum)
    return call, n, f"one optimizer step: {n} samples x {tr.num_train_times} forward times"
  prompts = _prompts(c, b)
  if m == "didr":
    call = lambda st, i: tr.train_step(st, prompts, jax.random.key(i))[:2]
    return call, b, f"{c.didr.fake_updates} fake-score updates + 1 generator update (DRP)"
  if m in ("tdm", "tdmr1"):
    rewarder = RandomRewards() if m == "tdmr1" else None
    call = lambda st, i: tr.train_step(st, prompts, jax.random.key(i), rewarder)[:2]
    parts = "fake, surrogate, generator" if m == "tdmr1" else "fake, generator"
    return call, b, (f"student rollout + {c.tdm.boundaries_per_iter} x ({parts}) updates")
  raise SystemExit(f"error: no train unit for method {m!r}")


# --------------------------------------------------------------------------------- run


def run_config(label: str, c, args, mesh, peak, loop_counting, rows: list) -> None:
  from didr_jax.train import config as config_lib, loop
  n_dev = mesh.devices.size
  config_lib.validate(c, num_devices=n_dev)
  t_build = time.perf_counter()
  tr = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  _record_trainer(tr)
  state = tr.init_state()
  print(f"[{label}] built in {time.perf_counter() - t_build:.1f} s", flush=True)
  b = int(c.sample.batch_size)
  prompts = _prompts(c, b)

  def emit(unit: str, res: dict, batch: int, desc: str):
    programs = res["counts"]
    infos = {}
    for key in programs:
      p = RECORDER.programs[key]
      if "analysis" not in p:
        p["analysis"] = analyse(p["fn"], p["args"], p["kw"], loop_counting, n_dev)
      infos[key] = p["analysis"]
    gflop = sum(n * infos[k]["gflop"] for k, n in programs.items())
    gflop_jx = sum(n * infos[k]["gflop_jaxpr"] for k, n in programs.items())
    notes = [desc] + ([] if res["same_programs"] else ["the programs differed between calls"])
    if res["compile_in_timing_s"] > 0:
      notes.append(f"{res['compile_in_timing_s']:.1f} s of compilation inside the timed calls")
    rows.append(_row(label, c.method, unit, 1, batch, res["seconds"], gflop, gflop_jx,
                     peak, notes, first_s=res["first_s"],
                     gflop_xla=sum(n * infos[k]["gflop_xla"] for k, n in programs.items())))
    print(_md_row(rows[-1]), flush=True)
    order = res["order"]                               # first-call order within the unit
    names = collections.Counter(k[0] for k in order)
    seen = collections.Counter()
    for key in order:
      n = programs[key]
      a = infos[key]
      sec = res["program_s"].get(key, float("nan"))
      seen[key[0]] += 1
      shown = key[0] + (f" #{seen[key[0]]}" if names[key[0]] > 1 else "")
      rows.append(_row(label, c.method, f"  {shown}", n, batch, sec, a["gflop"],
                       a["gflop_jaxpr"], peak, a["notes"], gflop_xla=a["gflop_xla"],
                       samples_per_call=None,
                       extra={"hlo_while_loops": a["hlo_while_loops"],
                              "jaxpr_rolled_scans": a["jaxpr_rolled_scans"],
                              "gbytes_xla": a["gbytes_xla"], "analysis_s": a["analysis_s"],
                              **({"jaxpr_error": a["jaxpr_error"]} if "jaxpr_error" in a
                                 else {})}))
      print(_md_row(rows[-1]), flush=True)

  # 1. sampling (before any update: the policy parameters may alias the state's, which the
  #    updates donate)
  params = tr.policy_params(state) if c.method != "crd" else state["ema"]["sampler"]
  sample_call = lambda i: tr.sample(params, prompts, jax.random.key(100 + i))[:2]
  res = time_unit(sample_call, args.repeats)
  steps = {"ddpo": c.sample.num_steps, "crd": c.sample.num_steps}.get(c.method)
  desc = (f"{steps}-step rollout, CFG {c.sample.guidance_scale:g}" if steps
          else "one-step generator" if c.method == "didr"
          else f"{c.tdm.num_steps}-step student, CFG {c.tdm.student_cfg:g}")
  emit("sample", res, b, desc)

  # 2. one train step
  call, n, desc = train_unit(tr, state)
  box = {"state": state}
  del state, params

  def step(i):
    box["state"], out = call(box["state"], i)
    return box["state"], out
  res = time_unit(step, args.repeats)
  emit("train step", res, n, desc)
  del box
  RECORDER.programs.clear()   # drop the recorded arguments (device arrays) of this config


def _row(label, method, program, calls, batch, seconds, gflop, gflop_jaxpr, peak, notes, *,
         first_s=None, gflop_xla=None, samples_per_call=True, extra=None) -> dict:
  flops_s = gflop * 1e9 / seconds if seconds and seconds > 0 else float("nan")
  return {"config": label, "method": method, "program": program, "calls_per_unit": calls,
          "batch": batch, "seconds": seconds,
          "samples_per_s": batch / seconds if samples_per_call and seconds else None,
          "gflop": gflop, "gflop_xla": gflop_xla, "gflop_jaxpr": gflop_jaxpr,
          "tflop_s": flops_s / 1e12, "peak_tflop_s": None if peak is None else peak / 1e12,
          "mfu": None if peak is None else flops_s / peak, "first_s": first_s,
          "notes": [n for n in notes if n], **(extra or {})}


HEAD = ("| config | program | calls / unit | batch | s / call | samples/s | GFLOP / call | "
        "GFLOP jaxpr (dot+conv) | TFLOP/s | peak TFLOP/s | MFU % | first call s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(v, f="{:.3g}"):
  return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)


def _md_row(r: dict, note_ids: str = "") -> str:
  return (f"| {r['config']} | {r['program'].strip()}{note_ids} | "
          f"{r['calls_per_unit'] if r['program'].startswith('  ') else 'unit'} | {r['batch']} | "
          f"{_fmt(r['seconds'], '{:.4g}')} | {_fmt(r['samples_per_s'], '{:.3g}')} | "
          f"{_fmt(r['gflop'])} | {_fmt(r['gflop_jaxpr'])} | {_fmt(r['tflop_s'], '{:.3g}')} | "
          f"{_fmt(r['peak_tflop_s'], '{:.4g}')} | "
          f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '{:.2g}')} | "
          f"{_fmt(r['first_s'], '{:.1f}')} |")


def markdown(rows: list[dict]) -> str:
  notes: dict[str, int] = {}
  lines = [HEAD]
  for r in rows:
    ids = []
    for n in r["notes"]:
      notes.setdefault(n, len(notes) + 1)
      ids.append(str(notes[n]))
    lines.append(_md_row(r, f" [{','.join(ids)}]" if ids else ""))
  lines.append("")
  lines += [f"[{i}] {n}" for n, i in notes.items()]
  return "\n".join(lines)


class _restoring_modules:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    _unwrap_modules()
    return False


def environment() -> dict:
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
          "default_matmul_precision": str(jax.config.jax_default_matmul_precision)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default="ddpo,crd,didr,tdm,tdmr1",
                 help="toy configs to run when no --config is given")
  p.add_argument("--config", action="append", default=[],
                 help="configs/X.py[:arg] (repeatable; replaces --methods)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every config, e.g. sample.num_steps=20")
  p.add_argument("--backbone_path", default="", help="sets backbone.path")
  p.add_argument("--tiny", action="store_true",
                 help="real configs on tiny random folders (SD / SDXL / Z-Image, PickScore)")
  p.add_argument("--batch", type=int, default=0,
                 help="sample and train batch (0: the config's)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--num_devices", type=int, default=1)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="peak per device (override)")
  p.add_argument("--out", default="", help="writes OUT.json and OUT.md")
  args = p.parse_args(argv)
  t_start = time.perf_counter()

  from didr_jax.parallel import mesh as mesh_lib
  env = environment()
  print(f"backend {env['backend']}, device {env['device_kind']!r} x {env['device_count']} "
        f"(using {args.num_devices}), jax {env['jax']}, {env['cpu_count']} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in env['load_average'])}", flush=True)
  cpu_peak = measured_cpu_peak() if jax.devices()[0].platform == "cpu" else None
  loop_counting = xla_loop_counting()
  print(f"XLA cost analysis loop counting: {loop_counting} "
        f"({'a while body counts once' if loop_counting == 'once' else 'times its trip count'})",
        flush=True)

  specs = args.config or [f"configs/{TOY_CONFIGS[m]}.py" for m in args.methods.split(",") if m]
  rows: list[dict] = []
  peaks = {}
  with tempfile.TemporaryDirectory() as tmp, _restoring_modules():
    for spec in specs:
      label, c = load_config_file(spec, args.set)
      if args.backbone_path:
        c.backbone.path = args.backbone_path
      elif args.tiny and c.backbone.kind not in ("toy_unet", "toy_dit"):
        tiny_backbone(c, tmp)
      if args.batch:
        apply_batch(c, args.batch)
      mesh = mesh_lib.make_mesh(c.mesh.axes, devices=jax.devices()[:args.num_devices])
      peak, source = resolve_peak(c.backbone.dtype, args.num_devices, args.peak_tflops or None,
                                  cpu_peak)
      peaks[label] = {"peak_tflop_s": None if peak is None else peak / 1e12, "source": source,
                      "dtype": c.backbone.dtype, "load_average": os.getloadavg()[0]}
      print(f"[{label}] {c.method}, {c.backbone.kind} {c.backbone.dtype}, batch "
            f"{c.sample.batch_size}; peak "
            f"{'-' if peak is None else f'{peak / 1e12:.4g} TFLOP/s'} ({source})", flush=True)
      print(HEAD, flush=True)
      t0 = time.perf_counter()
      run_config(label, c, args, mesh, peak, loop_counting, rows)
      peaks[label]["wall_s"] = round(time.perf_counter() - t0, 1)
      print(f"[{label}] done in {peaks[label]['wall_s']:.1f} s", flush=True)
      jax.clear_caches()

  wall = time.perf_counter() - t_start
  env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  sources = list(dict.fromkeys(v["source"] for v in peaks.values()))
  header = (f"backend {env['backend']}, {env['device_kind']} x {args.num_devices} of "
            f"{env['device_count']}, jax {env['jax']}, {env['cpu_count']} CPUs, 1-min load "
            f"average at each config's start "
            + ", ".join(f"{v['load_average']:.1f}" for v in peaks.values())
            + f", at the end {env['load_average_end'][0]:.1f}; XLA loop counting: "
            f"{loop_counting}; peak: "
            + ("; ".join(f"{k}: {v['source']}" for k, v in peaks.items()) if len(sources) > 1
               else sources[0] if sources else "-")
            + f"; wall {wall:.0f} s")
  table = markdown(rows)
  print("\n" + header + "\n\n" + table, flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] +
                                   (sys.argv[1:] if argv is None else list(argv)))
    with open(args.out + ".json", "w") as f:
      json.dump({"command": command, "environment": env, "xla_loop_counting": loop_counting,
                 "cpu_measured_peak_tflop_s": None if cpu_peak is None else cpu_peak / 1e12,
                 "peaks": peaks, "wall_s": round(wall, 1), "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(f"`{command}`\n\n{header}\n\n{table}\n")
  return rows


if __name__ == "__main__":
  main()
