"""Entry point: ``python -m didr_jax.main --config=configs/toy_ddpo.py --workdir=DIR``.

Config overrides: ``--config.train.learning_rate=3e-4``; unknown keys are refused (the config is
locked) and inconsistent settings are rejected before anything compiles. Rerunning the same
command on the same workdir resumes from its latest checkpoint. On several hosts (TPU pod
workers, SLURM, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID) JAX's distributed
runtime is initialised first.
"""

import os

from absl import app, flags

from ml_collections import config_flags

from didr_jax.cli_util import quiet_logs, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard, plots); "
                    "default: workdirs/<config file name>")
FLAGS = flags.FLAGS


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from didr_jax.parallel import mesh as mesh_lib
  mesh_lib.maybe_initialize_distributed()
  from didr_jax.train import config as config_lib, loop
  workdir = FLAGS.workdir or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  try:
    loop.train(_CONFIG.value, workdir)
  except config_lib.ConfigError as e:  # a bad setting: say which, without a traceback
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  run(main)
