"""Errors a user can fix, and the one way every command reports them.

A `UserError`'s message is one line that names what is wrong and how to fix
it; the entry points (`nitp_jax.cli.run_main`) print it as `error: ...` and
exit with status 2, without a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A problem with the user's input, files or run; the message says the fix."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names field, value, fix."""


class DataError(UserError, ValueError):
  """A corpus, tokenizer or prepared-data directory that cannot be used."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be used; the message says why and what to do."""


class StorageError(UserError, OSError):
  """A storage location (gs://...) this machine cannot use: scheme, package,
  credentials or bucket; or a request to it that failed for good (refused,
  or failing after retries). The message says what to install, set or do."""


class LaunchError(UserError, ValueError):
  """Inconsistent multi-process settings; the message says what to pass."""


class NonFiniteLossError(UserError, RuntimeError):
  """Too many NaN or infinite steps in a row (or non-finite parameters)."""


class ExportError(UserError, ValueError):
  """A model HF cannot represent, or an HF directory nitp_jax cannot read."""


class PlotError(UserError, ValueError):
  """A run directory that cannot be plotted; the message says why."""


_NOISE = ("Traceback", "File ", "raise ", "^", "The above exception", "During handling",
          "Pass --helpshort")


def one_line(error: BaseException) -> str:
  """The informative lines of an exception's text, joined (frames and carets dropped)."""
  lines = [l.strip() for l in str(error).splitlines()]
  lines = [l for l in lines if l and not l.startswith(_NOISE)]
  text = " ".join(dict.fromkeys(lines)) or type(error).__name__
  return text.replace("\\n", " ").replace("\\'", "'")


def exit_with(message: str) -> NoReturn:
  """Print `error: message` on stderr and exit with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)
