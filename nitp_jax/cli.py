"""What every `python -m nitp_jax.X` shares: flags parsed into one readable
line on error, quiet library logs, and one exit path for user errors.

Library modules define no flags. An entry point ends with

  if __name__ == "__main__":
    cli.run_main(main, define_flags, usage="--config=FILE ...")

so its flags exist only when it runs as a program.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, Mapping

from absl import app, flags, logging
from ml_collections import config_flags

from nitp_jax import errors
from nitp_jax import flag_names as nitp_flag_names


def define_config_flag(help_text: str, lock_config: bool = False) -> None:
  """--config=configs/x.py[:variant] with --config.a.b=value overrides, listed
  by --help beside the program's own flags (absl lists only the main module's)."""
  config_flags.DEFINE_config_file("config", None, help_text, lock_config=lock_config)
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])


def parse_flags_or_exit(argv: list[str], usage: str) -> list[str]:
  """absl flags_parser: parse the flags, load the config file (if the program
  has --config) with its overrides, and exit(2) with one line if any fails."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS["config"].value.keys()  # a config that failed to load raises here
  except flags.Error as e:
    message = errors.one_line(e)
    if "must have a value other than None" in message:
      name = message.split("--", 1)[1].split("=", 1)[0].split(" ", 1)[0]
      files = [a for a in argv[1:] if not a.startswith("-") and ".py" in a]
      if name == "config" and files:
        errors.exit_with(f"--config is required: pass the config file as --config={files[0]} "
                         "(not as a positional argument)")
      errors.exit_with(f"--{name} is required: use {usage}")
    errors.exit_with(f"bad flag: {message}")
  except Exception as e:  # pylint: disable=broad-except  # a config file or override
    errors.exit_with(unknown_field_message(e, argv)
                     or f"could not load --config: {type(e).__name__}: {errors.one_line(e)}")
  return rest


def unknown_field_message(error: Exception, argv: list[str]) -> str | None:
  """One line naming the `--config.a.b=...` override whose field does not
  exist, with ml_collections' suggestion; None if `error` is not that."""
  text = errors.one_line(error)
  key = re.match(r"""\W*'(\w+)'""", text)
  if not isinstance(error, (AttributeError, KeyError)) or not key:
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    if key.group(1) in parts:
      field = ".".join(parts[:parts.index(key.group(1)) + 1])
      suggestion = re.search(r'Did you mean "(\w+)"', text)
      hint = (f"did you mean --config.{field.rsplit(key.group(1), 1)[0]}{suggestion.group(1)}? "
              if suggestion else "")
      return (f"{arg}: the config has no field {field}; {hint}"
              "nitp_jax/config.py lists the fields")
  return None


def run_main(main: Callable[[list[str]], None], define_flags: Callable[[], None], usage: str,
             positional: bool = False, flag_names: Mapping[str, str] | None = None) -> None:
  """Define the program's flags, parse them, and run `main`; a UserError (or
  an unexpected positional argument, unless `positional`) ends the program
  with `error: <one line>` and exit status 2. `flag_names` maps config fields
  to the program's own flags, for messages (see `flag_names.flag`)."""
  define_flags()
  nitp_flag_names.use(flag_names or {}, has_config="config" in flags.FLAGS)

  def guarded(argv: list[str]) -> None:
    if len(argv) > 1 and not positional:
      errors.exit_with(f"unexpected argument(s) {' '.join(argv[1:])!r}: use {usage}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
    try:
      main(argv)
    except errors.UserError as e:
      errors.exit_with(errors.one_line(e))

  app.run(guarded, flags_parser=functools.partial(parse_flags_or_exit, usage=usage))
