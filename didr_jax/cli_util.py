"""What every command-line entry point (main, evaluate, sample, convert) sets up first, and how
each of them reports bad input: one line on stderr, ``error: <what and how to fix>``, exit code
2, no traceback (``run``); a RewardError (a reward server down or answering garbage) that reaches
the top prints as one line with exit code 1 (``_one_line_hook``). Bugs keep their traceback.
"""

from __future__ import annotations

import os
import re
import sys

# TensorFlow (imported by clu's writers) prints C++ INFO banners; keep its warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402

from didr_jax.errors import ConfigError, ConversionError, RewardError

EXIT_BAD_INPUT = 2


def quiet_logs():
  """Orbax and clu log every checkpoint and every write at INFO: show warnings only, unless
  ``--verbosity`` is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


DEFAULT_COMPILE_CACHE = "~/.cache/didr_jax/xla"


def compile_cache(path: str | None = DEFAULT_COMPILE_CACHE) -> str | None:
  """Turns on JAX's persistent compilation cache in ``path`` (``config.compile_cache_dir``;
  ``~`` expanded), so a rerun, a resume or another entry point loads its compiled programs
  instead of compiling them again; ``""`` leaves it off. An explicitly set
  ``JAX_COMPILATION_CACHE_DIR`` environment variable wins (JAX reads it itself). Call it before
  the first compilation: JAX decides on its first compile whether the cache is used. Returns
  the directory in use, or None; a directory that is a file or lies under one ends the command
  with one line (exit 2)."""
  env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if env:
    _check_folder_path(env, "JAX_COMPILATION_CACHE_DIR")
    return env
  if not path:
    return None
  _check_folder_path(str(path), "config.compile_cache_dir", ' ("" turns the cache off)')
  import jax
  path = os.path.expanduser(str(path))
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def folder_problem(path: str, writable: bool = False) -> str | None:
  """Why ``path`` cannot be used as (or made into) a folder: it is a file, it lies under a
  file, or (``writable``) its nearest existing folder cannot be written; None when it can.
  Nothing is created."""
  p = os.path.abspath(os.path.expanduser(path))
  if os.path.lexists(p) and not os.path.isdir(p):
    return f"{path!r} is a file, not a folder"
  parent = p
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{path!r} lies under {parent!r}, which is a file"
  if writable and not os.access(parent, os.W_OK | os.X_OK):
    return f"{path!r} cannot be written ({parent!r} is not writable)"
  return None


def _check_folder_path(path: str, key: str, hint: str = ""):
  problem = folder_problem(path)
  if problem:
    fail(f"{key}: {problem}{hint}")


def fail(message: str, code: int = EXIT_BAD_INPUT):
  """Prints ``error: message`` (whitespace collapsed to one line) and exits with ``code``."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  raise SystemExit(code)  # absl's app.run lets a SystemExit through as it is


def one_line(message: str) -> str:
  return re.sub(r"\s*\n\s*", " ", str(message).strip())


def _user_errors() -> tuple[type, ...]:
  """Exception types that mean bad input."""
  return (app.UsageError, ConfigError, ConversionError)


def _config_flags() -> list[str]:
  """Names of the defined ml_collections config-file flags (``--config``)."""
  return [name for name, fl in flags.FLAGS._flags().items()  # noqa: SLF001 (no public API)
          if getattr(type(fl), "config_filename", None) is not None]


_REWARD_OVERRIDE = re.compile(r"^--?(?P<flag>\w+)\.rewards\.(?P<name>[A-Za-z_][\w]*)=(?P<w>.*)$")


def _split_reward_overrides(argv: list[str], config_names: list[str]):
  """``--config.rewards.NAME=W`` may name any reward, also one the config file does not list:
  ml_collections only overrides existing keys, so these are taken out of argv and applied after
  parsing (``apply_reward_overrides``). Returns (rest of argv, [(flag, name, raw weight)])."""
  rest, found = [], []
  for a in argv:
    m = _REWARD_OVERRIDE.match(a)
    if m and m["flag"] in config_names:
      found.append((m["flag"], m["name"], m["w"]))
    else:
      rest.append(a)
  return rest, found


