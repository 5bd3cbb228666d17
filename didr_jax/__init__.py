"""didr_jax: reinforcement-learning post-training of text-to-image diffusion models in JAX.

Importing the package quiets notices a user cannot act on (only where the user has not set the
variable): TensorFlow (used by clu's TensorBoard writers) logging its oneDNN notice through absl
before logging is set up (``TF_ENABLE_ONEDNN_OPTS=0``: TensorFlow only writes event files here,
so its numerics do not matter; ``TF_CPP_MIN_LOG_LEVEL=1`` keeps its warnings), and transformers'
"PyTorch was not found" advice (nothing here needs PyTorch at run time; it is a test extra).
"""

import logging as _logging
import os as _os

for _k, _v in (("TF_CPP_MIN_LOG_LEVEL", "1"), ("TF_ENABLE_ONEDNN_OPTS", "0"),
               ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
  _os.environ.setdefault(_k, _v)


class _NoTorchNotice(_logging.Filter):
  """Drops the import-time "PyTorch was not found" notices of transformers / diffusers."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return "PyTorch was not found" not in record.getMessage()


for _name in ("transformers", "diffusers"):
  _logging.getLogger(_name).addFilter(_NoTorchNotice())

__version__ = "0.1.0"
