"""The CLI's persistent compilation cache (``config.compile_cache_dir``, ``cli_util.compile_cache``):
compiled programs land in the configured folder, "" turns it off, and an explicitly set
JAX_COMPILATION_CACHE_DIR wins over the config. Each case runs in a fresh process (JAX decides
on its first compilation whether the cache is used)."""

import os
import subprocess
import sys

from didr_jax.cli_util import DEFAULT_COMPILE_CACHE
from didr_jax.testing.configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import sys
from didr_jax.cli_util import compile_cache
used = compile_cache(sys.argv[1])
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.jit(lambda x: jnp.sin(x) * 2.0)(jnp.ones(3)).block_until_ready()
print("USED", used)
"""


def _run(path: str, env_dir: str | None = None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  if env_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = env_dir
  out = subprocess.run([sys.executable, "-c", CODE, path], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split("USED ")[-1].strip()


def _files(d) -> list:
  return [f for _, _, fs in os.walk(d) for f in fs] if os.path.isdir(d) else []


def test_config_dir_env_override_and_off(tmp_path):
  assert load_config("toy_ddpo").compile_cache_dir == DEFAULT_COMPILE_CACHE
  a, b, c = (str(tmp_path / n) for n in "abc")
  assert _run(a) == a and _files(a)                 # the configured folder fills
  assert _run(c, env_dir=b) == b and _files(b)      # the environment variable wins
  assert not _files(c)
  assert _run("") == "None"                         # "" = off
