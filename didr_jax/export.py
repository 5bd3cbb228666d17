"""Exports what a training run evaluates as a diffusers pipeline folder.

  python -m didr_jax.export --workdir=workdirs/toy_ddpo --dst=exported/toy_ddpo [--epoch=N]
  python -m didr_jax.export --workdir=runs/lora_run --dst=out --adapters_only

Every method: DDPO's / CRD's policy, DIDR's / TDM's / TDM-R1's generator EMA (what the trainer's
``policy_params`` returns), at the latest epoch or ``--epoch``; a LoRA run's adapters are merged
into the base (``--adapters_only``: diffusers' ``pytorch_lora_weights.safetensors`` instead).
The folder holds ``model_index.json`` and every component (the base folder's, with the trained
denoiser), and ``didr_jax_sampling.json``: the sampler settings and the diffusers call
arguments that reproduce the run's samples (one- and few-step generators: their scheduler, see
``didr_jax.convert.run_export``). The workdir is only read: no lock is taken and no file in it
changes, so a live run can be exported.
"""

from absl import flags

from didr_jax.cli_util import quiet_logs, run

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "run directory written by didr_jax.main")
flags.DEFINE_string("dst", None, "output folder (new or empty)")
flags.DEFINE_integer("epoch", None, "the checkpoint epoch to export (default: the latest)")
flags.DEFINE_bool("adapters_only", False, "a LoRA run: write only its adapters as "
                  "pytorch_lora_weights.safetensors (pipe.load_lora_weights) instead of the "
                  "merged pipeline")
flags.mark_flags_as_required(["workdir", "dst"])


def main(argv):
  from absl import app
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from didr_jax.convert import run_export
  run_export.cli_export(FLAGS.workdir, FLAGS.dst, FLAGS.epoch, FLAGS.adapters_only)


if __name__ == "__main__":
  run(main)
