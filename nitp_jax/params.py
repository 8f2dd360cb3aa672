"""Print parameter counts and training FLOPs per token as one JSON object.

  python -m nitp_jax.params --config=configs/moe_9b.py
"""

from __future__ import annotations

import json

from absl import flags

from nitp_jax import cli
from nitp_jax import config as config_lib
from nitp_jax import flops


def main(argv: list[str]) -> None:
  del argv
  print(json.dumps(flops.report(config_lib.validate(flags.FLAGS.config))))


def define_flags() -> None:
  cli.define_config_flag("Config file (configs/*.py).", lock_config=True)
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--config=configs/moe_9b.py")
