"""How the running command spells a setting as a flag, so that messages from
library code name a flag the user can pass to the command they ran.

Library code names a setting by its config field (`flag("data.input")`) or,
for a setting that is not a config field, by its flag name (`flag("workdir")`):

- a command with `--config` (train, compare, compile_check, params) accepts
  every field as `--config.data.input`: the default;
- a command with flags of its own declares how it spells them,
  `cli.run_main(..., flag_names={"data.input": "--input", ...})` (data.prepare);
- in a command with neither (evaluate, export.hf, plot) a config field is
  named with the command that accepts it: `nitp_jax.train's --config.data.input`.

`cli.run_main` sets the spelling for the program; tests use `spelled`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

# (the command's own spellings, whether it has --config); a plain global, not
# a context variable, so that threads (data preparation) see it too.
_spelling: tuple[dict[str, str], bool] = ({}, True)


def flag(name: str) -> str:
  """The flag that sets `name` (a config field such as "data.input", or a
  plain flag such as "workdir") in the running command."""
  own, has_config = _spelling
  if name in own:
    return own[name]
  if "." not in name:
    return f"--{name}"
  return f"--config.{name}" if has_config else f"nitp_jax.train's --config.{name}"


def use(own: Mapping[str, str], has_config: bool) -> None:
  """Spell flags as this command does, from now on (a program's entry point)."""
  global _spelling  # pylint: disable=global-statement
  _spelling = (dict(own), has_config)


@contextlib.contextmanager
def spelled(own: Mapping[str, str], has_config: bool) -> Iterator[None]:
  """Spell flags as a command does within the block (tests)."""
  before = _spelling
  use(own, has_config)
  try:
    yield
  finally:
    use(*before)
