"""What every command-line entry point (main, evaluate, sample, convert) sets up first."""

import os
import sys

# TensorFlow (imported by clu's writers) prints C++ INFO banners; keep its warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import flags, logging  # noqa: E402


def quiet_logs():
  """Orbax and clu log every checkpoint and every write at INFO: show warnings only, unless
  ``--verbosity`` is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _one_line_hook(kind, exc, tb, _default=sys.excepthook):
  """A RewardError (reward server down or answering garbage) reaching the top prints as one
  line, exit code 1; every other error keeps its traceback."""
  base = sys.modules.get("didr_jax.rewards.base")
  if base is not None and issubclass(kind, base.RewardError):
    print(f"error: {exc}", file=sys.stderr)
  else:
    _default(kind, exc, tb)


sys.excepthook = _one_line_hook
