"""The user errors of the library, on its ground floor (imports nothing from the package).

Each is raised with one line that names what is wrong and how to fix it; the command lines
(``cli_util.user_errors``) print that line and exit 2 instead of a traceback.

- ``ConfigError``: a config key with a bad or inconsistent value (the message starts with
  ``config.<key>:``).
- ``ConversionError``: a model folder that is missing, incomplete or does not match the model.
- ``RewardError``: a reward that cannot be built or a reward server that fails or answers garbage.
- ``PromptError``: a prompt file that is missing, empty or unreadable.
"""


class ConfigError(ValueError):
  """A config value the run cannot use."""


class ConversionError(ValueError):
  """A model folder (diffusers / transformers / Orbax) that cannot be read as asked."""


class RewardError(RuntimeError):
  """A reward that cannot be computed (bad setup, remote server down or answering garbage)."""


class PromptError(ValueError):
  """A prompt file that cannot be used."""


def require(cond: bool, key: str, why: str) -> None:
  """Raises ``ConfigError("config.<key>: <why>")`` unless ``cond``: the one form every config
  check takes."""
  if not cond:
    raise ConfigError(f"config.{key}: {why}")