def _override_error(e: BaseException, argv: list[str]) -> str:
  """One line for ml_collections' failure to apply a ``--config.a.b=v`` override."""
  text = one_line(str(e).encode().decode("unicode_escape")).strip("'\"")
  m = re.match(r"^'?(?P<key>[\w]+)'?\s*(?P<rest>.*)$", text)
  key = m["key"] if m else text
  flag = next((a.split("=", 1)[0] for a in argv
               if a.startswith("--") and "." in a and re.search(rf"\.{re.escape(key)}(=|$)",
                                                                 a.split("=", 1)[0] + "=")),
              None)
  hint = m["rest"].strip() if m else ""
  hint = hint.replace("Did you mean", "did you mean")
  if flag and "." in flag:
    from didr_jax.train import optim  # lazy: jax-heavy (loaded by the config file by now)
    renamed = optim.renamed(flag.split(".", 1)[1])
    if renamed:
      return renamed
  where = flag or f"config key {key!r}"
  return (f"{where}: no such config key {key!r}" + (f" ({hint})" if hint else "")
          + "; see the config file for the keys it defines")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure reported as one line (``fail``): unknown or
  malformed flags, a missing required flag, an unknown ``--config.x`` key (with ml_collections'
  suggestion), a config file that cannot be loaded."""
  names = _config_flags()
  argv, reward_overrides = _split_reward_overrides(list(argv), names)
  if reward_overrides:  # ml_collections reads the overrides from sys.argv itself
    sys.argv[:] = _split_reward_overrides(sys.argv, names)[0]
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:  # absl exits 1 after printing the help that was asked for
    if e.code == 1 and _asks_for_help(argv):
      raise SystemExit(0) from None
    raise
  except flags.Error as e:
    fail(f"{e} (pass --helpfull for every flag)")
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.a.b key
    fail(_override_error(e, argv))
  except (TypeError, ValueError) as e:     # ml_collections: a config file that raised
    fail(f"could not load the config: {_last_line(e)}")
  for name in names:
    fl = flags.FLAGS[name]
    if fl.value is None and not fl.present:
      continue
    try:
      fl.value.keys()  # a config file that failed to load raises on first access
    except OSError as e:
      cause = e.__cause__ or e
      fail(f"--{name}={getattr(fl, 'config_filename', '?')}: cannot load the config file: "
           f"{_last_line(cause)}")
  apply_reward_overrides(reward_overrides)
  return rest


_HELP = re.compile(r"^--?(help|helpshort|helpfull|helpxml|\?)(=(true|1))?$", re.IGNORECASE)


def _asks_for_help(argv: list[str]) -> bool:
  args = argv[1:]
  return any(_HELP.match(a) for a in args[: args.index("--") if "--" in args else None])


def _last_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  return lines[-1] if lines else type(e).__name__


def apply_reward_overrides(overrides) -> None:
  """Sets ``config.rewards[name] = weight`` for each (flag, name, raw weight); the name is
  checked against the reward registry later, by ``config.validate``."""
  for flag, name, raw in overrides:
    try:
      w = float(raw)
    except ValueError:
      fail(f"--{flag}.rewards.{name}={raw}: the weight must be a number")
    rewards = flags.FLAGS[flag].value.rewards
    with rewards.unlocked():
      rewards[name] = w


def run(main):
  """``absl.app.run(main)`` where bad input (flags, config errors, unreadable model folders)
  ends in one line and exit code 2 instead of a traceback or the usage text."""
  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      _fail_now(str(e))
    except Exception as e:  # noqa: BLE001 (re-raised unless it is bad input)
      if isinstance(e, _user_errors()):
        _fail_now(str(e))
      raise
  app.run(guarded, flags_parser=parse_flags)


def _fail_now(message: str):
  """``fail`` for an error that ends the command: background threads that a failed load leaves
  behind (Orbax's asyncio loop, TensorStore) can print tracebacks while the interpreter shuts
  down, after the one line; nothing is left to save at this point, so exit at once."""
  try:
    fail(message)
  except SystemExit as e:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(e.code)


def _one_line_hook(kind, exc, tb, _default=sys.excepthook):
  """A RewardError (reward server down or answering garbage) reaching the top prints as one
  line, exit code 1; every other error keeps its traceback."""
  if issubclass(kind, RewardError):
    print(f"error: {exc}", file=sys.stderr)
  else:
    _default(kind, exc, tb)


sys.excepthook = _one_line_hook
