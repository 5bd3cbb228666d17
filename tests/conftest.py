"""Test session set-up: 8 virtual CPU devices (before JAX initialises) and float32 matmuls."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole session, its pytest-xdist workers and the
# subprocesses the CLI tests start (they inherit the environment): the same program (a resumed
# run, the same tiny model in another test) compiles once. Fresh per session unless set outside.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # noqa: E402
  _shared = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")  # the same for every worker of a run
  _dir = os.path.join(tempfile.gettempdir(), f"didr_jax_test_xla_{_shared or os.getpid()}")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tests run tiny models, so XLA:CPU's compile time dominates them; LLVM at -O0 roughly halves it
# (the tiny SDXL DDPO config test: 295 s -> 189 s) while the library calls that do the heavy
# lifting (dots, convolutions) are unaffected. Benchmarks and the CLI keep the default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
# Parity tests compare against float32 PyTorch: ask XLA for full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test file, drop JAX's in-memory caches of compiled programs and hand freed heap
  back to the OS: a pytest-xdist worker otherwise keeps every program it ever compiled (GBs
  after a few tiny-SDXL trainers) and two such workers can exhaust the machine. A later file
  that needs one of them again reads it from the persistent cache above."""
  yield
  import ctypes
  import gc
  jax.clear_caches()
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):     # not glibc
    pass
