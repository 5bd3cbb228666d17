"""The training loop's fault paths: non-finite steps are skipped and stop the run without
touching the good checkpoints; a changed config is kept and an incompatible one refused; SIGTERM
saves and the rerun resumes; a second run on a live workdir is refused; a corrupt newest
checkpoint (truncated, or bit-flipped and caught by its checksums) falls back to the newest
intact one, and ``evaluate`` reads it without moving anything; what a first run prints and
writes.

The end-to-end runs are ``python -m didr_jax.main`` subprocesses on a tiny random toy UNet,
sharing one persistent compilation cache (same program => compiled once)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from didr_jax.testing import tiny
from didr_jax.train import checkpoint, common, loop, optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- units (no model)

def test_guarded_apply_skips_a_nonfinite_step_and_applies_a_finite_one():
  tx = optim.make_optimizer(1e-2)
  params = {"w": jnp.arange(4.0), "b": jnp.ones((2,))}
  opt = tx.init(params)
  step = jax.jit(lambda g, o, p, loss: common.guarded_apply(tx, g, o, p, loss))
  good = {"w": jnp.full((4,), 0.5), "b": jnp.full((2,), -1.0)}
  p1, o1, m = step(good, opt, params, jnp.float32(1.0))
  up, o_ref = tx.update(good, opt, params)  # the plain optax step it must equal
  for k in params:
    np.testing.assert_array_equal(p1[k], optax.apply_updates(params, up)[k])
  assert float(m["nonfinite"]) == 0.0 and float(m["grad_norm"]) == pytest.approx(np.sqrt(3))
  bad_grads = {"w": jnp.array([0.0, jnp.nan, 0.0, 0.0]), "b": jnp.ones((2,))}
  for g, loss in ((bad_grads, 1.0), (good, np.nan), (good, np.inf)):
    p2, o2, m = step(g, o1, p1, jnp.float32(loss))
    assert float(m["nonfinite"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, (p2, o2), (p1, o1))  # nothing moved
  # a finite gradient whose step overflows a weight is skipped too
  huge = optim.make_optimizer(3e38, max_grad_norm=None)
  p3, _, m = jax.jit(lambda g, o, p: common.guarded_apply(huge, g, o, p, jnp.float32(0)))(
      good, huge.init(p1), {"w": jnp.full((4,), -3e38), "b": jnp.ones((2,))})
  assert float(m["nonfinite"]) == 1.0 and float(p3["w"][0]) == float(np.float32(-3e38))


def test_nonfinite_guard_counts_consecutive_skips_across_epochs():
  g = common.NonFiniteGuard(3)
  for flag in (1.0, 1.0, 0.0, 1.0):
    g.observe(jnp.float32(flag))
  g.flush()
  assert g.state_dict() == {"consecutive": 1, "total": 3}
  resumed = common.NonFiniteGuard(3)
  resumed.load_state_dict(g.state_dict())
  resumed.observe(1.0)
  resumed.flush()
  with pytest.raises(common.NonFiniteError, match="3 consecutive"):
    resumed.observe(1.0)
    resumed.flush()


def _state(v):
  return {"params": {"w": jnp.full((3, 2), v, jnp.float32)}, "step": jnp.int32(7)}


def _truncate(folder, keep=1 / 3):
  """Cuts every file under ``folder`` to ``keep`` of its size."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(int(os.path.getsize(f) * keep))


