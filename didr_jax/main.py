"""Entry point: ``python -m didr_jax.main --config=configs/toy_ddpo.py --workdir=DIR``.

Config overrides: ``--config.train.learning_rate=3e-4``; unknown keys are refused (the config is
locked) and inconsistent settings are rejected before anything compiles. Rerunning the same
command on the same workdir resumes from its latest checkpoint (or, for a finished run, prints
its final metrics and exits 0).

The run holds ``<workdir>/run.lock`` while it lives (``didr_jax.train.workdir_lock``): a second
``main`` on the same workdir is refused, naming the holder; a dead holder's lock is taken over.

Exit codes: 0 done; 1 a checkpoint could not be written (disk full, read-only, over quota: the
unfinished save is removed, the last complete one kept); 2 bad input, including a workdir that
is a file, not writable or in use by another run; 3 stopped after
train.max_consecutive_nonfinite non-finite steps in a row; 143 / 130 stopped by SIGTERM /
SIGINT after saving a checkpoint (rerun to resume).

On several hosts (TPU pod workers, SLURM, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/
JAX_PROCESS_ID) JAX's distributed runtime is initialised first.
"""

import errno
import os
import sys

from absl import app, flags

from ml_collections import config_flags

from didr_jax.cli_util import compile_cache, fail, quiet_logs, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard, plots); "
                    "default: workdirs/<config file name>")
FLAGS = flags.FLAGS


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compile_cache(_CONFIG.value.get("compile_cache_dir", ""))  # before anything compiles
  from didr_jax.parallel import mesh as mesh_lib  # lazy: jax loads after the flag checks
  from didr_jax.train import config as config_lib  # lazy: jax loads after the flag checks
  if not mesh_lib.maybe_initialize_distributed():  # before JAX starts: one CPU device per core
    mesh_lib.split_cpu(config_lib.cpu_devices(_CONFIG.value))
  from didr_jax.train import checkpoint, loop, workdir_lock  # lazy: jax loads after the flag checks
  workdir = FLAGS.workdir or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  try:
    loop.train(_CONFIG.value, workdir)
  except (config_lib.ConfigError, workdir_lock.WorkdirError) as e:  # one line, exit code 2
    raise app.UsageError(str(e)) from None
  except checkpoint.SaveError as e:  # the disk refused a checkpoint
    fail(str(e), code=1)
  except OSError as e:  # the disk refused another write into the workdir (logs, config)
    inside = os.path.abspath(str(e.filename or "/")).startswith(os.path.abspath(workdir))
    if not (inside or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
      raise
    fail(f"could not write into {workdir}: {e}; free space or fix the folder and rerun to "
         "resume", code=1)
  except loop.Stopped as e:  # a signal (checkpoint saved) or non-finite training: one line
    sys.stderr.write(f"didr_jax.main: {e}\n")
    sys.exit(e.exit_code)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  run(main)
