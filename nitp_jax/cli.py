"""Command-line plumbing shared by the entry points: flag parsing that turns
a bad config file or override into one readable line instead of a traceback."""

from __future__ import annotations

import sys

from absl import flags

_NOISE = ("Traceback", "File ", "raise ", "^", "The above exception", "During handling",
          "Pass --helpshort")


def one_line(error: BaseException) -> str:
  """The informative lines of an exception (frames and carets dropped)."""
  lines = [l.strip() for l in str(error).splitlines()]
  lines = [l for l in lines if l and not l.startswith(_NOISE)]
  text = " ".join(dict.fromkeys(lines)) or type(error).__name__
  return text.replace("\\n", " ").replace("\\'", "'")


def parse_flags_or_exit(argv: list[str], config_flag: str = "config") -> list[str]:
  """absl flags_parser: parse, load the config file with its overrides, and
  exit(2) with `error: ...` if any of it fails."""
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS[config_flag].value.keys()  # a config that failed to load raises here
  except flags.Error as e:
    if "must have a value other than None" in str(e):
      raise
    _exit(f"bad flag: {one_line(e)}")
  except Exception as e:  # pylint: disable=broad-except
    _exit(f"could not load --{config_flag}: {type(e).__name__}: {one_line(e)}")
  return rest


def _exit(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