def _flip(folder, n=600):
  """Flips a bit in each of ``n`` bytes in the middle of the largest file under ``folder`` (size
  unchanged): bit rot, or a stray write."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  path = max(files, key=os.path.getsize)
  at = os.path.getsize(path) // 2 - n // 2
  with open(path, "r+b") as fh:
    fh.seek(at)
    flipped = bytes(b ^ 0x01 for b in fh.read(n))
    fh.seek(at)
    fh.write(flipped)


def _snapshot(d):
  return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
          for r, _, fs in os.walk(d) for f in fs}


def test_checksums_catch_a_byte_flip_that_orbax_restores_silently(tmp_path):
  d = str(tmp_path / "checkpoints")
  rng = np.random.default_rng(0)
  states = {s: {"params": {"w": jnp.asarray(rng.normal(size=(128, 128)), jnp.float32)},
                "step": jnp.int32(s)} for s in (1, 2)}
  ck = checkpoint.Checkpointer(d, async_save=True)  # checksums at the next save / the close
  for s, state in states.items():
    ck.save(s, state, {"k": s})
  ck.close()
  data = os.path.join("state", "ocdbt.process_0", "d")
  for s in states:
    sums = json.load(open(os.path.join(d, str(s), checkpoint.CHECKSUMS)))["files"]
    assert any(f.startswith(data) for f in sums) and any(f.startswith("host") for f in sums)
  _flip(os.path.join(d, "2", data))
  abstract = checkpoint.abstract_like(states[1])
  # Orbax alone restores the flipped bytes as values, without a word (the probe)
  state, _ = _restore_raw(str(tmp_path), 2)
  assert not np.array_equal(state["params"]["w"], states[2]["params"]["w"])
  # with them, a reader (evaluate, sample) names the step, uses step 1 and changes nothing
  before = _snapshot(str(tmp_path))
  warnings = []
  ro = checkpoint.Checkpointer(d, read_only=True)
  state, host, step = ro.restore_latest(abstract, warn=warnings.append)
  ro.close()
  assert step == 1 and host == {"k": 1}
  np.testing.assert_array_equal(state["params"]["w"], states[1]["params"]["w"])
  assert len(warnings) == 1 and "step 2" in warnings[0] and "nothing moved" in warnings[0]
  assert "does not match its checksums: state/ocdbt.process_0/d/" in warnings[0]
  assert _snapshot(str(tmp_path)) == before and os.listdir(tmp_path) == ["checkpoints"]


def test_checkpointer_refuses_nonfinite_and_skips_a_corrupt_newest_step(tmp_path):
  d = str(tmp_path / "checkpoints")
  ck = checkpoint.Checkpointer(d, max_to_keep=2, async_save=False)
  ck.save(1, _state(1.0), {"k": 1})
  ck.save(2, _state(2.0), {"k": 2})
  for bad in (np.nan, np.inf):
    with pytest.raises(checkpoint.NonFiniteState, match="last good checkpoint .* is step 2"):
      ck.save(3, _state(bad), {"k": 3})
  assert ck.all_steps() == [1, 2]  # rotation (max_to_keep=2) did not drop a good step
  ck.close()
  _truncate(os.path.join(d, "2", "state"))  # e.g. an interrupted copy of the run directory
  ck = checkpoint.Checkpointer(d, max_to_keep=2, async_save=False)
  warnings = []
  state, host, step = ck.restore_latest(checkpoint.abstract_like(_state(0.0)), warn=warnings.append)
  assert step == 1 and host == {"k": 1} and float(state["params"]["w"][0, 0]) == 1.0
  assert len(warnings) == 1 and "step 2" in warnings[0] and "corrupt" in warnings[0]
  assert ck.all_steps() == [1] and os.listdir(d + ".corrupt") == ["2"]  # moved, not deleted
  ck.save(2, _state(5.0), {"k": 5})  # the run can save the next step again
  assert ck.all_steps() == [1, 2]
  ck.close()


def test_config_diff_names_the_keys():
  old = {"backbone": {"kind": "toy_unet", "path": ""}, "seed": 0}
  new = {"backbone": {"kind": "toy_dit", "path": ""}, "seed": 0, "x": 1}
  assert loop.config_diff(old, new) == ["backbone.kind: 'toy_unet' -> 'toy_dit'",
                                        "x: (absent) -> 1"]
  # a change of method touches dozens of keys: the method leads, the rest is counted
  old = {"method": "ddpo", "ddpo": {f"k{i}": i for i in range(30)}, "seed": 0}
  new = {"method": "crd", "crd": {f"k{i}": i for i in range(12)}, "seed": 1}
  text = loop.describe_diff(loop.config_diff(old, new))
  assert text.startswith("method: 'ddpo' -> 'crd'; ") and len(text) < 400
  assert text.endswith("and 38 more in crd (7), ddpo (30), seed (1)"), text


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def env(tmp_path_factory):
  folder = tiny.save_tiny_toy(str(tmp_path_factory.mktemp("toy")))
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  e = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
       "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return folder, e


def _args(folder, workdir, **kw):
  # 2 optimizer steps per epoch of 1 timestep each; evaluation uses the sampler's shapes
  base = {"backbone.path": folder, "sample.batch_size": 8, "sample.num_batches": 2,
          "sample.num_steps": 4, "train.batch_size": 8, "train.timestep_fraction": 0.25,
          "eval.num_samples": 8, "eval.batch_size": 8, "log_images": 4, "eval_every": 0,
          "async_checkpoint": False, "num_epochs": 3, "checkpoint_every": 2}
  base.update(kw)
  return [sys.executable, "-m", "didr_jax.main", "--config=configs/toy_ddpo.py",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in base.items()]


def _run(cmd, e, timeout=1800):
  return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def _restore_raw(workdir, step):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "host"))
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                  host=ocp.args.JsonRestore()))
  mgr.close()
  return out["state"], out["host"]


SECOND_MAIN = {}  # the second main of ``interrupted``: its pid, subprocess.run result


@pytest.fixture(scope="module")
def interrupted(env, tmp_path_factory):
  """A run SIGTERMed right after epoch 1 of 3 (epoch 1 is not a checkpoint_every=2 step).
  While it runs, a second ``main`` on its workdir (which must be refused: ``second``)."""
  folder, e = env
  workdir = str(tmp_path_factory.mktemp("run"))
  p = subprocess.Popen(_args(folder, workdir), cwd=ROOT, env=e, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  lines = []
  for line in p.stdout:
    lines.append(line)
    if line.startswith("batch:"):  # the first run holds the workdir's lock from now on
      SECOND_MAIN.update(pid=p.pid, run=_run(_args(folder, workdir), e, timeout=300))
    if line.startswith("epoch 1/3 |"):
      p.send_signal(signal.SIGTERM)
      break
  out, err = p.communicate(timeout=300)
  return workdir, p.returncode, "".join(lines) + out, err


def test_first_run_prints_what_compiles_and_writes_eval_pngs(interrupted):
  workdir, _, out, err = interrupted
  assert "compiling the sampler first" in out and "compiling sampling and the update step" in out
  assert "PyTorch was not found" not in err and "oneDNN" not in err
  assert out.index("compiling the sampler") < out.index("eval (base)")
  # the progress line reports the compile time and an ETA without it
  line = next(ln for ln in out.splitlines() if ln.startswith("epoch 1/3 |"))
  assert "of it compiling" in line
  total = float(line.split("| ")[-2].split(" s")[0])
  mean = float(line.split("(mean ")[1].split(" s/epoch")[0])
  assert mean < total
  png = os.path.join(workdir, "eval_samples", "epoch_0000.png")
  from PIL import Image
  assert Image.open(png).size[0] >= 2 * 160  # 4 tiles of 8 px, upscaled to be seen
  rows = open(png[:-4] + ".txt").read().splitlines()
  assert len(rows) == 4 and rows[0].startswith("0,0: ") and len(rows[0]) > 8


def test_a_second_main_on_a_live_run_is_refused_naming_it(interrupted):
  """Two runs on one workdir resumed from the same step and deleted each other's saves; a
  rerun without --workdir trained into the default run while it was live (issue 28)."""
  workdir = interrupted[0]
  second = SECOND_MAIN["run"]
  assert second.returncode == 2, second.stderr[-2000:]
  lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"error: --workdir={workdir} is locked: the "
                                                 f"run of pid {SECOND_MAIN['pid']} on host ")
  assert "batch:" not in second.stdout  # refused before it built anything
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1  # no second writer
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # released by the first run


def test_sigterm_saves_the_last_epoch_and_the_rerun_resumes(env, interrupted, tmp_path):
  folder, e = env
  workdir, code, out, err = interrupted
  assert code == 143, err[-2000:]
  assert "received SIGTERM" in out
  last = err.strip().splitlines()[-1]
  assert "stopped by SIGTERM after epoch 1/3" in last and "checkpoint of epoch 1 saved" in last
  assert "Traceback" not in err
  _, host = _restore_raw(workdir, 1)
  # the saved prompt stream is epoch 1's end (2 draws per epoch), not advanced by the
  # abandoned sampling of epoch 2: the rerun draws the prompts the uninterrupted run would
  assert host["stream"]["position"] == 2 and [h["step"] for h in host["history"]] == [0, 1]
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  r = _run(_args(folder, run), e)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "at epoch 1" in r.stdout and "epoch 3/3 |" in r.stdout
  assert "epoch 1/3 |" not in r.stdout
  # rerunning the finished run: nothing to do, the final metrics and the workdir's contents
  r = _run(_args(folder, run), e)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "nothing left to do" in r.stdout and "final metrics:" in r.stdout
  line = r.stdout.split("final metrics:")[1].splitlines()[0].strip()
  final, end = json.JSONDecoder().raw_decode(line)
  assert "reward_mean" in final and "eval/toy_detector" in final
  assert "in all: " in line[end:] and "history.json" in line and len(line) < 400, line
  assert "checkpoints/" in r.stdout and "eval_samples/" in r.stdout
  assert os.path.exists(os.path.join(run, "eval_samples", "epoch_0003.png"))


def test_corrupt_newest_checkpoint_falls_back(env, interrupted, tmp_path):
  """600 bit-flipped bytes in a data file (which Orbax restores without a word) are caught by
  the checksums: training resumes from the step before and sets the corrupt one aside;
  ``evaluate`` (run at the same time on a copy) evaluates the step before and moves nothing."""
  folder, e = env
  run = str(tmp_path / "run")
  shutil.copytree(interrupted[0], run)
  r = _run(_args(folder, run, num_epochs=2), e)  # checkpoints 1 and 2
  assert r.returncode == 0, r.stderr[-2000:]
  _flip(os.path.join(run, "checkpoints", "2", "state", "ocdbt.process_0", "d"))  # the data
  reader = str(tmp_path / "reader")
  shutil.copytree(run, reader)
  before = _snapshot(reader)
  ev = subprocess.Popen([sys.executable, "-m", "didr_jax.evaluate", f"--workdir={reader}"],
                        cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  r = _run(_args(folder, run, num_epochs=4, checkpoint_every=1), e)
  ev_out, ev_err = ev.communicate(timeout=600)
  assert ev.returncode == 0, ev_err[-2000:]
  warned = [ln for ln in ev_out.splitlines() if ln.startswith("warning:")]
  assert len(warned) == 1 and "step 2" in warned[0] and "does not match its checksums" in warned[0]
  assert "nothing moved" in warned[0] and json.loads(ev_out.splitlines()[-1])["epoch"] == 1
  assert _snapshot(reader) == before  # evaluate read the run and changed nothing in it
  assert r.returncode == 0, r.stderr[-2000:]
  warned = [ln for ln in r.stdout.splitlines() if ln.startswith("warning:")]
  assert len(warned) == 1 and "checkpoint step 2" in warned[0] and "checksums" in warned[0]
  assert "at epoch 1" in r.stdout and "epoch 4/4 |" in r.stdout
  assert os.listdir(os.path.join(run, "checkpoints.corrupt")) == ["2"]
  assert sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints"))) == [2, 3, 4]


def type_of(arg):
  v = arg.split("=", 1)[1]
  for t in (int, float):
    try:
      return t(v)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(v, v)


def test_an_incompatible_config_is_refused_and_changes_nothing(env, tmp_path):
  folder, e = env
  run = str(tmp_path / "run")
  # a toy UNet run directory: its config.json and a checkpoint of its state (no training needed)
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.testing.configs import load_config
  argv = _args(folder, run)
  c = load_config("toy_ddpo", **{a.split("=")[0][len("--config."):]: type_of(a)
                                  for a in argv if a.startswith("--config.")})
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  os.makedirs(run)
  loop._save_config(run, loop._config_text(c), [])
  ck = checkpoint.Checkpointer(os.path.join(run, "checkpoints"), async_save=False)
  ck.save(1, trainer.init_state(), {"stream": {"position": 2, "seed": 0}, "history": [],
                                    **trainer.host_state()})
  ck.close()
  before = _snapshot(run)
  # the probe: the toy DiT recipe on a toy UNet workdir
  cmd = _args(folder, run, **{"backbone.kind": "toy_dit", "backbone.path": "",
                              "sample.eta": 0.7})
  r = _run(cmd, e)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "different config" in last and "backbone.kind: 'toy_unet' -> 'toy_dit'" in last
  assert "Traceback" not in r.stderr
  assert _snapshot(run) == before  # config.json, checkpoints, logs: nothing changed


def test_every_earlier_config_is_kept(tmp_path):
  d = str(tmp_path)
  texts = [json.dumps({"eval": {"num_samples": n}}) for n in (8, 16, 16, 24)]
  prev = None
  for t in texts:
    diff = loop.config_diff(json.loads(prev), json.loads(t)) if prev else []
    loop._save_config(d, t, diff)
    prev = t
  assert sorted(os.listdir(d)) == ["config.1.json", "config.2.json", "config.json"]
  assert [json.load(open(os.path.join(d, f)))["eval"]["num_samples"]
          for f in ("config.1.json", "config.2.json", "config.json")] == [8, 16, 24]


def test_nonfinite_training_stops_and_keeps_the_good_checkpoints(env, tmp_path):
  folder, e = env
  run = str(tmp_path / "nan")
  r = _run(_args(folder, run, **{"train.learning_rate": 1e6, "num_epochs": 8,
                                 "checkpoint_every": 1, "keep_checkpoints": 2,
                                 "eval.num_samples": 0}), e)
  assert r.returncode == loop.EXIT_NONFINITE, (r.stdout[-2000:], r.stderr[-2000:])
  last = r.stderr.strip().splitlines()[-1]
  assert "consecutive optimizer steps had a non-finite" in last and "Traceback" not in r.stderr
  steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")))
  assert steps and steps[-1] < 8
  for s in steps:  # every checkpoint on disk is finite and restores
    state, _ = _restore_raw(run, s)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def test_the_eta_counts_the_evaluations_left(tmp_path, capsys):
  """The ETA is the epochs left at the mean epoch time plus the evaluations left at the mean
  evaluation time, compile time left out of both (issue 28: it left evaluation out)."""
  from didr_jax.train.logging import RunLogger
  logger = RunLogger(str(tmp_path), total_epochs=4)
  logger.evaluated(10.0, compile_seconds=4.0)              # 6 s per evaluation
  logger.progress(1, 5.0, {"loss": 0.5}, compile_seconds=2.0, evals_left=2)
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.endswith(f"ETA {(3.0 * 3 + 6.0 * 2) / 60:.1f} min"), line


def test_evaluation_reports_its_progress_after_each_batch():
  from didr_jax.train import evaluation
  seen = []
  m, images = evaluation.evaluate(
      lambda ps, rng: np.zeros((len(ps), 2, 2, 3), np.float32), ["a", "b"],
      {"zero": lambda im, ps: np.zeros(len(ps))}, num_samples=6, batch_size=2,
      progress=lambda done, total: seen.append((done, total)))
  assert seen == [(2, 6), (4, 6), (6, 6)] and images.shape == (6, 2, 2, 3) and m["zero"] == 0


def test_evaluation_grids_are_upscaled_with_each_prompt_under_its_tile():
  from didr_jax.train.logging import captioned_grid
  grid = captioned_grid(np.ones((2, 8, 8, 3), np.float32), ["a red circle", ""], cols=2)
  assert grid.shape[1] == 2 * (160 + 4) + 4 and grid.shape[0] > 160
  caption = grid[4 + 160:, :]                        # the strip under the tiles
  left, right = caption[:, : 164], caption[:, 168:]
  assert (left < 128).any() and not (right < 128).any()  # text under the first tile only
