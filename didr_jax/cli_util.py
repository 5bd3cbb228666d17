"""What every command-line entry point (main, evaluate, sample, convert) sets up first."""

import os

# TensorFlow (imported by clu's writers) prints C++ INFO banners; keep its warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import flags, logging  # noqa: E402


def quiet_logs():
  """Orbax and clu log every checkpoint and every write at INFO: show warnings only, unless
  ``--verbosity`` is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
