"""Checkpoint conversion command.

  python -m didr_jax.convert --src=/models/sdxl --dst=/models/sdxl_jax
      Converts a local diffusers pipeline folder into an Orbax cache (configs and tokenizers are
      copied beside it); later runs load ``--dst`` without converting.
  python -m didr_jax.convert --src=/models/sdxl_jax --dst=/models/sdxl_out --export
      Writes a diffusers-format folder (safetensors) from a converted or trained folder, loadable
      by diffusers' ``from_pretrained``.
"""

from absl import app, flags

from didr_jax.cli_util import folder_problem, quiet_logs, run

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "local diffusers pipeline folder or one with an Orbax cache")
flags.DEFINE_string("dst", None, "output folder")
flags.DEFINE_bool("export", False, "write diffusers safetensors instead of an Orbax cache")
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  problem = folder_problem(FLAGS.dst, writable=True)
  if problem:
    raise app.UsageError(f"--dst: {problem}; name a new or existing folder")
  from didr_jax.pipelines import registry  # lazy: JAX loads here (--help, bad flags stay quick)
  registry.check_folder(FLAGS.src)  # headers only: a bad folder fails before loading
  pipe = registry.load_pipeline(FLAGS.src)
  if FLAGS.export:
    pipe.export_diffusers(FLAGS.dst)
    print(f"exported diffusers-format weights to {FLAGS.dst}")
  else:
    pipe.save(FLAGS.dst)
    print(f"wrote Orbax cache and configs to {FLAGS.dst}")


if __name__ == "__main__":
  run(main)
