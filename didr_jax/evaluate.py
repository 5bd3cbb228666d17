"""Evaluates the latest checkpoint of a run and prints one JSON line.

  python -m didr_jax.evaluate --workdir=workdirs/toy_ddpo [--num_samples=256]

Reads the run's ``config.json``, restores the latest checkpoint (or the base model with
``--base``), samples deterministically on the held-out prompts and reports every configured
reward, the toy detector score and the toy fidelity where they apply.

It only reads the workdir, also while the run trains (it takes no lock): a corrupt newest step
(one that fails to restore or to match its checksums) is named and the next older one
evaluated; nothing in the workdir is moved or changed.
"""

import json
import os

from absl import app, flags

from didr_jax.cli_util import compile_cache, quiet_logs, run


flags.DEFINE_string("workdir", None, "run directory written by didr_jax.main")
flags.DEFINE_integer("num_samples", None, "override eval.num_samples")
flags.DEFINE_bool("base", False, "evaluate the base model instead of the latest checkpoint")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
  quiet_logs()
  del argv
  from didr_jax.parallel import mesh as mesh_lib  # lazy: jax loads after the flag checks
  from didr_jax.train import config as config_lib  # lazy: jax loads after the flag checks
  distributed = mesh_lib.maybe_initialize_distributed()
  path = os.path.join(FLAGS.workdir, "config.json")
  if not os.path.exists(path):
    raise app.UsageError(f"{path} not found: is {FLAGS.workdir!r} a didr_jax run directory?")
  try:
    with open(path) as f:
      c = config_lib.with_defaults(json.load(f))
  except (OSError, ValueError, AttributeError) as e:
    raise app.UsageError(f"{path} is unreadable ({e}); restore it from an earlier "
                         "config.N.json or rerun didr_jax.main with the run's config") from None
  compile_cache(c.compile_cache_dir)  # before anything compiles
  if FLAGS.num_samples:
    c.eval.num_samples = FLAGS.num_samples
  if not distributed:  # before JAX starts: one CPU device per core (config.cpu_devices)
    mesh_lib.split_cpu(config_lib.cpu_devices(c))
  from didr_jax.train import checkpoint, loop  # lazy: jax loads after the flag checks
  config_lib.validate(c, training=False)
  mesh = mesh_lib.make_mesh(c.mesh.axes)
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh), mesh)
  state = trainer.init_state()
  step = 0
  if not FLAGS.base:
    folder = os.path.join(FLAGS.workdir, "checkpoints")
    if not os.path.isdir(folder):
      raise app.UsageError(f"no checkpoint in {folder} (use --base for the base model)")
    # a reader: no lock, nothing in the run's folder created, moved or changed
    ckpt = checkpoint.Checkpointer(folder, read_only=True)
    if ckpt.latest_step() is None:
      raise app.UsageError(f"no checkpoint in {folder} (use --base for the base model)")
    try:  # the newest step that restores and matches its checksums (a corrupt one is named)
      state, _, step = ckpt.restore_latest(checkpoint.abstract_like(state))
    except checkpoint.RestoreError as e:
      raise app.UsageError(f"no checkpoint in {FLAGS.workdir}/checkpoints restores ({e})"
                           ) from None
    finally:
      ckpt.close()
  metrics, _ = loop.run_eval(c, trainer, state)
  print(json.dumps({"workdir": FLAGS.workdir, "epoch": step, **metrics}))


if __name__ == "__main__":
  run(main)
