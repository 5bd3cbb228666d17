"""Command-line entry points refuse bad input clearly, before any model is loaded."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}


def run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)


def test_main_refuses_an_unknown_config_key(tmp_path):
  r = run("didr_jax.main", "--config=configs/toy_ddpo.py", "--config.train.learnin_rate=1",
          f"--workdir={tmp_path}")
  assert r.returncode != 0 and "learnin_rate" in r.stderr


def test_main_refuses_inconsistent_batches(tmp_path):
  r = run("didr_jax.main", "--config=configs/toy_ddpo.py", "--config.train.batch_size=24",
          f"--workdir={tmp_path}")
  assert r.returncode != 0 and "config.train.batch_size" in r.stderr


def test_evaluate_needs_a_run_directory(tmp_path):
  r = run("didr_jax.evaluate", f"--workdir={tmp_path}")
  assert r.returncode != 0 and "config.json not found" in r.stderr


def test_sample_refuses_an_empty_prompt_file(tmp_path):
  empty = tmp_path / "prompts.txt"
  empty.write_text("\n  \n")
  r = run("didr_jax.sample", f"--model={tmp_path}", f"--prompt_file={empty}")
  assert r.returncode != 0 and "no prompts" in r.stderr


def test_convert_refuses_a_folder_without_model_index(tmp_path):
  r = run("didr_jax.convert", f"--src={tmp_path}", f"--dst={tmp_path / 'out'}")
  assert r.returncode != 0 and "model_index.json" in r.stderr


def test_saved_configs_of_older_runs_get_the_newer_keys_at_their_defaults():
  """``evaluate`` reads a run's config.json through ``config.with_defaults``: keys added to the
  library after the run was written take their defaults, the run's own values are kept."""
  import importlib.util
  from didr_jax.train import config as config_lib
  for name in ("toy_ddpo", "toy_crd", "toy_didr", "toy_tdm", "toy_tdmr1"):
    spec = importlib.util.spec_from_file_location(name, os.path.join("configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full = mod.get_config().to_dict()
    old = json.loads(json.dumps(full))        # as config.json stores it (tuples become lists)
    del old["sample"]["sde_window"], old["train"]["max_consecutive_nonfinite"], old["lora"]
    section = old[config_lib.method_section(full["method"])[0]]
    section.pop(sorted(section)[0])           # a key of the method's own section
    old["seed"] = 17                          # the run's values win
    c = config_lib.with_defaults(old)
    assert c.seed == 17
    want = json.loads(json.dumps({**full, "seed": 17}))
    got = json.loads(json.dumps(c.to_dict()))
    assert got == want, name
