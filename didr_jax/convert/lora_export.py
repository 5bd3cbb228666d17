"""``python -m didr_jax.convert.lora_export``: a LoRA training run's adapters in diffusers' PEFT
format (kept for existing scripts; ``python -m didr_jax.export`` exports every run).

  python -m didr_jax.convert.lora_export --workdir=RUN --dst=OUT [--merge] [--epoch=N]
      the evaluated adapters of a LoRA training run (base: the run's backbone.path) as
      OUT/pytorch_lora_weights.safetensors (``convert.lora_weights``), or with --merge the merged
      diffusers folder OUT; a full fine-tune exports its pipeline folder.
"""

from __future__ import annotations

from absl import app, flags

from didr_jax.cli_util import quiet_logs, run
from didr_jax.convert import run_export


def export_run(workdir: str, dst: str, *, merge: bool = False, epoch: int | None = None) -> str:
  """Exports a training run (``run_export.export_run``): a LoRA run's evaluated adapters as
  ``dst/pytorch_lora_weights.safetensors``, or with ``merge`` (and always for a full
  fine-tune) the diffusers pipeline folder."""
  lora = bool(run_export.read_run_config(workdir).lora.enabled)
  return run_export.export_run(workdir, dst, epoch=epoch, adapters_only=lora and not merge)


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  lora = bool(run_export.read_run_config(f.workdir).lora.enabled)
  run_export.cli_export(f.workdir, f.dst, f.epoch, lora and not f.merge)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "a training run's workdir")
  flags.DEFINE_string("dst", None, "output folder")
  flags.DEFINE_integer("epoch", None, "the checkpoint epoch (default: the latest)")
  flags.DEFINE_bool("merge", False, "a LoRA run: write the merged diffusers pipeline instead of "
                    "the adapters (a full fine-tune always exports the pipeline)")
  flags.mark_flags_as_required(["workdir", "dst"])
  run(main)
